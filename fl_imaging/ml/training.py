"""Local training and evaluation of a segmentation network at one site.

Free of Flower: the ClientApp (and a centralised baseline) call these directly.
Loss: MONAI ``DiceCELoss``; metric: MONAI ``DiceMetric`` per foreground class on
whole volumes with MONAI sliding-window inference.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.data import DataLoader, decollate_batch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.transforms import AsDiscrete
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from fl_imaging.config import TrainConfig
from fl_imaging.data.regions import region_metrics
from fl_imaging.ml.devices import autocast, new_grad_scaler, place_batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did."""

    loss: float  # mean DiceCE loss over the round's steps
    steps: int
    num_examples: int  # training cases (the FedAvg weight)
    seconds: float
    started_at: float = 0.0  # Unix time at which the local training began
    # peak GPU memory of the round in MiB (torch.cuda.max_memory_allocated); 0 on a CPU
    gpu_peak_mb: float = 0.0


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


class PerVolumeLoss(nn.Module):
    """``loss`` of each volume of a batch on its own, averaged over the batch.

    A class-weighted cross-entropy averaged over a whole batch divides by the batch's
    summed voxel weights, so one patient's labels would scale every other patient's
    gradient: under DP-SGD a patient could then change other patients' (unclipped)
    contributions, beyond the clipping norm the accountant assumes. Computed volume by
    volume, each patient's loss and per-sample gradient depend on that patient alone.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of ``loss(input[i:i+1], target[i:i+1])``."""
        per_volume = [self.loss(input[i : i + 1], target[i : i + 1]) for i in range(len(input))]
        return torch.stack(per_volume).mean()


def segmentation_loss(
    class_weights: Sequence[float] | None = None, device: torch.device | None = None
) -> nn.Module:
    """The training loss: Dice + cross-entropy on softmax logits vs integer labels.

    ``class_weights`` (one per class, background first; None: all 1) rescale each
    class's voxels in both terms (MONAI's ``weight``); ``device``: where they live.
    With weights the loss is computed per volume (:class:`PerVolumeLoss`); without,
    MONAI's batch mean already is the mean of per-volume losses (equal-sized patches,
    per-sample Dice).
    """
    if class_weights is None:
        return DiceCELoss(to_onehot_y=True, softmax=True)
    weight = torch.tensor(class_weights, device=device)
    return PerVolumeLoss(DiceCELoss(to_onehot_y=True, softmax=True, weight=weight))


def _pair(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, label)`` from a MONAI dict batch or an ``(image, label)`` tuple batch."""
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    image, label = batch
    return image, label


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


OPTIMIZERS = ("adam", "sgd")


def new_optimizer(
    parameters: Iterable[nn.Parameter],
    name: str = "adam",
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """The local optimiser ``train.optimizer`` names: ``adam`` or ``sgd`` (with momentum).

    A new one each round: old moments describe the previous global model. Under DP-SGD,
    SGD with momentum averages the noise over steps, while Adam divides every
    coordinate by its own (noise-dominated) scale and so moves every weight by about
    ``lr`` per step whatever the signal (docs/RESULTS.md: the private recipe).
    """
    params = [p for p in parameters if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer {name!r} is unknown; choose one of {list(OPTIMIZERS)}")


class WeightAverage:
    """Exponential moving average of a model's trainable weights over its local steps.

    Uses ``torch.optim.swa_utils``' EMA update; :meth:`copy_to` writes the average back
    into the model at the end of the round, so the update sent is the averaged one.
    Averaging the iterates is post-processing: it costs no privacy under DP-SGD.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._average = [p.detach().clone() for p in self._params]
        self._update = get_ema_multi_avg_fn(decay)
        self._count = torch.zeros((), dtype=torch.long)

    def update(self) -> None:
        """Fold the model's current weights into the average (after each step)."""
        self._update(self._average, [p.detach() for p in self._params], self._count)
        self._count += 1

    @torch.no_grad()
    def copy_to(self) -> None:
        """Replace the model's trainable weights by their average."""
        for param, average in zip(self._params, self._average, strict=True):
            param.copy_(average)


