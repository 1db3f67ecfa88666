"""DP-SGD for one site's round with Opacus: per-sample clipping, Gaussian noise, Poisson sampling.

The PrivacyEngine is new each round (ClientApps are short-lived) but its
accountant starts from the site's ledger history, so the epsilon it reports is
cumulative over every round and run. The accounting describes exactly the
training that ran: the same loader, its Poisson sampling rate, the same noise.

The noise and the Poisson sampling come from generators seeded by the OS's secure
source (:mod:`fl_imaging.privacy.randomness`), never from ``plan.seed`` or the global
torch RNG, which the coordinator can know; the noise uses Opacus' floating-point-safe
sampling (``secure_mode`` of its optimizer).

With augmentation multiplicity (``privacy.augmentations`` = K > 1) each sampled
patient contributes K augmented views; their per-sample gradients are averaged into
one gradient per patient *before* clipping (:func:`fold_views`), so the unit that is
clipped, noised and accounted stays one patient.

An empty Poisson batch (every patient left out by the sampler) is skipped: no
gradient and no noise are added, the weights do not move, yet the step is counted by
the accountant. That is conservative: the released weights depend on the step only
through whether it happened, which the sampler, not the data, decides.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from fl_imaging.config import PrivacyConfig
from fl_imaging.ml.training import LocalRecipe, TrainResult, train_local
from fl_imaging.privacy import grad_samplers
from fl_imaging.privacy.accounting import History
from fl_imaging.privacy.randomness import secret_generator

logger = logging.getLogger(__name__)

# Opacus' hooks mode then uses fl-imaging's convolution and PReLU samplers.
grad_samplers.register()


class PrivacyModelError(ValueError):
    """The network cannot be trained with per-sample gradients (e.g. BatchNorm)."""


def check_private_model(model: nn.Module) -> None:
    """Raise :class:`PrivacyModelError` listing every layer Opacus cannot handle."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        details = "; ".join(str(e) for e in errors)
        raise PrivacyModelError(
            f"model is not compatible with DP-SGD: {details}. Use model.norm=instance"
        )


def fold_views(parameters: Sequence[nn.Parameter], cases: int) -> None:
    """Average each parameter's per-sample gradients over the views of one case.

    Opacus' hooks leave ``p.grad_sample`` with one row per network input, ``cases * K``
    rows in the order ``[case 0 view 0 .. K-1, case 1 ...]`` (the batch flattened by
    :func:`fl_imaging.ml.training.train_local`); afterwards it has one row per case, which
    Opacus then clips to ``max_grad_norm`` and noises: one patient, one contribution.
    """
    for p in parameters:
        grad_sample = getattr(p, "grad_sample", None)
        if grad_sample is None or grad_sample.shape[0] == cases:
            continue
        if grad_sample.shape[0] % cases:
            raise RuntimeError(
                f"{grad_sample.shape[0]} per-sample gradients do not split into {cases} cases"
            )
        views = grad_sample.shape[0] // cases
        p.grad_sample = grad_sample.view(cases, views, *grad_sample.shape[1:]).mean(dim=1)


def clip_in_float32(parameters: Sequence[nn.Parameter]) -> None:
    """Make each per-sample gradient float32 before Opacus measures and clips it.

    Under ``train.amp=bf16`` Opacus' hooks compute per-sample gradients in bfloat16,
    whose 8-bit mantissa would put the norm that decides the clipping factor (and so
    the clipped contribution) up to about 0.4 % off ``max_grad_norm``. The per-sample
    gradient may be computed in any precision (it is still a function of one patient);
    its clipping and the noise must be exact, so they run in float32.
    """
    for p in parameters:
        grad_sample = getattr(p, "grad_sample", None)
        if grad_sample is not None and grad_sample.dtype != torch.float32:
            p.grad_sample = grad_sample.float()


ClipGroup = tuple[list[nn.Parameter], float]  # a group's weights and its clipping norm


