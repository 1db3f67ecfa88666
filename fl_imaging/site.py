"""One hospital's side of a round: who am I, my data, train, evaluate.

Free of Flower: the ClientApp passes in the ``node_config`` mapping and the model
weights and gets back weights and numbers. Nothing returned here holds voxel or
label data.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader as TorchDataLoader

from fl_imaging.config import ConfigError, RunPlan, SiteConfig
from fl_imaging.data.loading import (
    eval_loader,
    preprocessing_key,
    private_train_loader,
    train_loader,
)
from fl_imaging.data.manifest import (
    TRAIN,
    VAL,
    Case,
    Manifest,
    ManifestError,
    load_manifest,
    require_valid,
)
from fl_imaging.models import build_model
from fl_imaging.privacy.accounting import EXHAUSTED_FRACTION, default_delta, noise_for_budget
from fl_imaging.privacy.dp_sgd import is_trainable, train_private
from fl_imaging.privacy.ledger import (
    NoisePlan,
    has_ledger,
    ledger_lock,
    open_ledger,
    read_ledger,
    save_ledger,
)
from fl_imaging.privacy.membership import MembershipAudit, audit, case_losses
from fl_imaging.privacy.planning import SitePrivacyPlan, plan_site
from fl_imaging.privacy.policy import (
    PrivacyRequest,
    SitePolicy,
    find_policy,
    noise_refusal,
    refusal,
)
from fl_imaging.private_files import private_dir
from fl_imaging.protocol import NodeConfigKey
from fl_imaging.regions import class_values, regions_as_classes, regions_of
from fl_imaging.training import EvalResult, TrainResult, evaluate, select_device, train_local

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """A resolved site: its index in the federation and where its files are."""

    name: str
    index: int
    manifest: Path
    data_root: Path | None
    state_dir: Path
    config: SiteConfig
    # the hospital's privacy policy file named by its node config (None: the one in
    # state_dir, if any; fl_imaging.privacy.policy)
    policy_file: Path | None = None


def resolve_site(node_config: Mapping[str, Any], plan: RunPlan) -> Site:
    """Which configured site this node is.

    Deployment: ``node_config["site"]`` names it, and ``manifest`` / ``data-root`` /
    ``state-dir`` may override where its manifest, data and state live (a hospital
    knows its own paths; the server's config need not). Simulation: ``partition-id`` is
    the site's position in ``federation.sites``.

    Raises:
        ConfigError: the node names an unknown site, or the simulation has more
            nodes than configured sites.
    """
    sites = plan.federation.sites
    if NodeConfigKey.SITE in node_config:
        cfg = plan.site(str(node_config[NodeConfigKey.SITE]))
    elif NodeConfigKey.PARTITION_ID in node_config:
        index = int(node_config[NodeConfigKey.PARTITION_ID])
        if not 0 <= index < len(sites):
            raise ConfigError(
                f"this node has partition-id {index} but federation.sites lists only "
                f"{len(sites)} sites; run the simulation with num-supernodes={len(sites)}"
            )
        cfg = sites[index]
    else:
        raise ConfigError(
            "node_config has neither 'site' (deployment) nor 'partition-id' (simulation); "
            "start the SuperNode with --node-config 'site=\"<name>\"'"
        )
    data_root = node_config.get(NodeConfigKey.DATA_ROOT)
    state_dir = node_config.get(NodeConfigKey.STATE_DIR)
    manifest = node_config.get(NodeConfigKey.MANIFEST) or cfg.manifest
    policy = node_config.get(NodeConfigKey.PRIVACY_POLICY)
    return Site(
        name=cfg.name,
        index=plan.site_names.index(cfg.name),
        manifest=plan.resolve_path(str(manifest)),
        data_root=plan.resolve_path(str(data_root)) if data_root else plan.site_data_root(cfg),
        state_dir=plan.resolve_path(str(state_dir)) if state_dir else plan.site_state_dir(cfg),
        config=cfg,
        policy_file=plan.resolve_path(str(policy)) if policy else None,
    )


def configured_sites(plan: RunPlan) -> list[Site]:
    """Every configured site, resolved with its configured paths (no node overrides)."""
    return [resolve_site({NodeConfigKey.SITE: s.name}, plan) for s in plan.federation.sites]


def check_sites(plan: RunPlan) -> list[str]:
    """Problems of the configured sites' manifests (structure only; no image is read).

    Checks that each manifest exists and parses, agrees with ``data.modalities`` and
    ``data.labels``, has training and validation cases, and that a private site's
    ``delta`` is below 1 / its number of training cases.
    """
    problems = []
    for site in configured_sites(plan):
        key = f"federation.sites[{site.name}]"
        try:
            manifest = load_site_manifest(site, plan)
        except (ManifestError, ConfigError) as exc:
            problems.append(f"{key}.manifest: {exc}")
            continue
        budget = site.config.privacy
        delta = budget.delta if budget.delta is not None else plan.privacy.delta
        num_train = len(manifest.split(TRAIN))
        if budget.epsilon is not None and delta is not None and delta >= 1 / num_train:
            problems.append(
                f"{key}.privacy.delta={delta:g} must be below 1/{num_train} (1 / the site's "
                f"training cases), or a single patient's record could leak"
            )
    return problems


def load_site_manifest(site: Site, plan: RunPlan) -> Manifest:
    """Load the site's manifest and check it matches the federation's data contract.

    Raises:
        ManifestError: the manifest is unreadable or malformed.
        ConfigError: its modalities or labels disagree with ``data.modalities`` /
            ``data.labels`` (every site must share one label set to share a model).
    """
    manifest = load_manifest(
        site.manifest,
        data_root=site.data_root,
        val_fraction=plan.data.val_fraction,
        seed=plan.seed,
    )
    if manifest.num_channels != len(plan.data.modalities):
        raise ConfigError(
            f"site {site.name}: manifest {site.manifest} declares {manifest.num_channels} "
            f"modalities {list(manifest.modalities)}, data.modalities has "
            f"{len(plan.data.modalities)} {list(plan.data.modalities)}"
        )
    if sorted(manifest.labels) != sorted(plan.data.labels):
        raise ConfigError(
            f"site {site.name}: manifest {site.manifest} declares labels "
            f"{dict(manifest.labels)}, data.labels is {dict(plan.data.labels)}"
        )
    for split in (TRAIN, VAL):
        if not manifest.split(split):
            raise ConfigError(f"site {site.name}: manifest {site.manifest} has no {split} cases")
    return manifest


def new_model(plan: RunPlan) -> torch.nn.Module:
    """The federation's network, freshly initialised (seeded by ``plan.seed``)."""
    torch.manual_seed(plan.seed)
    return build_model(
        plan.model, in_channels=len(plan.data.modalities), out_channels=len(plan.data.labels)
    )


def initial_weights(plan: RunPlan) -> dict[str, torch.Tensor]:
    """The weights round 1 starts from: ``model.init_checkpoint``'s, else a fresh model's.

    The checkpoint may be a run folder's (``checkpoints/last.pt``, with its ``state_dict``)
    or a saved state dict; it is loaded with ``weights_only=True`` (no code runs) and
    must fit the configured model exactly (same keys, same shapes).

    Raises:
        ConfigError: naming the file: unreadable, or which keys are missing, extra or
            of another shape.
    """
    fresh = new_model(plan).state_dict()
    if not plan.model.init_checkpoint:
        return fresh
    path = plan.resolve_path(plan.model.init_checkpoint)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"model.init_checkpoint: {path}: no such file") from exc
    except Exception as exc:  # corrupt, foreign or unsafe pickles: one line naming the file
        raise ConfigError(
            f"model.init_checkpoint: {path}: not a readable weights file "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc) else ''})"
        ) from exc
    weights = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise ConfigError(f"model.init_checkpoint: {path}: holds no state dict of tensors")
    missing = sorted(set(fresh) - set(weights))
    extra = sorted(set(weights) - set(fresh))
    shapes = sorted(
        f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in fresh.items()
        if k in weights and weights[k].shape != v.shape
    )
    if missing or extra or shapes:
        details = "; ".join(
            f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for what, keys in (("missing", missing), ("unexpected", extra),
                               ("other shape (checkpoint vs model)", shapes))
            if keys
        )  # fmt: skip
        raise ConfigError(
            f"model.init_checkpoint: {path} does not fit the configured model "
            f"(model.channels {plan.model.channels}, {len(plan.data.modalities)} input "
            f"channels, {len(plan.data.labels)} classes): {details}"
        )
    return {k: weights[k].to(v.dtype) for k, v in fresh.items()}