def round_lr(lr: float, schedule: str, server_round: int, rounds: int) -> float:
    """The learning rate of round ``server_round`` (1-based) of a run of ``rounds``.

    ``constant``: ``lr``. ``cosine``: ``lr * (1 + cos(pi * (r - 1) / rounds)) / 2``, the
    cosine annealing of ``torch.optim.lr_scheduler.CosineAnnealingLR`` taken per round
    (each round's optimiser is new): ``lr`` in round 1, about 2.5 % of it in the last
    of 10. Rounds past ``rounds`` (a fine-tune after the run) get the last round's.
    """
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    done = min(max(server_round, 1), max(rounds, 1)) - 1
    return lr * (1.0 + math.cos(math.pi * done / max(rounds, 1))) / 2.0


@dataclass(frozen=True)
class LocalRecipe:
    """How a site trains in one round: epochs, optimiser and what it logs.

    The ``train`` config group's leaves (:meth:`from_config`), plus the round's own
    epochs and FedProx weight; DP-SGD takes the same recipe with its own settings.
    """

    epochs: int = 1  # passes over the loader
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam or sgd (with momentum), see new_optimizer
    momentum: float = 0.9  # SGD momentum
    # end the round with the exponential moving average of the weights over its steps
    # (WeightAverage); None: the last weights
    ema_decay: float | None = None
    # FedProx: adds mu/2 * ||w - w_start||^2 to the loss, w_start the received weights
    proximal_mu: float = 0.0
    # per-class loss weights, background first (segmentation_loss); None: all 1
    class_weights: tuple[float, ...] | None = None
    log_prefix: str = ""  # prefix of the per-epoch log lines (site and round)
    log_epochs: bool = False  # log each epoch at INFO (else DEBUG)
    # mixed precision of the forward pass (off, bf16, fp16: fl_imaging.ml.devices)
    amp: str = "off"
    # batches in channels_last_3d layout (the model placed so by the caller)
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}")

    @classmethod
    def from_config(
        cls,
        train: TrainConfig,
        *,
        epochs: int,
        proximal_mu: float = 0.0,
        log_prefix: str = "",
        server_round: int = 1,
        rounds: int = 1,
    ) -> LocalRecipe:
        """The recipe of the ``train`` config group for a round of ``epochs`` epochs.

        ``server_round`` of ``rounds`` sets the learning rate (``train.lr_schedule``).
        """
        return cls(
            epochs=epochs,
            lr=round_lr(train.lr, train.lr_schedule, server_round, rounds),
            weight_decay=train.weight_decay,
            optimizer=train.optimizer,
            momentum=train.momentum,
            ema_decay=train.ema_decay,
            proximal_mu=proximal_mu,
            class_weights=None if train.class_weights is None else tuple(train.class_weights),
            log_prefix=log_prefix,
            log_epochs=train.progress == "epoch",
            amp=train.amp,
            channels_last=train.channels_last,
        )

    def new_optimizer(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """This recipe's optimiser over the trainable ``parameters``."""
        return new_optimizer(
            parameters,
            self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
        )


@dataclass
class _RoundSteps:
    """What every step of one :func:`train_local` round shares, built once per round."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    device: torch.device  # batches follow the model (CPU, or a GPU share of the site)
    amp: str  # the forward pass's autocast (off, bf16, fp16)
    channels_last: bool  # batches in channels_last_3d layout
    scaler: torch.amp.GradScaler | None  # fp16's loss scaler (None: no scaling)
    average: WeightAverage | None  # the EMA of the weights (None: off)
    anchor: Sequence[torch.Tensor]  # FedProx's received weights (empty: no term)
    proximal_mu: float
    on_empty_batch: Callable[[], None] | None  # DP-SGD accounts for a skipped batch
    before_step: Callable[[int], None] | None  # DP-SGD folds the views per case

    @classmethod
    def start(
        cls,
        model: nn.Module,
        recipe: LocalRecipe,
        optimizer: torch.optim.Optimizer | None,
        on_empty_batch: Callable[[], None] | None,
        before_step: Callable[[int], None] | None,
    ) -> _RoundSteps:
        """The round's shared state, taken from ``model`` as received (FedProx's anchor)."""
        device = _device_of(model)
        return cls(
            model=model,
            optimizer=recipe.new_optimizer(model.parameters()) if optimizer is None else optimizer,
            loss_fn=segmentation_loss(recipe.class_weights, device),
            device=device,
            amp=recipe.amp,
            channels_last=recipe.channels_last,
            scaler=new_grad_scaler(device, recipe.amp),
            average=WeightAverage(model, recipe.ema_decay) if recipe.ema_decay else None,
            anchor=[p.detach().clone() for p in model.parameters()] if recipe.proximal_mu else [],
            proximal_mu=recipe.proximal_mu,
            on_empty_batch=on_empty_batch,
            before_step=before_step,
        )


def train_local(
    model: nn.Module,
    loader: DataLoader,
    recipe: LocalRecipe,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    on_empty_batch: Callable[[], None] | None = None,
    before_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``loader`` for ``recipe.epochs`` epochs.

    Args:
        model: the network (or Opacus' wrapper of it).
        loader: batches ``{"image": [B, C, X, Y, Z], "label": [B, 1, X, Y, Z]}`` or
            ``(image, label)`` tuples (Opacus' Poisson loader); B may be 0. Tuples may
            hold K augmented views of each case, ``[B, K, C, X, Y, Z]``: the network sees
            ``B * K`` volumes (augmentation multiplicity, see ``before_step``).
        recipe: epochs, optimiser settings, EMA, FedProx and logging.
        optimizer: a ready optimizer (e.g. Opacus' DP optimizer); default: the recipe's.
        on_empty_batch: called instead of a step for an empty batch (DP-SGD accounts
            for it); empty batches are skipped when None.
        before_step: called with the batch's number of cases after the backward pass
            and before the optimiser step (DP-SGD folds the views' per-sample
            gradients into one per case there).
    """
    round_steps = _RoundSteps.start(model, recipe, optimizer, on_empty_batch, before_step)
    on_gpu = round_steps.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(round_steps.device)
    model.train()
    started_at, start = time.time(), time.perf_counter()
    total, steps, batches = 0.0, 0, 0
    for epoch in range(1, recipe.epochs + 1):
        epoch_loss, epoch_steps, epoch_batches = _train_epoch(round_steps, loader)
        total += epoch_loss
        steps += epoch_steps
        batches += epoch_batches
        logger.log(
            logging.INFO if recipe.log_epochs else logging.DEBUG,
            "%sepoch %d/%d loss %.4f (%d steps, %.1f s)",
            recipe.log_prefix,
            epoch,
            recipe.epochs,
            epoch_loss / max(epoch_batches, 1),
            epoch_steps,
            time.perf_counter() - start,
        )
    if round_steps.average is not None:
        round_steps.average.copy_to()
    return TrainResult(
        loss=total / max(batches, 1),
        steps=steps,
        num_examples=len(loader.dataset),
        seconds=time.perf_counter() - start,
        started_at=started_at,
        gpu_peak_mb=torch.cuda.max_memory_allocated(round_steps.device) / 2**20 if on_gpu else 0.0,
    )