def clipping_groups(
    model: nn.Module, shares: Sequence[tuple[str, float]], max_grad_norm: float
) -> list[ClipGroup]:
    """The trainable weights split by ``privacy.clip_groups``; each group with its norm.

    A group per prefix (norm ``share x max_grad_norm``) and one of the weights in no
    group (``sqrt(1 - sum share^2) x max_grad_norm``): their norms' squares sum to
    ``max_grad_norm^2``. Empty ``shares``: no groups.

    Raises:
        ValueError: a share outside (0, 1) or squares summing to 1 or more, a prefix
            matching no trainable weight, or a weight matching two prefixes.
    """
    if not shares:
        return []
    squares = sum(share * share for _, share in shares)
    if any(not 0 < share < 1 for _, share in shares) or squares >= 1:
        raise ValueError(
            f"privacy.clip_groups {dict(shares)}: each share in (0, 1), squares summing below 1"
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups: list[ClipGroup] = [([], share * max_grad_norm) for _, share in shares]
    rest: list[nn.Parameter] = []
    for name, param in named:
        hits = [i for i, (prefix, _) in enumerate(shares) if name.startswith(prefix)]
        if len(hits) > 1:
            raise ValueError(f"privacy.clip_groups: weight {name} matches several prefixes")
        (groups[hits[0]][0] if hits else rest).append(param)
    empty = [prefix for (prefix, _), (params, _) in zip(shares, groups, strict=True) if not params]
    if empty:
        raise ValueError(f"privacy.clip_groups {empty} match no trainable weight of the model")
    return [*groups, (rest, math.sqrt(1 - squares) * max_grad_norm)]


def clip_groups(groups: Sequence[ClipGroup]) -> None:
    """Clip each patient's gradient over each group's weights to that group's norm.

    Runs on the per-sample gradients before Opacus' flat clipping, which still clips
    each patient's whole gradient to ``max_grad_norm`` (so the sensitivity, noise and
    accounting are those of flat clipping whatever happens here); since the groups'
    norms have squares summing to ``max_grad_norm^2``, that last clipping keeps the
    groups' shares. Without groups one part of the network (e.g. the output stage) can
    take nearly all of a patient's norm while every weight gets the same noise.
    """
    for params, norm in groups:
        samples = [p for p in params if getattr(p, "grad_sample", None) is not None]
        if not samples:
            continue
        per_sample = torch.stack(
            [p.grad_sample.reshape(len(p.grad_sample), -1).norm(dim=1) for p in samples], dim=1
        ).norm(dim=1)
        factor = (norm / (per_sample + 1e-6)).clamp(max=1.0)
        for p in samples:
            p.grad_sample = p.grad_sample * factor.view(-1, *[1] * (p.grad_sample.dim() - 1))


def held_norms(model: nn.Module) -> list[tuple[nn.Parameter, float]]:
    """The kernels ``privacy.hold_norms`` keeps at their initial norm, with that norm.

    Every trainable weight of two or more dimensions (a convolution kernel) except the
    last one in the model's order (the output layer, whose norm sets the logits'
    scale). The norm is that of PyTorch's default initialisation of a tensor of that
    shape (uniform in ``+-1 / sqrt(fan_in)``, ``fan_in = numel / shape[0]``), in
    expectation ``sqrt(shape[0] / 3)``: a function of the shape only, never of data.
    """
    kernels = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    return [(p, math.sqrt(p.shape[0] / 3)) for p in kernels[:-1]]


@torch.no_grad()
def hold_norms(held: Sequence[tuple[nn.Parameter, float]]) -> None:
    """Rescale each kernel of ``held`` to its norm (after an optimiser step).

    Isotropic DP noise mostly adds length to a kernel: measured at epsilon 8, the
    kernels' norms grow 2-7x over 10 rounds. A kernel followed by a normalisation
    computes the same function at any length, but its gradient shrinks as ``1 /
    length``: its share of each patient's clipped gradient falls as ``1 / length^2``
    and its angular step with it: the noise anneals the learning rate of the layers it
    inflates. Holding the norm keeps both as at initialisation. Measured, that annealing
    is what the private runs need: held norms ended lower on the synthetic hospitals at
    every learning rate tried (docs/RESULTS.md), so it is off by default. It only
    transforms the already noisy weights (post-processing): sensitivity, noise and
    accounting are unchanged.
    """
    for param, norm in held:
        param.mul_(norm / param.norm().clamp_min(1e-12))


def is_trainable(name: str, trainable: Sequence[str]) -> bool:
    """Whether parameter ``name`` trains under ``privacy.trainable`` (empty: every one)."""
    return not trainable or any(name.startswith(t) for t in trainable)


def freeze_except(model: nn.Module, trainable: Sequence[str]) -> list[str]:
    """Train only the parameters whose name starts with one of ``trainable`` (all: empty).

    Frozen weights get no per-sample gradients and no noise; they are sent back as
    received. Returns the names of the trainable parameters.

    Raises:
        ValueError: a prefix matches no parameter (a typo would silently train nothing).
    """
    names = [name for name, _ in model.named_parameters()]
    if not trainable:
        return names
    unmatched = [t for t in trainable if not any(n.startswith(t) for n in names)]
    if unmatched:
        raise ValueError(
            f"privacy.trainable {unmatched} match no parameter of the model; its parameters "
            f"start with e.g. {sorted({n.rsplit('.', 2)[0] for n in names})[:6]}"
        )
    kept = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, trainable))
        if param.requires_grad:
            kept.append(name)
    return kept


