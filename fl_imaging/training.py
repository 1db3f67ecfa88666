"""Local training and evaluation of a segmentation network at one site.

Free of Flower: the ClientApp (and a centralised baseline) call these directly.
Loss: MONAI ``DiceCELoss``; metric: MONAI ``DiceMetric`` per foreground class on
whole volumes with MONAI sliding-window inference.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.data import DataLoader, decollate_batch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.transforms import AsDiscrete
from torch import nn

from fl_imaging.regions import region_metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did."""

    loss: float  # mean DiceCE loss over the round's steps
    steps: int
    num_examples: int  # training cases (the FedAvg weight)
    seconds: float
    started_at: float = 0.0  # Unix time at which the local training began


@dataclass(frozen=True)
class EvalResult:
    """Validation of one model on one site's validation cases."""

    loss: float  # mean DiceCE loss over cases
    # foreground label -> mean Dice over the cases whose truth has it (NaN: none has)
    dice_per_class: dict[int, float]
    num_cases: int
    # region name -> (mean Dice, mean HD95 in mm) over cases (data.label_scheme regions)
    regions: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def dice_mean(self) -> float:
        """Mean of the per-class Dice, ignoring classes absent from every case."""
        values = [v for v in self.dice_per_class.values() if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")


def segmentation_loss() -> DiceCELoss:
    """The training loss: Dice + cross-entropy on softmax logits vs integer labels."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


def _pair(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, label)`` from a MONAI dict batch or an ``(image, label)`` tuple batch."""
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    image, label = batch
    return image, label


def select_device(name: str) -> torch.device:
    """The torch device ``train.device`` names: ``auto`` (CUDA when present), ``cpu``, ``cuda[:i]``.

    Raises:
        ValueError: a CUDA device is asked for on a machine without one.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but this machine has no CUDA device; use auto")
    return device


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_local(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    on_empty_batch: Callable[[], None] | None = None,
    log_prefix: str = "",
    log_epochs: bool = False,
) -> TrainResult:
    """Train ``model`` in place on ``loader`` for ``epochs`` epochs.

    Args:
        model: the network (or Opacus' wrapper of it).
        loader: batches ``{"image": [B, C, X, Y, Z], "label": [B, 1, X, Y, Z]}`` or
            ``(image, label)`` tuples (Opacus' Poisson loader); B may be 0.
        epochs: passes over ``loader``.
        lr: Adam learning rate when no ``optimizer`` is given.
        weight_decay: Adam weight decay when no ``optimizer`` is given.
        proximal_mu: FedProx: adds ``mu/2 * ||w - w_start||^2`` to the loss, ``w_start``
            being the received weights.
        optimizer: a ready optimizer (e.g. Opacus' DP optimizer); default: a new Adam.
            A new one each round: old moments describe the previous global model.
        on_empty_batch: called instead of a step for an empty batch (DP-SGD accounts
            for it); empty batches are skipped when None.
        log_prefix: prefix of the per-epoch log lines (site and round).
        log_epochs: log each epoch at INFO (else DEBUG).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    loss_fn = segmentation_loss()
    device = _device_of(model)  # batches follow the model (CPU, or a GPU share of the site)
    model.train()
    started_at, start = time.time(), time.perf_counter()
    total, steps = 0.0, 0
    for epoch in range(1, epochs + 1):
        epoch_loss, epoch_steps = 0.0, 0
        for batch in loader:
            image, label = _pair(batch)
            if image.shape[0] == 0:
                if on_empty_batch is not None:
                    on_empty_batch()
                continue
            image, label = image.to(device), label.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(image), label)
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
        logger.log(
            logging.INFO if log_epochs else logging.DEBUG,
            "%sepoch %d/%d loss %.4f (%d steps, %.1f s)",
            log_prefix,
            epoch,
            epochs,
            epoch_loss / max(epoch_steps, 1),
            epoch_steps,
            time.perf_counter() - start,
        )
    return TrainResult(
        loss=total / max(steps, 1),
        steps=steps,
        num_examples=len(loader.dataset),
        seconds=time.perf_counter() - start,
        started_at=started_at,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    num_classes: int,
    roi_size: Sequence[int],
    foreground: Sequence[int] | None = None,
    regions: Mapping[str, Sequence[int]] | None = None,
    spacing: Sequence[float] | None = None,
) -> EvalResult:
    """Dice per foreground class of ``model`` on whole volumes.

    A class absent from a case's ground truth is left out of that case (MONAI's
    ``ignore_empty``), and a class absent from every case gets NaN and is left out of
    :attr:`EvalResult.dice_mean`: never averaged in as 0. (MONAI 1.6's ``mean_batch``
    reduction returns 0.0 for such a class, so the per-case values are reduced here.)

    Args:
        model: network producing ``[1, num_classes, X, Y, Z]`` logits.
        loader: batches of one whole case ``{"image": [1, C, X, Y, Z], "label": [1, 1, X, Y, Z]}``.
        num_classes: classes including background.
        roi_size: sliding-window size in voxels (the training patch size).
        foreground: the foreground labels to report (default: 1 .. num_classes - 1).
        regions: region name -> label values (:mod:`fl_imaging.regions`): also Dice and
            HD95 of each region, averaged over every case (BraTS rule for empty ones).
        spacing: voxel size in mm of the evaluated volumes (HD95 in mm); default 1 mm.
    """
    loss_fn = segmentation_loss()
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    to_pred = AsDiscrete(argmax=True, to_onehot=num_classes)
    to_onehot = AsDiscrete(to_onehot=num_classes)
    model.eval()
    device = _device_of(model)
    total_loss, cases = 0.0, 0
    per_region: dict[str, list[tuple[float, float]]] = {name: [] for name in regions or {}}
    for batch in loader:
        image, label = batch["image"].to(device), batch["label"].to(device)
        logits = sliding_window_inference(
            image,
            roi_size=tuple(roi_size),
            sw_batch_size=4,
            predictor=model,
            overlap=0.25,
        )
        total_loss += float(loss_fn(logits, label))
        preds = [to_pred(x) for x in decollate_batch(logits)]
        labels = [to_onehot(y) for y in decollate_batch(label)]
        metric(y_pred=preds, y=labels)
        if regions:
            found = region_metrics(logits[0].argmax(0), label[0, 0].round().long(), regions,
                                   spacing)  # fmt: skip
            for name, values in found.items():
                per_region[name].append(values)
        cases += 1
    if cases == 0:
        raise ValueError("evaluation loader is empty")
    per_case = metric.aggregate()  # [cases, num_classes - 1], NaN where the truth is empty
    metric.reset()
    per_class = torch.nanmean(per_case, dim=0).tolist()  # NaN: absent from every case
    wanted = set(foreground) if foreground is not None else set(range(1, num_classes))
    return EvalResult(
        loss=total_loss / cases,
        dice_per_class={
            label: float(d)
            for label, d in zip(range(1, num_classes), per_class, strict=True)
            if label in wanted
        },
        num_cases=cases,
        regions={
            name: (sum(d for d, _ in v) / len(v), sum(h for _, h in v) / len(v))
            for name, v in per_region.items()
        },
    )
