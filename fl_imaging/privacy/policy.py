"""A hospital's own privacy policy: the rules a run must meet before the site trains.

The run config is written by the coordinator. Without a policy, the site takes the
budget the run sends (and, once it has a ledger, the ledger holds it to that budget).
With a policy, held on the hospital's side and never sent, the hospital decides: a run
that asks for weaker privacy than the policy allows (no DP, a larger epsilon or delta,
a larger clipping norm, another accountant, less noise, more rounds or local epochs)
is **refused by the site** with a reason the server records; it is never silently
changed into something else. A run asking for stricter settings is run as asked.

Where the policy lives (first found):

1. ``node_config["privacy-policy"]``: a YAML file named when the hospital starts its
   SuperNode (read-only in the hospital's container);
2. ``<state_dir>/privacy_policy.yaml``: the site's own state folder.

In simulation there is usually neither, and the site entries of ``conf/`` play that
role. The file (every key optional)::

    require_dp: true          # refuse to train without DP-SGD (default true)
    epsilon: 8.0              # the largest total epsilon a run may ask for
    delta: 1.0e-5             # the largest delta
    max_grad_norm: 1.0        # the largest per-sample clipping norm
    accountant: rdp           # the only accountant accepted
    min_noise_multiplier: 0.5 # refuse a plan with less noise than this
    max_rounds: 50            # refuse runs planned for more rounds
    max_local_epochs: 2       # refuse more local epochs per round
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

POLICY_FILE = "privacy_policy.yaml"
REFUSED_BY_POLICY = "refused_by_policy"
ACCOUNTANTS = ("rdp", "prv", "gdp")


class PolicyError(ValueError):
    """A site's policy file is missing, unreadable or invalid (the site does not train)."""


@dataclass(frozen=True)
class SitePolicy:
    """A hospital's privacy rules (None: no rule on that setting)."""

    require_dp: bool = True
    epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float | None = None
    accountant: str | None = None
    min_noise_multiplier: float | None = None
    max_rounds: int | None = None
    max_local_epochs: int | None = None
    # the file it was read from (for messages)
    source: str = ""


@dataclass(frozen=True)
class PrivacyRequest:
    """What a run asks of one site (resolved: defaults applied, epsilon None = no DP)."""

    epsilon: float | None
    delta: float | None
    max_grad_norm: float | None
    accountant: str
    rounds: int
    local_epochs: int


def load_policy(path: Path) -> SitePolicy:
    """Read and check a policy file.

    Raises:
        PolicyError: the file is missing, is not a YAML mapping, has unknown keys or
            values that cannot be a privacy rule; the message names the file and key.
    """
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"privacy policy {path}: cannot be read ({exc})") from exc
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise PolicyError(f"privacy policy {path}: must be a YAML mapping of rules")
    known = {f.name for f in dataclasses.fields(SitePolicy)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PolicyError(f"privacy policy {path}: unknown keys {unknown}; known: {sorted(known)}")
    problems = []
    if not isinstance(raw.get("require_dp", True), bool):
        problems.append(f"require_dp must be true or false, got {raw['require_dp']!r}")
    for key in ("epsilon", "delta", "max_grad_norm", "min_noise_multiplier"):
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{key} must be a number, got {value!r}")
        elif not (math.isfinite(value) and value > 0) or (key == "delta" and value >= 1):
            problems.append(f"{key} must be finite and > 0 (delta below 1), got {value}")
    for key in ("max_rounds", "max_local_epochs"):
        value = raw.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            problems.append(f"{key} must be an integer >= 1, got {value!r}")
    if raw.get("accountant") is not None and raw["accountant"] not in ACCOUNTANTS:
        problems.append(f"accountant must be one of {ACCOUNTANTS}, got {raw['accountant']!r}")
    if problems:
        raise PolicyError(f"privacy policy {path}: " + "; ".join(problems))
    floats = {"epsilon", "delta", "max_grad_norm", "min_noise_multiplier"}
    values = {k: (float(v) if k in floats and v is not None else v) for k, v in raw.items()}
    return SitePolicy(**values, source=str(path))


def find_policy(named: Path | None, state_dir: Path) -> SitePolicy | None:
    """The site's policy: the file ``named`` by its node config, else its state folder's.

    Raises:
        PolicyError: ``named`` does not exist (a hospital that names a policy must not
            train without it), or the file is invalid.
    """
    if named is not None:
        path = named.expanduser()
        if not path.is_file():
            raise PolicyError(
                f"privacy policy {path} (node_config privacy-policy) does not exist; the "
                f"site does not train without the policy it names"
            )
        return load_policy(path)
    default = state_dir / POLICY_FILE
    return load_policy(default) if default.is_file() else None


def refusal(policy: SitePolicy, request: PrivacyRequest) -> str | None:
    """Why ``policy`` refuses ``request`` (None: the run may train at this site).

    Every rule is checked and every broken one named, so an operator can fix the run
    in one go.
    """
    reasons = []
    if request.epsilon is None:
        if policy.require_dp:
            reasons.append("the run asks for training without DP-SGD; the policy requires it")
    else:
        if policy.epsilon is not None and request.epsilon > policy.epsilon:
            reasons.append(f"epsilon {request.epsilon:g} > the policy's {policy.epsilon:g}")
        if policy.delta is not None and request.delta is not None and request.delta > policy.delta:
            reasons.append(f"delta {request.delta:g} > the policy's {policy.delta:g}")
        if (
            policy.max_grad_norm is not None
            and request.max_grad_norm is not None
            and request.max_grad_norm > policy.max_grad_norm
        ):
            reasons.append(
                f"max_grad_norm {request.max_grad_norm:g} > the policy's {policy.max_grad_norm:g}"
            )
        if policy.accountant is not None and request.accountant != policy.accountant:
            reasons.append(
                f"accountant {request.accountant} is not the policy's {policy.accountant}"
            )
    if policy.max_rounds is not None and request.rounds > policy.max_rounds:
        reasons.append(f"{request.rounds} rounds > the policy's max_rounds {policy.max_rounds}")
    if policy.max_local_epochs is not None and request.local_epochs > policy.max_local_epochs:
        reasons.append(
            f"{request.local_epochs} local epochs > the policy's max_local_epochs "
            f"{policy.max_local_epochs}"
        )
    if not reasons:
        return None
    return f"privacy policy {policy.source}: " + "; ".join(reasons)


def noise_refusal(policy: SitePolicy | None, noise_multiplier: float) -> str | None:
    """Why ``policy`` refuses a plan with this noise multiplier (None: enough noise)."""
    if policy is None or policy.min_noise_multiplier is None:
        return None
    if noise_multiplier >= policy.min_noise_multiplier:
        return None
    return (
        f"privacy policy {policy.source}: the planned noise multiplier {noise_multiplier:.3f} "
        f"is below the policy's min_noise_multiplier {policy.min_noise_multiplier:g}"
    )
