"""Screen site updates before aggregation: one broken or hostile site must not poison the model.

Pure functions over arrays (no Flower), applied by the ServerApp to every training
reply: wrong tensor names or shapes, non-finite values, and an update whose norm is
far outside the round's distribution are rejected with a reason.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - reference`` over all tensors (same names and shapes)."""
    total = 0.0
    for name, ref in reference.items():
        diff = np.asarray(update[name], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        total += float(np.sum(diff * diff))
    return total**0.5


def screen_updates(
    reference: Mapping[str, np.ndarray],
    updates: Mapping[str, Mapping[str, np.ndarray]],
    *,
    norm_factor: float | None = 10.0,
) -> dict[str, str]:
    """Reasons to reject site updates (site -> reason); sites not listed pass.

    Args:
        reference: the global model sent this round (tensor name -> array).
        updates: each site's returned model (tensor name -> array).
        norm_factor: reject an update whose distance to ``reference`` exceeds this
            many times the median distance of the round's well-formed updates
            (needs at least 3 of them; None disables the check).
    """
    rejected: dict[str, str] = {}
    norms: dict[str, float] = {}
    for site, update in updates.items():
        if set(update) != set(reference):
            missing, extra = (
                sorted(set(reference) - set(update)),
                sorted(set(update) - set(reference)),
            )
            rejected[site] = f"wrong tensors (missing {missing[:3]}, unexpected {extra[:3]})"
            continue
        bad_shape = next(
            (n for n, ref in reference.items() if np.shape(update[n]) != np.shape(ref)), None
        )
        if bad_shape is not None:
            rejected[site] = (
                f"wrong shape for {bad_shape}: {np.shape(update[bad_shape])} instead of "
                f"{np.shape(reference[bad_shape])}"
            )
            continue
        non_finite = next((n for n, arr in update.items() if not np.all(np.isfinite(arr))), None)
        if non_finite is not None:
            rejected[site] = f"non-finite values (NaN/Inf) in {non_finite}"
            continue
        norms[site] = update_norm(update, reference)
    if norm_factor is not None and len(norms) >= 3:
        median = float(np.median(list(norms.values())))
        for site, norm in norms.items():
            if median > 0 and norm > norm_factor * median:
                rejected[site] = (
                    f"update norm {norm:.3g} is {norm / median:.1f}x the round's median "
                    f"{median:.3g} (limit {norm_factor:g}x)"
                )
    return rejected
