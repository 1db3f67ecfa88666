"""Local training and evaluation of a segmentation network at one site.

Free of Flower: the ClientApp (and a centralised baseline) call these directly.
Loss: MONAI ``DiceCELoss``; metric: MONAI ``DiceMetric`` per foreground class on
whole volumes with MONAI sliding-window inference.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.data import DataLoader, decollate_batch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.transforms import AsDiscrete
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did."""

    loss: float  # mean DiceCE loss over the round's steps
    steps: int
    num_examples: int  # training cases (the FedAvg weight)
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Validation of one model on one site's validation cases."""

    loss: float  # mean DiceCE loss over cases
    dice_per_class: dict[
        int, float
    ]  # foreground label -> mean Dice over cases (NaN: never present)
    num_cases: int

    @property
    def dice_mean(self) -> float:
        """Mean of the per-class Dice, ignoring classes absent from every case."""
        values = [v for v in self.dice_per_class.values() if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")


def segmentation_loss() -> DiceCELoss:
    """The training loss: Dice + cross-entropy on softmax logits vs integer labels."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


def train_local(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    log_prefix: str = "",
) -> TrainResult:
    """Train ``model`` in place on ``loader`` for ``epochs`` epochs with Adam.

    The optimiser is created afresh each round: its moments describe the previous
    global model, not the one just received. With ``proximal_mu > 0`` (FedProx) the
    loss gains ``mu/2 * ||w - w_start||^2``, ``w_start`` being the received weights.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    loss_fn = segmentation_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    start = time.perf_counter()
    total, steps = 0.0, 0
    for epoch in range(1, epochs + 1):
        epoch_loss, epoch_steps = 0.0, 0
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch["image"]), batch["label"])
            if anchor:
                drift = sum(
                    (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
                loss = loss + 0.5 * proximal_mu * drift
            loss.backward()
            optimizer.step()
            epoch_loss += float(loss.detach())
            epoch_steps += 1
        total += epoch_loss
        steps += epoch_steps
        logger.debug(
            "%sepoch %d/%d loss %.4f (%d steps)",
            log_prefix,
            epoch,
            epochs,
            epoch_loss / max(epoch_steps, 1),
            epoch_steps,
        )
    return TrainResult(
        loss=total / max(steps, 1),
        steps=steps,
        num_examples=len(loader.dataset),
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    num_classes: int,
    roi_size: Sequence[int],
) -> EvalResult:
    """Dice per foreground class of ``model`` on whole volumes.

    Args:
        model: network producing ``[1, num_classes, X, Y, Z]`` logits.
        loader: batches of one whole case ``{"image": [1, C, X, Y, Z], "label": [1, 1, X, Y, Z]}``.
        num_classes: classes including background.
        roi_size: sliding-window size in voxels (the training patch size).
    """
    loss_fn = segmentation_loss()
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    to_pred = AsDiscrete(argmax=True, to_onehot=num_classes)
    to_onehot = AsDiscrete(to_onehot=num_classes)
    model.eval()
    total_loss, cases = 0.0, 0
    for batch in loader:
        logits = sliding_window_inference(
            batch["image"],
            roi_size=tuple(roi_size),
            sw_batch_size=4,
            predictor=model,
            overlap=0.25,
        )
        total_loss += float(loss_fn(logits, batch["label"]))
        preds = [to_pred(x) for x in decollate_batch(logits)]
        labels = [to_onehot(y) for y in decollate_batch(batch["label"])]
        metric(y_pred=preds, y=labels)
        cases += 1
    if cases == 0:
        raise ValueError("evaluation loader is empty")
    per_class = metric.aggregate().tolist()
    metric.reset()
    return EvalResult(
        loss=total_loss / cases,
        dice_per_class={
            label: float(d) for label, d in zip(range(1, num_classes), per_class, strict=True)
        },
        num_cases=cases,
    )
