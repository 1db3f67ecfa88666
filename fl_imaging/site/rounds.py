"""One hospital's side of a round: train, evaluate, audit.

Free of Flower: the ClientApp passes in the model weights and gets back weights and
numbers. Nothing returned here holds voxel or label data.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader as TorchDataLoader

from fl_imaging.config import ConfigError, RunPlan, TrainConfig
from fl_imaging.data.loading import (
    eval_loader,
    private_train_loader,
    train_loader,
)
from fl_imaging.data.manifest import (
    TRAIN,
    VAL,
    Case,
    Manifest,
    require_valid,
)
from fl_imaging.data.regions import class_values, regions_as_classes, regions_of
from fl_imaging.ml.devices import check_amp, place_model, select_device, set_cudnn_benchmark
from fl_imaging.ml.models import new_model
from fl_imaging.ml.training import (
    EvalResult,
    LocalRecipe,
    TrainResult,
    evaluate,
    train_local,
)
from fl_imaging.privacy.accounting import EXHAUSTED_FRACTION, noise_for_budget
from fl_imaging.privacy.dp_sgd import DpSgdSettings, train_private
from fl_imaging.privacy.ledger import (
    Ledger,
    NoisePlan,
    ledger_lock,
    open_ledger,
    save_ledger,
)
from fl_imaging.privacy.membership import MembershipAudit, audit, case_losses
from fl_imaging.privacy.policy import (
    PrivacyRequest,
    SitePolicy,
    find_policy,
    noise_refusal,
)
from fl_imaging.privacy.requests import privacy_refusal, privacy_request
from fl_imaging.site.private_files import private_dir
from fl_imaging.site.resolve import Site, load_site_manifest, site_batch_size
from fl_imaging.site.state import LOCAL_NORM_FILE, cache_dir, keep_local_norm

logger = logging.getLogger(__name__)


def _prepare(
    site: Site,
    plan: RunPlan,
    weights: Mapping[str, torch.Tensor],
    split: str,
    validate: bool,
    manifest: Manifest | None = None,
) -> tuple[list[Case], torch.nn.Module]:
    """The site's cases of ``split`` (checked when ``validate``) and the model with ``weights``.

    ``manifest``: the site's manifest when the caller has loaded it already. With
    ``strategy.local_norm`` (FedBN) the site's own normalisation tensors, kept in its
    state folder, replace the global ones.
    """
    if plan.train.threads > 0:
        torch.set_num_threads(plan.train.threads)
    private_dir(site.state_dir)  # patient caches, ledger, logs: readable by the site only
    manifest = manifest or load_site_manifest(site, plan)
    cases = manifest.split(split)
    if validate:
        require_valid(manifest, cases)
    model = new_model(plan)
    weights = dict(weights)
    local = site.state_dir / LOCAL_NORM_FILE
    if plan.strategy.local_norm and local.is_file():
        weights.update(torch.load(local, map_location="cpu", weights_only=True))
    model.load_state_dict(weights)
    try:
        device = select_device(plan.train.device)
        check_amp(plan.train.amp, device)
    except ValueError as exc:
        raise ConfigError(f"site {site.name}: {exc}") from exc
    set_cudnn_benchmark(device, plan.train.cudnn_benchmark)
    return cases, place_model(model, device, channels_last=plan.train.channels_last)


@dataclass(frozen=True)
class PrivacyReport:
    """A private site's spending after a round (what it may tell the server)."""

    epsilon_spent: float  # cumulative over every round and run of this site
    epsilon_budget: float
    delta: float
    noise_multiplier: float
    exhausted: bool  # True: the round would have exceeded the budget, so the site did not train


@dataclass(frozen=True)
class RoundOutcome:
    """What a site's round produced; ``weights`` and ``result`` are None if it did not train."""

    weights: dict[str, torch.Tensor] | None
    result: TrainResult | None
    privacy: PrivacyReport | None
    # why the site refused the run (its own privacy policy); None: it did not refuse
    refusal: str | None = None