def _train_epoch(steps: _RoundSteps, loader: DataLoader) -> tuple[float, int, int]:
    """One pass over ``loader``; returns (summed batch loss, optimiser steps, batches)."""
    epoch_loss, epoch_steps, epoch_batches = 0.0, 0, 0
    for batch in loader:
        image, label = _pair(batch)
        if image.shape[0] == 0:
            if steps.on_empty_batch is not None:
                steps.on_empty_batch()
            continue
        epoch_loss += _train_step(steps, image, label)
        epoch_batches += 1
        if getattr(steps.optimizer, "_is_last_step_skipped", False):
            continue  # a piece of a larger DP-SGD batch: its step comes with the last piece
        if steps.average is not None:
            steps.average.update()
        epoch_steps += 1
    return epoch_loss, epoch_steps, epoch_batches


def _train_step(steps: _RoundSteps, image: torch.Tensor, label: torch.Tensor) -> float:
    """One optimiser step on a non-empty batch; returns its loss.

    ``image`` is ``[B, C, *spatial]`` or ``[B, K, C, *spatial]`` (K augmented views of
    each case, trained as ``B * K`` volumes; ``before_step`` gets B).
    """
    cases = image.shape[0]
    if image.dim() == 6:  # [B, K, C, *spatial]: K augmented views of each case
        image, label = image.flatten(0, 1), label.flatten(0, 1)
    image = place_batch(image, steps.device, channels_last=steps.channels_last)
    label = place_batch(label, steps.device, channels_last=steps.channels_last)
    model, optimizer = steps.model, steps.optimizer
    optimizer.zero_grad(set_to_none=True)
    with autocast(steps.device, steps.amp):
        logits = model(image)
    loss = steps.loss_fn(logits.float(), label)  # the loss in float32 whatever the autocast
    if steps.anchor:
        drift = sum(
            (p - a).pow(2).sum() for p, a in zip(model.parameters(), steps.anchor, strict=True)
        )
        loss = loss + 0.5 * steps.proximal_mu * drift
    # fp16: a scaled backward, and the step is skipped when a gradient overflowed
    (loss if steps.scaler is None else steps.scaler.scale(loss)).backward()
    if steps.before_step is not None:
        steps.before_step(cases)
    if steps.scaler is None:
        optimizer.step()
    else:
        steps.scaler.step(optimizer)
        steps.scaler.update()
    return float(loss.detach())


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
    amp: str = "off",
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
        regions: region name -> label values (:mod:`fl_imaging.data.regions`): also Dice and
            HD95 of each region, averaged over every case (BraTS rule for empty ones).
        spacing: voxel size in mm of the evaluated volumes (HD95 in mm); default 1 mm.
        amp: the forward pass's autocast (``train.amp``); Dice and loss use float32 logits.
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
        logits = whole_volume_logits(model, image, roi_size, amp=amp)
        total_loss += float(loss_fn(logits, label))
        preds = [to_pred(x) for x in decollate_batch(logits)]
        labels = [to_onehot(y) for y in decollate_batch(label)]
        metric(y_pred=preds, y=labels)
        if regions:
            found = region_metrics(
                logits[0].argmax(0), label[0, 0].round().long(), regions, spacing
            )
            for name, values in found.items():
                per_region[name].append(values)
        cases += 1
    if cases == 0:
        raise ValueError("evaluation loader is empty")
    per_case = metric.aggregate()  # [cases, num_classes - 1], NaN where the truth is empty
    metric.reset()
    return EvalResult(
        loss=total_loss / cases,
        dice_per_class=_dice_per_class(per_case, num_classes, foreground),
        num_cases=cases,
        regions={
            name: (sum(d for d, _ in v) / len(v), sum(h for _, h in v) / len(v))
            for name, v in per_region.items()
        },
    )


def whole_volume_logits(
    model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], *, amp: str = "off"
) -> torch.Tensor:
    """MONAI sliding-window float32 logits ``[B, classes, X, Y, Z]`` of ``image`` ``[B, C, *]``.

    Windows of ``roi_size`` voxels (the training patch), a quarter overlapping; ``amp``:
    the windows' autocast (``train.amp``).
    """
    with autocast(image.device, amp):
        logits = sliding_window_inference(
            image, roi_size=tuple(roi_size), sw_batch_size=4, predictor=model, overlap=0.25
        )
    return logits.float()


def _dice_per_class(
    per_case: torch.Tensor, num_classes: int, foreground: Sequence[int] | None
) -> dict[int, float]:
    """Mean Dice of each wanted foreground label over ``per_case`` ``[cases, classes - 1]``.

    NaN entries (the label is absent from a case's truth) are left out; a label absent
    from every case gets NaN.
    """
    per_class = torch.nanmean(per_case, dim=0).tolist()
    wanted = set(foreground) if foreground is not None else set(range(1, num_classes))
    return {
        label: float(d)
        for label, d in zip(range(1, num_classes), per_class, strict=True)
        if label in wanted
    }
