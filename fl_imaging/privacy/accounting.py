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
    """Epsilon spent by ``history`` at ``delta`` with Opacus' ``accountant`` (0 when empty)."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


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
                target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=steps, accountant=accountant, epsilon_tolerance=EPSILON_TOLERANCE,
            )
        )  # fmt: skip
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