CACHE_DIR = "cache"


def cache_dir(site: Site, plan: RunPlan, split: str) -> Path | None:
    """The site's disk cache of preprocessed ``split`` cases (None: ``data.cache=memory``).

    One folder per preprocessing setting, inside the site's state folder: cached
    volumes never leave the site, and a changed setting never reads stale volumes.
    """
    if plan.data.cache != "disk":
        return None
    return site.state_dir / CACHE_DIR / f"{split}-{preprocessing_key(plan.data, split)}"


LOCAL_NORM_FILE = "local_norm.pt"
_NORM_TYPES = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
)


def norm_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the model's normalisation layers (weights and running statistics)."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            keys |= {f"{name}.{k}" for k in module.state_dict()}
    return keys


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
    except ValueError as exc:
        raise ConfigError(f"site {site.name}: {exc}") from exc
    return cases, model.to(device)


def _keep_local_norm(site: Site, plan: RunPlan, weights: Mapping[str, torch.Tensor]) -> None:
    """FedBN: store the site's normalisation tensors after training (atomically)."""
    if not plan.strategy.local_norm:
        return
    keys = norm_keys(new_model(plan))
    site.state_dir.mkdir(parents=True, exist_ok=True)
    path = site.state_dir / LOCAL_NORM_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({k: v for k, v in weights.items() if k in keys}, tmp)
    tmp.replace(path)


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


