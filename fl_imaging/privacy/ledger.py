"""The per-site privacy ledger: what a site has spent, kept on the site's own disk.

ClientApps are short-lived and runs get restarted, so a site's privacy spending
cannot live in memory. The ledger (``<state_dir>/privacy_ledger.json``) holds the
site's budget, the Opacus accountant history of every DP-SGD step it ever took
(across rounds and runs), the current run's noise plan and a log of trained
rounds. It is written atomically after every round. Only an operator's explicit
reset starts a new one: the old file is archived and the reset is appended to
``<state_dir>/privacy_audit.jsonl``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fl_imaging.privacy.accounting import History, epsilon_of

LEDGER_FILE = "privacy_ledger.json"
AUDIT_FILE = "privacy_audit.jsonl"
_VERSION = 1


class LedgerError(ValueError):
    """A ledger is unreadable or does not match the site's configured budget."""


@dataclass
class NoisePlan:
    """The noise a site chose for one run so that its budget lasts the planned rounds."""

    run_id: str
    noise_multiplier: float
    sample_rate: float  # Poisson sampling rate q = expected batch / training cases
    steps_per_round: int
    first_round: int
    planned_rounds: int  # rounds of this run the plan spreads the remaining budget over


@dataclass
class Ledger:
    """A site's privacy budget and spending."""

    site: str
    accountant: str
    epsilon_budget: float
    delta: float
    history: History = field(default_factory=list)
    plan: NoisePlan | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    @property
    def epsilon_spent(self) -> float:
        """Epsilon of every step recorded so far (recomputed from the history)."""
        return epsilon_of(self.history, delta=self.delta, accountant=self.accountant)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon the site would have spent after ``steps`` more steps."""
        return epsilon_of(
            [*self.history, (noise_multiplier, sample_rate, steps)],
            delta=self.delta,
            accountant=self.accountant,
        )


def ledger_path(state_dir: Path) -> Path:
    """Where a site's ledger lives."""
    return state_dir / LEDGER_FILE


def read_ledger(state_dir: Path) -> Ledger | None:
    """The ledger in ``state_dir``, or None when the site never trained privately.

    Raises:
        LedgerError: the file exists but cannot be read as a ledger (never ignored:
            a site must not lose track of what it spent).
    """
    path = ledger_path(state_dir)
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.get("version") != _VERSION:
            raise LedgerError(f"{path}: unsupported ledger version {raw.get('version')!r}")
        plan = raw.get("plan")
        return Ledger(
            site=str(raw["site"]),
            accountant=str(raw["accountant"]),
            epsilon_budget=float(raw["epsilon_budget"]),
            delta=float(raw["delta"]),
            history=[(float(s), float(q), int(n)) for s, q, n in raw["history"]],
            plan=NoisePlan(**plan) if plan else None,
            rounds=list(raw.get("rounds", [])),
            created=float(raw.get("created", 0.0)),
        )
    except LedgerError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LedgerError(
            f"{path}: privacy ledger is unreadable ({type(exc).__name__}: {exc}); the site "
            f"cannot tell what it has spent. Restore it, or reset it with "
            f"`fl-imaging privacy reset --site ...`"
        ) from exc


def open_ledger(
    state_dir: Path, *, site: str, epsilon: float, delta: float, accountant: str
) -> Ledger:
    """The site's ledger, created on first use; checked against the configured budget.

    Raises:
        LedgerError: the stored ledger belongs to another site or was made for
            another budget, delta or accountant. A budget never changes silently:
            the operator resets the ledger explicitly (which is audited).
    """
    ledger = read_ledger(state_dir)
    if ledger is None:
        ledger = Ledger(site=site, accountant=accountant, epsilon_budget=epsilon, delta=delta)
        save_ledger(state_dir, ledger)
        return ledger
    stored = (ledger.site, ledger.epsilon_budget, ledger.delta, ledger.accountant)
    wanted = (site, epsilon, delta, accountant)
    if stored != wanted:
        raise LedgerError(
            f"site {site}: the privacy ledger {ledger_path(state_dir)} was made for "
            f"site={stored[0]} epsilon={stored[1]:g} delta={stored[2]:g} accountant={stored[3]}, "
            f"but the configuration asks for site={site} epsilon={epsilon:g} delta={delta:g} "
            f"accountant={accountant}. A budget never changes silently: keep the old settings, "
            f"or reset with `fl-imaging privacy reset --site {site}` (audited)"
        )
    return ledger


def save_ledger(state_dir: Path, ledger: Ledger) -> None:
    """Write the ledger atomically (temp file, fsync, rename)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    doc = {"version": _VERSION, **asdict(ledger)}
    doc["history"] = [list(h) for h in ledger.history]
    doc["epsilon_spent"] = ledger.epsilon_spent  # for people reading the file; recomputed on load
    path = ledger_path(state_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as fh:
        fh.write(json.dumps(doc, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def reset_ledger(state_dir: Path, *, operator: str, reason: str) -> Path | None:
    """Archive the site's ledger and log the reset in the audit trail.

    Returns the archived file (None when there was no ledger).
    """
    ledger = read_ledger(state_dir)
    if ledger is None:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    archive = state_dir / f"privacy_ledger.{stamp}.json"
    os.replace(ledger_path(state_dir), archive)
    event = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "event": "reset",
        "site": ledger.site,
        "operator": operator,
        "reason": reason,
        "epsilon_spent": ledger.epsilon_spent,
        "epsilon_budget": ledger.epsilon_budget,
        "delta": ledger.delta,
        "archived_to": archive.name,
    }
    with (state_dir / AUDIT_FILE).open("a") as fh:
        fh.write(json.dumps(event) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return archive