class RoundSampling(NamedTuple):
    """How one private round samples: what its noise plan must have been made for."""

    run_id: str
    server_round: int
    sample_rate: float  # Poisson sampling rate q
    steps_per_round: int


def _refused(prefix: str, reason: str) -> RoundOutcome:
    logger.warning("%srefused to train: %s", prefix, reason)
    return RoundOutcome(None, None, None, refusal=reason)


def train_round(
    site: Site,
    plan: RunPlan,
    weights: Mapping[str, torch.Tensor],
    *,
    server_round: int,
    run_id: str = "",
    proximal_mu: float = 0.0,
    epochs: int | None = None,
    validate_data: bool = True,
) -> RoundOutcome:
    """Train the global ``weights`` on the site's training cases.

    A site with a privacy budget trains with DP-SGD (:func:`_train_private`); it
    does not train at all when the round would take it past its budget.

    Args:
        site: the resolved site.
        plan: the run plan (model, data, training and privacy settings).
        weights: global model state dict.
        server_round: round number (seeds this round's augmentation and shuffling).
        run_id: the federated run's id (a private site plans its noise once per run).
        proximal_mu: FedProx proximal-term weight sent by the server (0: plain FedAvg).
        epochs: local epochs instead of the configured ones (a short fine-tune).
        validate_data: read every training case once and check it first (errors
            name the case and file).
    """
    epochs = epochs or site.config.local_epochs or plan.train.local_epochs
    prefix = f"[{site.name} r{server_round}] "
    manifest = load_site_manifest(site, plan)
    request = privacy_request(site, plan, len(manifest.split(TRAIN)), epochs)
    # the hospital's policy, read once per round (PolicyError: missing or invalid file)
    policy = find_policy(site.policy_file, site.state_dir)
    reason = privacy_refusal(site, request, policy)
    if reason:
        return _refused(prefix, reason)
    cases, model = _prepare(site, plan, weights, TRAIN, validate_data, manifest)
    seed = plan.seed * 1_000_003 + server_round * 1009 + site.index
    batch_size = site_batch_size(site, plan, len(cases))
    if site.config.privacy.epsilon is not None:
        loader = private_train_loader(
            cases,
            plan.data,
            batch_size=batch_size,
            seed=seed,
            cache_dir=cache_dir(site, plan, TRAIN),
            views=plan.privacy.augmentations,
        )
        # the whole private round holds the site's privacy lock: no second training of
        # this site can release weights the ledger does not record
        with ledger_lock(site.state_dir, site=site.name, timeout=plan.privacy.lock_timeout):
            return _train_private(
                site,
                plan,
                model,
                loader,
                epochs,
                server_round,
                run_id,
                prefix,
                request=request,
                policy=policy,
            )
    return _train_plain(
        site, plan, model, cases, batch_size, seed, epochs, proximal_mu, prefix, server_round
    )


def _train_plain(
    site: Site,
    plan: RunPlan,
    model: torch.nn.Module,
    cases: list[Case],
    batch_size: int,
    seed: int,
    epochs: int,
    proximal_mu: float,
    prefix: str,
    server_round: int,
) -> RoundOutcome:
    """A round of plain (non-private) local training."""
    loader = train_loader(
        cases, plan.data, batch_size=batch_size, seed=seed, cache_dir=cache_dir(site, plan, TRAIN)
    )
    recipe = LocalRecipe.from_config(
        plan.train,
        epochs=epochs,
        proximal_mu=proximal_mu,
        log_prefix=prefix,
        server_round=server_round,
        rounds=plan.rounds,
    )
    result = train_local(model, loader, recipe)
    new_weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    keep_local_norm(site, plan, new_weights)
    return RoundOutcome(new_weights, result, None)


