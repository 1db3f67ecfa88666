"""DP-SGD for one site's round with Opacus: per-sample clipping, Gaussian noise, Poisson sampling.

The PrivacyEngine is new each round (ClientApps are short-lived) but its
accountant starts from the site's ledger history, so the epsilon it reports is
cumulative over every round and run. The accounting describes exactly the
training that ran: the same loader, its Poisson sampling rate, the same noise.

The noise and the Poisson sampling come from generators seeded by the OS's secure
source (:mod:`fl_imaging.privacy.randomness`), never from ``plan.seed`` or the global
torch RNG, which the coordinator can know; the noise uses Opacus' floating-point-safe
sampling (``secure_mode`` of its optimizer).

An empty Poisson batch (every patient left out by the sampler) is skipped: no
gradient and no noise are added, the weights do not move, yet the step is counted by
the accountant. That is conservative: the released weights depend on the step only
through whether it happened, which the sampler, not the data, decides.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from fl_imaging.privacy import grad_samplers
from fl_imaging.privacy.accounting import History
from fl_imaging.privacy.randomness import secret_generator
from fl_imaging.training import TrainResult, train_local

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


def train_private(
    model: nn.Module,
    loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    epochs: int,
    lr: float,
    weight_decay: float,
    accountant: str,
    history: Sequence[Sequence[float]],
    grad_sample_mode: str = "hooks",
    log_prefix: str = "",
    log_epochs: bool = False,
) -> tuple[dict[str, torch.Tensor], TrainResult, History]:
    """Train ``model`` with DP-SGD for ``epochs`` epochs; return weights, result, history.

    Args:
        model: the network with the received global weights (not modified in place
            beyond training; its plain state-dict keys are returned, no ``_module.``).
        loader: ``(image, label)`` batches; Opacus replaces its sampler by Poisson
            sampling at rate ``1 / len(loader)``, drawn from a secret generator (the
            loader's own generator is not used).
        noise_multiplier: Gaussian noise std / ``max_grad_norm``.
        max_grad_norm: per-sample gradient clipping norm.
        epochs: local epochs (``len(loader)`` expected steps each).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        accountant: Opacus accountant (``rdp``, ``prv``, ``gdp``).
        history: the site's accountant history before this round.
        grad_sample_mode: Opacus per-sample-gradient mode; ``hooks`` uses the samplers
            of :mod:`fl_imaging.privacy.grad_samplers` for convolutions and PReLU.
        log_prefix: prefix of the log lines.
        log_epochs: log each epoch at INFO.

    Returns:
        ``(state_dict, result, history)``; ``history`` includes this round's steps,
        empty Poisson batches included (they are accounted although skipped).
    """
    check_private_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    engine = PrivacyEngine(accountant=accountant)
    engine.accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    device = next(model.parameters()).device
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=with_secret_sampling(loader),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=grad_sample_mode,
        noise_generator=secret_generator(device),
    )
    # Opacus' noise that resists floating-point attacks on Gaussian sampling (its
    # PrivacyEngine secure_mode would also need torchcsprng, which current torch lacks)
    dp_optimizer.secure_mode = True
    sample_rate = float(dp_loader.sample_rate)

    def account_empty_batch() -> None:
        # An empty Poisson batch (Opacus' functorch path fails on one) is skipped but
        # still counted, so the accountant never under-reports.
        engine.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    result = train_local(
        dp_model,
        dp_loader,
        epochs=epochs,
        optimizer=dp_optimizer,
        on_empty_batch=account_empty_batch,
        log_prefix=log_prefix,
        log_epochs=log_epochs,
    )
    weights = {k: v.detach().cpu() for k, v in dp_model._module.state_dict().items()}
    return weights, result, list(engine.accountant.history)


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