@dataclass(frozen=True)
class DpSgdSettings:
    """The DP-SGD side of a site's round (the ``privacy`` config group and the noise plan)."""

    noise_multiplier: float  # Gaussian noise std / max_grad_norm
    max_grad_norm: float  # per-sample (per-patient) gradient clipping norm
    accountant: str = "rdp"  # Opacus accountant: rdp, prv or gdp
    # Opacus per-sample-gradient mode; hooks uses fl_imaging.privacy.grad_samplers
    grad_sample_mode: str = "hooks"
    # flat (one norm over all weights) or per_layer (each weight tensor clipped to
    # max_grad_norm / sqrt(tensors): the same sensitivity, noise and accounting)
    clipping: str = "flat"
    # split larger Poisson batches into pieces of at most this many cases (Opacus'
    # BatchMemoryManager: one noisy step per logical batch, the same privacy); 0: no limit
    max_physical_batch: int = 0
    # parameter-name prefixes to train (empty: all), see freeze_except
    trainable: Sequence[str] = ()
    # (prefix, share of max_grad_norm) per clipping group, see clip_groups; empty: off
    clip_shares: Sequence[tuple[str, float]] = ()
    # keep the trained kernels at their initial norms after every step, see hold_norms
    hold_norms: bool = False

    @classmethod
    def from_config(
        cls,
        privacy: PrivacyConfig,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        accountant: str,
    ) -> DpSgdSettings:
        """The ``privacy`` group's settings with the site's planned noise and its request."""
        return cls(
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            accountant=accountant,
            grad_sample_mode=privacy.grad_sample_mode,
            clipping=privacy.clipping,
            max_physical_batch=privacy.max_physical_batch,
            trainable=tuple(privacy.trainable),
            clip_shares=tuple((g.prefix, g.share) for g in privacy.clip_groups),
            hold_norms=privacy.hold_norms,
        )


def train_private(
    model: nn.Module,
    loader: DataLoader,
    recipe: LocalRecipe,
    dp: DpSgdSettings,
    *,
    history: Sequence[Sequence[float]],
) -> tuple[dict[str, torch.Tensor], TrainResult, History]:
    """Train ``model`` with DP-SGD for ``recipe.epochs`` epochs; return weights, result, history.

    Args:
        model: the network with the received global weights (not modified in place
            beyond training; its plain state-dict keys are returned, no ``_module.``).
        loader: ``(image, label)`` batches; Opacus replaces its sampler by Poisson
            sampling at rate ``1 / len(loader)``, drawn from a secret generator (the
            loader's own generator is not used).
        recipe: epochs and optimiser (weight decay applies after the noise:
            post-processing). No FedProx term: its ``proximal_mu`` must be 0. ``amp``
            bf16 computes per-sample gradients in bfloat16 and clips them in float32
            (:func:`clip_in_float32`); fp16 is refused.
        dp: noise, clipping (flat, per layer, or flat in groups: :func:`clip_groups`),
            accountant, trainable weights and whether their norms are held
            (:func:`hold_norms`).
        history: the site's accountant history before this round.

    Returns:
        ``(state_dict, result, history)``; ``history`` includes this round's steps,
        empty Poisson batches included (they are accounted although skipped).
    """
    if recipe.proximal_mu:
        raise ValueError("DP-SGD does not train with a FedProx term: proximal_mu must be 0")
    if recipe.amp == "fp16":
        raise ValueError(
            "DP-SGD does not train with train.amp=fp16: its loss scaler would scale each "
            "patient's gradient before clipping; use bf16 (clipped and noised in float32)"
        )
    check_private_model(model)
    freeze_except(model, dp.trainable)
    if dp.clip_shares and dp.clipping != "flat":
        raise ValueError("privacy.clip_groups needs privacy.clipping=flat")
    groups = clipping_groups(model, dp.clip_shares, dp.max_grad_norm)
    engine = PrivacyEngine(accountant=dp.accountant)
    engine.accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    dp_model, dp_optimizer, dp_loader = _make_private(engine, model, loader, recipe, dp)
    if dp.hold_norms:
        held = held_norms(model)
        # on the wrapped optimiser: it steps only when Opacus' noisy step is taken
        dp_optimizer.original_optimizer.register_step_post_hook(lambda *_: hold_norms(held))
    sample_rate = float(dp_loader.sample_rate)

    def account_empty_batch() -> None:
        # An empty Poisson batch (Opacus' functorch path fails on one) is skipped but
        # still counted, so the accountant never under-reports.
        engine.accountant.step(noise_multiplier=dp.noise_multiplier, sample_rate=sample_rate)

    trained = [p for p in dp_model.parameters() if p.requires_grad]

    def per_patient_gradients(cases: int) -> None:
        fold_views(trained, cases)
        clip_in_float32(trained)
        clip_groups(groups)

    with _physical_batches(
        dp_loader, dp_optimizer, loader.batch_size, dp.max_physical_batch
    ) as batches:
        result = train_local(
            dp_model,
            batches,
            recipe,
            optimizer=dp_optimizer,
            on_empty_batch=account_empty_batch,
            before_step=per_patient_gradients,
        )
    for param in model.parameters():
        param.requires_grad_(True)
    weights = {k: v.detach().cpu() for k, v in dp_model._module.state_dict().items()}
    return weights, result, list(engine.accountant.history)