def _train_private(
    site: Site,
    plan: RunPlan,
    model: torch.nn.Module,
    loader: TorchDataLoader,
    epochs: int,
    server_round: int,
    run_id: str,
    prefix: str,
    *,
    request: PrivacyRequest,
    policy: SitePolicy | None,
) -> RoundOutcome:
    """DP-SGD round, run under the site's privacy lock (:func:`ledger_lock`).

    Plan the run's noise once, refuse if over budget, train, record in the ledger.
    ``request`` is what the run asks (:func:`privacy_request`), already checked
    against the site's ``policy``; the policy's noise floor is checked here.
    """
    epsilon = float(request.epsilon)  # type: ignore[arg-type]
    delta = float(request.delta)  # type: ignore[arg-type]
    _check_delta(site, delta, len(loader.dataset))
    ledger = open_ledger(
        site.state_dir, site=site.name, epsilon=epsilon, delta=delta, accountant=request.accountant
    )
    sample_rate = 1.0 / len(loader)  # what Opacus' Poisson sampler will use
    steps = epochs * len(loader)

    def exhausted(sigma: float) -> RoundOutcome:
        spent = ledger.epsilon_spent
        logger.warning(
            "%sprivacy budget exhausted (spent %.2f of %g): not training", prefix, spent, epsilon
        )
        return RoundOutcome(None, None, PrivacyReport(spent, epsilon, delta, sigma, True))

    if epsilon - ledger.epsilon_spent < EXHAUSTED_FRACTION * epsilon:
        return exhausted(float("nan"))
    # this round's sampling; the noise is the run's plan (or planned now)
    this_round = RoundSampling(run_id, server_round, sample_rate, steps)
    if not _plan_noise(site, plan, ledger, request, this_round, prefix):
        return exhausted(float("nan"))
    sigma = ledger.plan.noise_multiplier  # type: ignore[union-attr]
    too_little_noise = noise_refusal(policy, sigma)
    if too_little_noise:
        return _refused(prefix, too_little_noise)
    if ledger.epsilon_after(sigma, sample_rate, steps) > epsilon:
        return exhausted(sigma)
    dp = DpSgdSettings.from_config(
        plan.privacy,
        noise_multiplier=sigma,
        max_grad_norm=float(request.max_grad_norm),  # type: ignore[arg-type]
        accountant=request.accountant,
    )
    recipe = LocalRecipe.from_config(
        private_train_config(plan),
        epochs=epochs,
        log_prefix=prefix,
        server_round=server_round,
        rounds=plan.rounds,
    )
    weights, result, history = train_private(model, loader, recipe, dp, history=ledger.history)
    keep_local_norm(site, plan, weights)
    ledger.history = history
    _record_round(site, ledger, this_round, sigma, dp.max_grad_norm, result.steps)
    report = PrivacyReport(ledger.epsilon_spent, epsilon, delta, sigma, False)
    return RoundOutcome(weights, result, report)


def private_train_config(plan: RunPlan) -> TrainConfig:
    """The ``train`` settings a DP-SGD site trains with: ``privacy.lr`` replaces ``train.lr``.

    ``privacy.lr`` null: ``plan.train`` as it is. Sites without DP keep ``train.lr``.
    """
    if plan.privacy.lr is None:
        return plan.train
    return dataclasses.replace(plan.train, lr=plan.privacy.lr)


def _check_delta(site: Site, delta: float, num_train: int) -> None:
    """Refuse a delta of 1 / the site's training cases or more (one record could leak)."""
    if delta >= 1 / num_train:
        raise ConfigError(
            f"site {site.name}: delta={delta:g} must be below 1/{num_train} (1 / the site's "
            f"training cases), or a single patient's record could leak"
        )


