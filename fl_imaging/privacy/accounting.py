"""Privacy accounting on Opacus accountants: epsilon of a history, noise for a budget.

A *history* is Opacus' accountant history: a list of ``(noise_multiplier,
sample_rate, steps)`` entries, one per stretch of DP-SGD steps with the same
settings. Everything here is a plain function of it, so the epsilon a site
reports can be recomputed by anyone from its ledger.
"""

from __future__ import annotations

from collections.abc import Sequence

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

History = list[tuple[float, float, int]]

# the accountant's own search tolerance for a planned epsilon (absolute)
EPSILON_TOLERANCE = 0.01
# a site with less than this fraction of its budget left counts as exhausted: what
# remains would only buy updates drowned in noise
EXHAUSTED_FRACTION = 0.01
_MAX_SIGMA = 1e3


def epsilon_of(history: Sequence[Sequence[float]], *, delta: float, accountant: str) -> float:
    """Epsilon spent by ``history`` at ``delta`` with Opacus' ``accountant`` (0 when empty).

    Never negative: the RDP-to-(epsilon, delta) conversion can return a value below 0
    for a large delta and little spending; a guarantee cannot be better than epsilon 0.
    """
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return max(0.0, float(acc.get_epsilon(delta=delta)))


# the default delta is at most this, whatever the cohort size
DEFAULT_DELTA_CAP = 1e-5


def default_delta(num_train: int) -> float:
    """The delta of a site that sets none: ``min(1e-5, N ** -1.1)`` for ``N`` training patients.

    Delta bounds the probability that the guarantee fails outright (e.g. one patient's
    record is released whole); it must be far below ``1 / N``. The usual 1e-5 does
    that for any hospital cohort; ``N ** -1.1`` keeps delta ``o(1/N)`` for cohorts past
    35,000 patients. The old default ``1 / (10 N)`` was 0.014 for 7 patients.
    """
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    return min(DEFAULT_DELTA_CAP, float(num_train) ** -1.1)


def noise_for_budget(
    *,
    history: Sequence[Sequence[float]],
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
) -> float:
    """Smallest noise multiplier with which ``steps`` more steps end at most at ``epsilon``.

    With an empty ``history`` this is Opacus' ``get_noise_multiplier``. After earlier
    spending (a restarted site), Opacus offers no such search, so the same bisection
    is done here over the accountant with the history prefixed.

    Raises:
        ValueError: the budget is already spent by ``history`` (no noise suffices).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not history:
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=EPSILON_TOLERANCE,
            )
        )
    prefix = [tuple(h) for h in history]

    def spent(sigma: float) -> float:
        planned = [*prefix, (sigma, sample_rate, steps)]
        return epsilon_of(planned, delta=delta, accountant=accountant)

    already = epsilon_of(prefix, delta=delta, accountant=accountant)
    low, high = 0.0, 10.0
    while already < epsilon and spent(high) > epsilon and high < _MAX_SIGMA:
        low, high = high, high * 2
    if already >= epsilon or spent(high) > epsilon:
        raise ValueError(
            f"budget epsilon={epsilon} is spent ({already:.3f} so far); no noise level "
            f"allows {steps} more steps"
        )
    while spent(high) < epsilon - EPSILON_TOLERANCE and high - low > 1e-4:
        mid = (low + high) / 2
        if spent(mid) > epsilon:
            low = mid
        else:
            high = mid
    return high