def _make_private(
    engine: PrivacyEngine,
    model: nn.Module,
    loader: DataLoader,
    recipe: LocalRecipe,
    dp: DpSgdSettings,
) -> tuple[nn.Module, DPOptimizer, DataLoader]:
    """Opacus' wrapped model, DP optimiser (secret noise) and Poisson loader (secret sampling)."""
    optimizer = recipe.new_optimizer(model.parameters())
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=with_secret_sampling(loader),
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=clipping_norms(optimizer, dp.max_grad_norm, dp.clipping),
        clipping=dp.clipping,
        poisson_sampling=True,
        grad_sample_mode=dp.grad_sample_mode,
        noise_generator=secret_generator(next(model.parameters()).device),
    )
    # Opacus' noise that resists floating-point attacks on Gaussian sampling (its
    # PrivacyEngine secure_mode would also need torchcsprng, which current torch lacks)
    dp_optimizer.secure_mode = True
    return dp_model, dp_optimizer, dp_loader


def clipping_norms(
    optimizer: torch.optim.Optimizer, max_grad_norm: float, clipping: str
) -> float | list[float]:
    """Opacus' ``max_grad_norm`` for ``privacy.clipping``: one norm, or one per weight tensor.

    ``per_layer`` gives every tensor an equal share whose L2 total is ``max_grad_norm``,
    so the sensitivity (and the noise and accounting) is that of flat clipping.

    Raises:
        ValueError: an unknown ``clipping``.
    """
    if clipping == "flat":
        return max_grad_norm
    if clipping == "per_layer":
        tensors = sum(len(group["params"]) for group in optimizer.param_groups)
        return [max_grad_norm / math.sqrt(tensors)] * tensors
    raise ValueError(f"privacy.clipping {clipping!r} is unknown; choose flat or per_layer")


@contextlib.contextmanager
def _physical_batches(
    dp_loader: DataLoader,
    dp_optimizer: DPOptimizer,
    batch_size: int | None,
    max_physical_batch: int,
) -> Iterator[DataLoader]:
    """The private loader, split into pieces of ``max_physical_batch`` when batches are larger.

    Opacus' BatchMemoryManager: one noisy step per logical (Poisson) batch, the same privacy.
    """
    if not max_physical_batch or (batch_size or 0) <= max_physical_batch:
        yield dp_loader
        return
    with BatchMemoryManager(
        data_loader=dp_loader, max_physical_batch_size=max_physical_batch, optimizer=dp_optimizer
    ) as batches:
        yield batches


def with_secret_sampling(loader: DataLoader) -> DataLoader:
    """``loader`` with its generator replaced by a secret one (Opacus' Poisson sampler uses it).

    Opacus builds its Poisson sampler from the loader's generator; the caller's may be
    seeded from the run config, which the coordinator knows.
    """
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        shuffle=True,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        generator=secret_generator(),
    )
