"""Empirical privacy audit: a loss-threshold membership-inference attack at one site.

The attacker holds the final global model and one case, and guesses whether the case
was trained on from the model's loss on it: training cases ("members") tend to have a
lower loss than unseen ones. Its success over every threshold is the ROC AUC of the
negated per-case loss, members (the site's training cases) against non-members (its
validation cases): 0.5 is chance, 1.0 a perfect attack. The interval is a bootstrap
over cases (both groups resampled).

This is evidence, not a proof: one attack, one model, few cases. A low AUC does not show
that no stronger attack exists; DP-SGD's epsilon is the guarantee (it bounds every
attack), the AUC only shows how much a simple attacker gets in practice. It runs where
the data is and only the AUC and the case counts leave the site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from torch import nn

from fl_imaging.ml.training import segmentation_loss, whole_volume_logits

# fewer cases than this in either group: the AUC's interval spans most of [0, 1]
MIN_CASES = 10


@dataclass(frozen=True)
class MembershipAudit:
    """The attack's result at one site (no per-case values)."""

    site: str
    auc: float
    low: float  # bootstrap 2.5 % quantile
    high: float  # bootstrap 97.5 % quantile
    members: int  # training cases scored
    non_members: int  # validation cases scored

    @property
    def few_cases(self) -> bool:
        """Fewer than :data:`MIN_CASES` in either group: the AUC says little."""
        return min(self.members, self.non_members) < MIN_CASES

    def to_dict(self) -> dict[str, float | int | str]:
        """JSON-ready fields."""
        return asdict(self)


@torch.no_grad()
def case_losses(
    model: nn.Module, loader: torch.utils.data.DataLoader, roi_size: Sequence[int]
) -> list[float]:
    """DiceCE loss of ``model`` on each whole case of ``loader`` (one case per batch)."""
    loss_fn = segmentation_loss()
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for batch in loader:
        image, label = batch["image"].to(device), batch["label"].to(device)
        logits = whole_volume_logits(model, image, roi_size)
        losses.append(float(loss_fn(logits, label)))
    return losses


def attack_auc(member_losses: Sequence[float], non_member_losses: Sequence[float]) -> float:
    """ROC AUC of the loss-threshold attack (a lower loss means "member")."""
    scores = torch.as_tensor([*member_losses, *non_member_losses], dtype=torch.float64).neg()
    truth = torch.as_tensor([1] * len(member_losses) + [0] * len(non_member_losses))
    return float(compute_roc_auc(scores, truth))


def audit(
    site: str,
    member_losses: Sequence[float],
    non_member_losses: Sequence[float],
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> MembershipAudit:
    """The attack's AUC with a bootstrap interval over cases.

    Raises:
        ValueError: either group is empty (no AUC can be computed).
    """
    members, others = np.asarray(member_losses), np.asarray(non_member_losses)
    if len(members) == 0 or len(others) == 0:
        raise ValueError(
            f"site {site}: the audit needs training and validation cases, got "
            f"{len(members)} and {len(others)}"
        )
    rng = np.random.default_rng(seed)
    samples = [
        attack_auc(rng.choice(members, len(members)), rng.choice(others, len(others)))
        for _ in range(resamples)
    ]
    low, high = np.quantile(samples, [0.025, 0.975])
    return MembershipAudit(
        site, attack_auc(members, others), float(low), float(high), len(members), len(others)
    )
