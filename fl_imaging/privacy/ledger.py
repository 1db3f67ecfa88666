"""The per-site privacy ledger: what a site has spent, kept on the site's own disk.

ClientApps are short-lived and runs get restarted, so a site's privacy spending
cannot live in memory. The ledger (``<state_dir>/privacy_ledger.json``) holds the
site's budget, the Opacus accountant history of every DP-SGD step it ever took
(across rounds and runs), the current run's noise plan and a log of trained
rounds. It is written atomically after every round.

A ledger that is lost or edited would hand the site its budget again, so:

* **Integrity**: every saved version carries ``digest = sha256(prev_digest + body)``,
  a hash chain over the ledger's versions. A file whose body does not hash to its
  digest (edited, history emptied) is refused.
* **A marker outside the ledger** (``privacy_ledger.head``) holds the latest digest.
  A ledger deleted while the marker exists, or replaced by an older or truncated copy
  (a digest the marker does not know), is refused.
* **A lock** (:func:`ledger_lock`, ``privacy.lock``) serialises the private rounds of
  one state folder: a second training waits, then is refused with a clear error.

Only an operator's explicit, audited reset (:func:`reset_ledger`) starts a new ledger:
the old files are archived and the reset is appended to
``<state_dir>/privacy_audit.jsonl``. What this does not stop: someone with write
access to the hospital's state folder who rewrites the ledger, its digests and the
marker consistently (the hospital's own disk is trusted; docs/PRIVACY.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fl_imaging.privacy.accounting import History, epsilon_of
from fl_imaging.site.private_files import append_private, private_dir, write_private

LEDGER_FILE = "privacy_ledger.json"
MARKER_FILE = "privacy_ledger.head"
LOCK_FILE = "privacy.lock"
AUDIT_FILE = "privacy_audit.jsonl"
_VERSION = 2
# fields of the file that are not hashed: the chain itself, and a derived figure
_UNHASHED = ("digest", "prev_digest", "epsilon_spent")


class LedgerError(ValueError):
    """A ledger is unreadable, fails its integrity check or does not match the budget."""


class LedgerBusyError(LedgerError):
    """Another training holds the site's privacy lock."""


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
    # digest of the version last read or written ("" for a ledger never saved)
    digest: str = ""

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


def has_ledger(state_dir: Path) -> bool:
    """True when the site has (or had, per its marker) a privacy ledger."""
    return ledger_path(state_dir).exists() or (state_dir / MARKER_FILE).exists()