def site_batch_size(site: Site, plan: RunPlan, num_train: int) -> int:
    """Cases per step at ``site``: its own batch size, else ``train.batch_size`` (0: all)."""
    configured = site.config.batch_size or plan.train.batch_size
    return min(configured, num_train) if configured else num_train


def site_delta(site: Site, plan: RunPlan, num_train: int) -> float:
    """The site's delta: its own, else ``privacy.delta``, else ``min(1e-5, N^-1.1)``."""
    budget = site.config.privacy
    if budget.delta is not None:
        return budget.delta
    if plan.privacy.delta is not None:
        return plan.privacy.delta
    return default_delta(num_train)


def privacy_request(site: Site, plan: RunPlan, num_train: int, epochs: int) -> PrivacyRequest:
    """What the run asks of ``site``'s privacy, defaults resolved (epsilon None: no DP)."""
    budget = site.config.privacy
    private = budget.epsilon is not None
    return PrivacyRequest(
        epsilon=budget.epsilon,
        delta=site_delta(site, plan, num_train) if private else None,
        max_grad_norm=(budget.max_grad_norm or plan.privacy.max_grad_norm) if private else None,
        accountant=plan.privacy.accountant,
        rounds=plan.rounds,
        local_epochs=epochs,
    )


def _refused(prefix: str, reason: str) -> RoundOutcome:
    logger.warning("%srefused to train: %s", prefix, reason)
    return RoundOutcome(None, None, None, refusal=reason)