def _plan_noise(
    site: Site,
    plan: RunPlan,
    ledger: Ledger,
    request: PrivacyRequest,
    wanted: RoundSampling,
    prefix: str,
) -> bool:
    """Keep the ledger's noise plan, or plan anew for the rest of the run; False: no budget.

    A plan holds for one run and one sampling setup (``wanted``'s run id, sample rate and
    steps per round): the noise that spends what is left of the budget over the rounds
    left. A new plan is saved in the ledger before any step uses it.
    """
    current = ledger.plan
    if (
        current is not None
        and current.run_id == wanted.run_id
        and current.sample_rate == wanted.sample_rate
        and current.steps_per_round == wanted.steps_per_round
    ):
        return True
    rounds_left = max(plan.rounds - wanted.server_round + 1, 1)
    epsilon, delta = float(request.epsilon), float(request.delta)  # type: ignore[arg-type]
    try:
        sigma = noise_for_budget(
            history=ledger.history,
            epsilon=epsilon,
            delta=delta,
            sample_rate=wanted.sample_rate,
            steps=wanted.steps_per_round * rounds_left,
            accountant=request.accountant,
        )
    except ValueError:
        return False
    ledger.plan = NoisePlan(
        wanted.run_id,
        sigma,
        wanted.sample_rate,
        wanted.steps_per_round,
        wanted.server_round,
        rounds_left,
    )
    save_ledger(site.state_dir, ledger)
    logger.info(
        "%splanned DP-SGD: noise %.3f, q %.4f, %d steps/round over %d rounds for "
        "epsilon %g (delta %g), %.3f already spent",
        prefix,
        sigma,
        wanted.sample_rate,
        wanted.steps_per_round,
        rounds_left,
        epsilon,
        delta,
        ledger.epsilon_spent,
    )
    return True


def _record_round(
    site: Site,
    ledger: Ledger,
    this_round: RoundSampling,
    sigma: float,
    max_grad_norm: float,
    steps_run: int,
) -> None:
    """Append the round just trained to the site's ledger and save it (atomically).

    ``this_round``: the run, round and sampling the round was accounted
    with; ``steps_run``: the optimiser steps it actually took.
    """
    ledger.rounds.append(
        {
            "run_id": this_round.run_id,
            "round": this_round.server_round,
            "steps": steps_run,
            "accounted_steps": this_round.steps_per_round,
            "noise_multiplier": sigma,
            "sample_rate": this_round.sample_rate,
            "max_grad_norm": max_grad_norm,
            "epsilon_spent": ledger.epsilon_spent,
            "time": time.time(),
        }
    )
    save_ledger(site.state_dir, ledger)


def evaluate_round(
    site: Site,
    plan: RunPlan,
    weights: Mapping[str, torch.Tensor],
    *,
    validate_data: bool = True,
) -> EvalResult:
    """Dice of the global ``weights`` on the site's validation cases (keyed by label value)."""
    cases, model = _prepare(site, plan, weights, VAL, validate_data)
    values = class_values(plan.data.labels)  # training class i is label value values[i]
    result = evaluate(
        model,
        eval_loader(cases, plan.data, cache_dir=cache_dir(site, plan, VAL)),
        num_classes=len(values),
        roi_size=plan.data.patch_size,
        regions=regions_as_classes(regions_of(plan.data.label_scheme), plan.data.labels),
        spacing=plan.data.spacing,
        amp=plan.train.amp,
    )
    per_label = {values[i]: dice for i, dice in result.dice_per_class.items()}
    return dataclasses.replace(result, dice_per_class=per_label)


def membership_audit(
    site: Site, plan: RunPlan, weights: Mapping[str, torch.Tensor], *, resamples: int = 1000
) -> MembershipAudit:
    """Loss-threshold membership inference on ``weights`` at ``site`` (where its data is).

    Members: the site's training cases; non-members: its validation cases; both whole
    volumes with the evaluation preprocessing (no augmentation). Only the AUC, its
    interval and the case counts are returned (:mod:`fl_imaging.privacy.membership`).
    """
    manifest = load_site_manifest(site, plan)
    _, model = _prepare(site, plan, weights, VAL, validate=False, manifest=manifest)
    losses = {}
    for split in (TRAIN, VAL):  # training cases uncached here: their cache holds patches
        cache = cache_dir(site, plan, VAL) if split == VAL else None
        loader = eval_loader(manifest.split(split), plan.data, cache_dir=cache)
        losses[split] = case_losses(model, loader, plan.data.patch_size)
    return audit(site.name, losses[TRAIN], losses[VAL], resamples=resamples, seed=plan.seed)