def _digest(prev: str, body: dict[str, Any]) -> str:
    """``sha256(prev + canonical JSON of body)``: one link of the ledger's hash chain."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev + canonical).encode()).hexdigest()


def _marker(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / MARKER_FILE
    if not path.exists():
        return None
    try:
        marker = json.loads(path.read_text())
        str(marker["digest"])
        return marker
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LedgerError(
            f"{path}: the ledger marker is unreadable ({exc}); the site cannot tell whether "
            f"its ledger is the latest. Reset with `fl-imaging privacy reset` (audited)"
        ) from exc


def read_ledger(state_dir: Path) -> Ledger | None:
    """The ledger in ``state_dir``, or None when the site never trained privately.

    Raises:
        LedgerError: the file exists but cannot be read as a ledger, fails its hash
            check (edited), is not the version the marker recorded (replaced by an
            older or truncated copy), or is missing while the marker says the site
            had one (deleted). Never ignored: a site must not lose track of what it
            spent.
    """
    path = ledger_path(state_dir)
    marker = _marker(state_dir)
    how_to_fix = (
        "Restore the ledger from a backup, or reset it with `fl-imaging privacy reset "
        "--site ...` (audited; only for new patients or a new policy)"
    )
    if not path.exists():
        if marker is not None:
            raise LedgerError(
                f"{path}: the privacy ledger is missing, but {state_dir / MARKER_FILE} records "
                f"that this site had one (epsilon spent {marker.get('epsilon_spent', '?')}). "
                f"Its budget is not restored by deleting the ledger. {how_to_fix}"
            )
        return None
    raw, ledger = _parse_ledger(path, how_to_fix)
    # version 1 was written before the hash chain: accepted once, unless a marker exists
    if raw.get("version") == 1:
        if marker is not None:
            raise LedgerError(
                f"{path}: a ledger without digest where a marker exists. {how_to_fix}"
            )
        return ledger
    body = {k: v for k, v in raw.items() if k not in _UNHASHED}
    if _digest(str(raw.get("prev_digest", "")), body) != ledger.digest:
        raise LedgerError(
            f"{path}: the privacy ledger fails its integrity check (its content was changed "
            f"after the site wrote it: an edited history or budget). {how_to_fix}"
        )
    # a crash between the two writes of save_ledger leaves the marker one version behind
    known = {ledger.digest, str(raw.get("prev_digest", ""))}
    if marker is None or marker["digest"] not in known:
        what = "missing" if marker is None else f"at {str(marker['digest'])[:12]}"
        raise LedgerError(
            f"{path}: the privacy ledger is not the latest version the site wrote (marker "
            f"{state_dir / MARKER_FILE} {what}, ledger at {ledger.digest[:12]}): an older, "
            f"truncated or copied ledger. {how_to_fix}"
        )
    return ledger


def _parse_ledger(path: Path, how_to_fix: str) -> tuple[dict[str, Any], Ledger]:
    """The ledger file's JSON and the :class:`Ledger` it holds (no integrity check yet).

    Raises:
        LedgerError: unreadable, not JSON, an unsupported version or a missing field.
    """
    try:
        raw = json.loads(path.read_text())
        version = raw.get("version")
        if version not in (1, _VERSION):
            raise LedgerError(f"{path}: unsupported ledger version {version!r}")
        plan = raw.get("plan")
        return raw, Ledger(
            site=str(raw["site"]),
            accountant=str(raw["accountant"]),
            epsilon_budget=float(raw["epsilon_budget"]),
            delta=float(raw["delta"]),
            history=[(float(s), float(q), int(n)) for s, q, n in raw["history"]],
            plan=NoisePlan(**plan) if plan else None,
            rounds=list(raw.get("rounds", [])),
            created=float(raw.get("created", 0.0)),
            digest=str(raw.get("digest", "")),
        )
    except LedgerError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerError(
            f"{path}: privacy ledger is unreadable ({type(exc).__name__}: {exc}); the site "
            f"cannot tell what it has spent. {how_to_fix}"
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
    """Write the ledger atomically as the next link of its hash chain, then the marker.

    Files are created readable by the site's user only (0600; the folder 0700).
    """
    doc = {"version": _VERSION, **asdict(ledger)}
    doc["history"] = [list(h) for h in ledger.history]
    body = {k: v for k, v in doc.items() if k not in _UNHASHED}
    body = json.loads(json.dumps(body))  # the types the file will hold when read back
    prev = ledger.digest
    ledger.digest = _digest(prev, body)
    doc = {
        **body,
        "prev_digest": prev,
        "digest": ledger.digest,
        "epsilon_spent": ledger.epsilon_spent,
    }  # for readers; recomputed on load
    write_private(ledger_path(state_dir), json.dumps(doc, indent=1) + "\n")
    marker = {
        "site": ledger.site,
        "digest": ledger.digest,
        "epsilon_spent": doc["epsilon_spent"],
        "time": time.time(),
    }
    write_private(state_dir / MARKER_FILE, json.dumps(marker) + "\n")


@contextlib.contextmanager
def ledger_lock(state_dir: Path, *, site: str, timeout: float) -> Iterator[None]:
    """Hold the site's exclusive privacy lock (``privacy.lock``) for a whole private round.

    A second training on the same state folder waits up to ``timeout`` seconds for the
    first to finish, then is refused: two rounds at once would both release weights
    while the ledger kept only one of them.

    Raises:
        LedgerBusyError: the lock is still held after ``timeout`` seconds.
    """
    private_dir(state_dir)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    raise LedgerBusyError(
                        f"site {site}: another training holds the privacy lock {path} "
                        f"({holder or 'holder unknown'}) after {timeout:g} s; the private "
                        f"rounds of one site never run at once: wait for it, or stop it"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def reset_ledger(state_dir: Path, *, operator: str, reason: str) -> Path | None:
    """Archive the site's ledger and marker and log the reset in the audit trail.

    Works on a ledger that fails its checks too (deleted, edited, replaced): that is
    what the reset is for, and the audit entry says what was found.

    Returns the archived ledger (None when there was none; a lone marker is archived).
    """
    path, marker_path = ledger_path(state_dir), state_dir / MARKER_FILE
    if not path.exists() and not marker_path.exists():
        return None
    found: dict[str, Any] = {}
    try:
        ledger = read_ledger(state_dir)
        if ledger is not None:
            found = {
                "site": ledger.site,
                "epsilon_spent": ledger.epsilon_spent,
                "epsilon_budget": ledger.epsilon_budget,
                "delta": ledger.delta,
            }
    except LedgerError as exc:
        found = {"problem": str(exc)}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    archive = state_dir / f"privacy_ledger.{stamp}.json"
    if path.exists():
        os.replace(path, archive)
    if marker_path.exists():
        os.replace(marker_path, state_dir / f"privacy_ledger.{stamp}.head")
    event = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "event": "reset",
        "operator": operator,
        "reason": reason,
        **found,
        "archived_to": archive.name if archive.exists() else None,
    }
    append_private(state_dir / AUDIT_FILE, json.dumps(event) + "\n")
    return archive if archive.exists() else None