def privacy_refusal(site: Site, request: PrivacyRequest, policy: SitePolicy | None) -> str | None:
    """Why the site refuses to train in this run (None: it trains).

    The site's own policy (:mod:`fl_imaging.privacy.policy`) is checked against what
    the run asks; a site that has a privacy ledger never trains without DP-SGD (that
    would void the guarantee its ledger accounts for) until an audited reset.
    """
    if policy is not None:
        reason = refusal(policy, request)
        if reason:
            return reason
    if request.epsilon is None and has_ledger(site.state_dir):
        return (
            f"the run asks for training without DP-SGD, but this site has a privacy ledger "
            f"in {site.state_dir}: its patients are protected by DP, and a plain round would "
            f"void that. Give the site its budget, or reset the ledger for new patients "
            f"(`fl-imaging privacy reset`, audited)"
        )
    return None


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
            cases, plan.data, batch_size=batch_size, seed=seed,
            cache_dir=cache_dir(site, plan, TRAIN), views=plan.privacy.augmentations,
        )  # fmt: skip
        # the whole private round holds the site's privacy lock: no second training of
        # this site can release weights the ledger does not record
        with ledger_lock(site.state_dir, site=site.name, timeout=plan.privacy.lock_timeout):
            return _train_private(
                site, plan, model, loader, epochs, server_round, run_id, prefix,
                request=request, policy=policy,
            )  # fmt: skip
    loader = train_loader(
        cases, plan.data, batch_size=batch_size, seed=seed, cache_dir=cache_dir(site, plan, TRAIN)
    )
    result = train_local(
        model,
        loader,
        epochs=epochs,
        lr=plan.train.lr,
        weight_decay=plan.train.weight_decay,
        optimizer_name=plan.train.optimizer,
        momentum=plan.train.momentum,
        ema_decay=plan.train.ema_decay,
        proximal_mu=proximal_mu,
        log_prefix=prefix,
        log_epochs=plan.train.progress == "epoch",
    )
    new_weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _keep_local_norm(site, plan, new_weights)
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
    max_grad_norm = float(request.max_grad_norm)  # type: ignore[arg-type]
    accountant = request.accountant
    num_train = len(loader.dataset)
    if delta >= 1 / num_train:
        raise ConfigError(
            f"site {site.name}: delta={delta:g} must be below 1/{num_train} (1 / the site's "
            f"training cases), or a single patient's record could leak"
        )
    ledger = open_ledger(
        site.state_dir, site=site.name, epsilon=epsilon, delta=delta, accountant=accountant
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
    plan_stale = (
        ledger.plan is None
        or ledger.plan.run_id != run_id
        or ledger.plan.sample_rate != sample_rate
        or ledger.plan.steps_per_round != steps
    )
    if plan_stale:
        rounds_left = max(plan.rounds - server_round + 1, 1)
        try:
            sigma = noise_for_budget(
                history=ledger.history, epsilon=epsilon, delta=delta, sample_rate=sample_rate,
                steps=steps * rounds_left, accountant=accountant,
            )  # fmt: skip
        except ValueError:
            return exhausted(float("nan"))
        ledger.plan = NoisePlan(run_id, sigma, sample_rate, steps, server_round, rounds_left)
        save_ledger(site.state_dir, ledger)
        logger.info(
            "%splanned DP-SGD: noise %.3f, q %.4f, %d steps/round over %d rounds for "
            "epsilon %g (delta %g), %.3f already spent",
            prefix, sigma, sample_rate, steps, rounds_left, epsilon, delta, ledger.epsilon_spent,
        )  # fmt: skip
    sigma = ledger.plan.noise_multiplier  # type: ignore[union-attr]
    too_little_noise = noise_refusal(policy, sigma)
    if too_little_noise:
        return _refused(prefix, too_little_noise)
    if ledger.epsilon_after(sigma, sample_rate, steps) > epsilon:
        return exhausted(sigma)
    weights, result, history = train_private(
        model, loader, noise_multiplier=sigma, max_grad_norm=max_grad_norm, epochs=epochs,
        lr=plan.train.lr, weight_decay=plan.train.weight_decay, accountant=accountant,
        history=ledger.history, grad_sample_mode=plan.privacy.grad_sample_mode,
        optimizer_name=plan.train.optimizer, momentum=plan.train.momentum,
        ema_decay=plan.train.ema_decay, trainable=plan.privacy.trainable,
        max_physical_batch=plan.privacy.max_physical_batch, clipping=plan.privacy.clipping,
        log_prefix=prefix,
        log_epochs=plan.train.progress == "epoch",
    )  # fmt: skip
    _keep_local_norm(site, plan, weights)
    ledger.history = history
    spent = ledger.epsilon_spent
    ledger.rounds.append(
        {
            "run_id": run_id, "round": server_round, "steps": result.steps,
            "accounted_steps": steps, "noise_multiplier": sigma, "sample_rate": sample_rate,
            "max_grad_norm": max_grad_norm, "epsilon_spent": spent, "time": time.time(),
        }
    )  # fmt: skip
    save_ledger(site.state_dir, ledger)
    return RoundOutcome(weights, result, PrivacyReport(spent, epsilon, delta, sigma, False))


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


def privacy_plans(plan: RunPlan) -> list[SitePrivacyPlan]:
    """The pre-flight DP-SGD plan of every private configured site (docs: privacy plan).

    The same figures the site computes at its first round of the run: its manifest's
    training cases, the run's batch size and epochs, its ledger's history if it has one.
    """
    plans = []
    model = new_model(plan)
    num_weights = sum(
        p.numel() for n, p in model.named_parameters() if is_trainable(n, plan.privacy.trainable)
    )
    for site in configured_sites(plan):
        if site.config.privacy.epsilon is None:
            continue
        num_train = len(load_site_manifest(site, plan).split(TRAIN))
        epochs = site.config.local_epochs or plan.train.local_epochs
        request = privacy_request(site, plan, num_train, epochs)  # what train_round asks
        ledger = read_ledger(site.state_dir)
        plans.append(
            plan_site(
                site=site.name, num_train=num_train,
                batch_size=site_batch_size(site, plan, num_train), epochs=epochs,
                rounds=plan.rounds, epsilon=float(request.epsilon),  # type: ignore[arg-type]
                delta=float(request.delta), accountant=request.accountant,  # type: ignore[arg-type]
                history=ledger.history if ledger is not None else (),
                num_weights=num_weights, optimizer=plan.train.optimizer,
            )
        )  # fmt: skip
    return plans
