"""Label conventions and region-based evaluation (BraTS: whole tumour, tumour core, enhancing).

Brain-tumour label maps hold exclusive classes (necrosis, oedema, enhancing tumour),
but clinicians and the BraTS challenges score nested *regions*: the whole tumour (WT,
every tumour label), the tumour core (TC, without oedema) and the enhancing tumour (ET).
``data.label_scheme`` names the convention of a federation's label values:

==============  ==========================================  =====================
scheme          labels                                      regions
==============  ==========================================  =====================
``exclusive``   any (default)                               none
``brats2021``   1 NCR/NET, 2 ED, 4 ET                       WT 1,2,4 TC 1,4 ET 4
``brats2023``   1 NCR, 2 ED, 3 ET                           WT 1,2,3 TC 1,3 ET 3
``msd_task01``  1 oedema, 2 non-enhancing, 3 enhancing      WT 1,2,3 TC 2,3 ET 3
==============  ==========================================  =====================

Region Dice and HD95 (MONAI's ``compute_hausdorff_distance`` at the 95th percentile, in
mm) follow the BraTS rule for empty regions: an empty prediction of an empty truth is
Dice 1 and HD95 0; one empty and the other not is Dice 0 and HD95 the volume's
diagonal (the largest distance possible in it). Every case counts in the mean, so a
site whose cases lack enhancing tumour is scored on whether it predicted none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config imports this module; the Flower app modules stay torch-free
    import torch

# scheme -> region name -> label values inside it
SCHEMES: dict[str, dict[str, tuple[int, ...]]] = {
    "exclusive": {},
    "brats2021": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    "brats2023": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
    "msd_task01": {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
}


def class_values(labels: Mapping[int, str]) -> list[int]:
    """The label values in training-class order: class ``i`` is label value ``values[i]``.

    The network has one output channel per declared label, so label maps with gaps
    (BraTS 2021: {0, 1, 2, 4}) are remapped to contiguous classes (0, 1, 2, 3) when a
    site loads them, and predictions are mapped back to label values when written.
    """
    return sorted(int(k) for k in labels)


def needs_remap(labels: Mapping[int, str]) -> bool:
    """True when the label values are not already 0 .. K-1 (then they are remapped)."""
    values = class_values(labels)
    return values != list(range(len(values)))


def regions_as_classes(
    regions: Mapping[str, Sequence[int]], labels: Mapping[int, str]
) -> dict[str, tuple[int, ...]]:
    """``regions`` with label values replaced by training classes (:func:`class_values`)."""
    index = {v: i for i, v in enumerate(class_values(labels))}
    return {name: tuple(index[v] for v in values if v in index) for name, values in regions.items()}


def regions_of(scheme: str) -> dict[str, tuple[int, ...]]:
    """The regions of ``scheme`` (empty for ``exclusive``).

    Raises:
        ValueError: an unknown scheme (the message lists the known ones).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown label scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    return SCHEMES[scheme]


def scheme_problems(scheme: str, labels: Mapping[int, str]) -> list[str]:
    """What in ``data.labels`` (value -> name) does not fit ``scheme`` (empty when it fits)."""
    if scheme not in SCHEMES:
        return [f"data.label_scheme {scheme!r} is unknown; choose one of {sorted(SCHEMES)}"]
    problems = []
    needed = sorted({v for values in SCHEMES[scheme].values() for v in values})
    missing = [v for v in needed if v not in labels]
    if missing:
        problems.append(
            f"data.label_scheme={scheme} needs label values {needed}; data.labels lacks {missing}"
        )
    clash = sorted(set(SCHEMES[scheme]) & {str(n) for n in labels.values()})
    if clash:
        problems.append(
            f"data.labels names {clash} clash with the {scheme} region names "
            f"{sorted(SCHEMES[scheme])} (both become dice_<name> columns): rename the labels"
        )
    return problems


def region_metrics(
    pred: torch.Tensor,
    truth: torch.Tensor,
    regions: Mapping[str, Sequence[int]],
    spacing: Sequence[float] | None = None,
) -> dict[str, tuple[float, float]]:
    """Dice and HD95 (mm) of each region between two integer label maps ``[X, Y, Z]``.

    Args:
        pred: predicted label values (argmax of the network), any integer dtype.
        truth: ground-truth label values, same shape.
        regions: region name -> label values (:data:`SCHEMES`).
        spacing: voxel size in mm (default 1 mm).

    Returns:
        ``{region: (dice, hd95)}`` with the BraTS rule for empty regions.
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != truth {tuple(truth.shape)}")
    spacing = [float(s) for s in (spacing or (1.0,) * pred.dim())]
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing, strict=True)))
    out = {}
    for name, values in regions.items():
        wanted = torch.as_tensor(list(values), device=pred.device)
        p = torch.isin(pred, wanted)[None, None].float()  # [1, 1, X, Y, Z]
        t = torch.isin(truth, wanted.to(truth.device))[None, None].float()
        p_empty, t_empty = not bool(p.any()), not bool(t.any())
        if p_empty and t_empty:
            out[name] = (1.0, 0.0)
        elif p_empty or t_empty:
            out[name] = (0.0, diagonal)
        else:
            dice = float(compute_dice(p, t, include_background=True)[0, 0])
            hd95 = float(
                compute_hausdorff_distance(
                    p, t, include_background=True, percentile=95, spacing=spacing
                )[0, 0]
            )
            out[name] = (dice, hd95)
    return out
