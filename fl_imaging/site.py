"""One hospital's side of a round: who am I, my data, train, evaluate.

Free of Flower: the ClientApp passes in the ``node_config`` mapping and the model
weights and gets back weights and numbers. Nothing returned here holds voxel or
label data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fl_imaging.config import ConfigError, RunPlan
from fl_imaging.data.loading import eval_loader, train_loader
from fl_imaging.data.manifest import TRAIN, VAL, Manifest, load_manifest, require_valid
from fl_imaging.models import build_model
from fl_imaging.protocol import NodeConfigKey
from fl_imaging.training import EvalResult, TrainResult, evaluate, train_local

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """A resolved site: its index in the federation and where its files are."""

    name: str
    index: int
    manifest: Path
    data_root: Path | None
    state_dir: Path


def resolve_site(node_config: Mapping[str, Any], plan: RunPlan) -> Site:
    """Which configured site this node is.

    Deployment: ``node_config["site"]`` names it, and ``data-root`` / ``state-dir``
    may override where its data and state live. Simulation: ``partition-id`` is
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
    return Site(
        name=cfg.name,
        index=plan.site_names.index(cfg.name),
        manifest=plan.resolve_path(cfg.manifest),
        data_root=plan.resolve_path(str(data_root)) if data_root else plan.site_data_root(cfg),
        state_dir=plan.resolve_path(str(state_dir)) if state_dir else plan.site_state_dir(cfg),
    )


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
        plan.model, in_channels=len(plan.data.modalities), out_channels=max(plan.data.labels) + 1
    )


def _set_threads(plan: RunPlan) -> None:
    if plan.train.threads > 0:
        torch.set_num_threads(plan.train.threads)


def train_round(
    site: Site,
    plan: RunPlan,
    weights: Mapping[str, torch.Tensor],
    *,
    server_round: int,
    validate_data: bool = True,
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Train the global ``weights`` on the site's training cases; return new weights.

    Args:
        site: the resolved site.
        plan: the run plan (model, data and training settings).
        weights: global model state dict.
        server_round: round number (seeds this round's augmentation and shuffling).
        validate_data: read every training case once and check it first (errors
            name the case and file).
    """
    _set_threads(plan)
    manifest = load_site_manifest(site, plan)
    cases = manifest.split(TRAIN)
    if validate_data:
        require_valid(manifest, cases)
    model = new_model(plan)
    model.load_state_dict(weights)
    seed = plan.seed * 1_000_003 + server_round * 1009 + site.index
    loader = train_loader(cases, plan.data, batch_size=plan.train.batch_size, seed=seed)
    result = train_local(
        model,
        loader,
        epochs=plan.train.local_epochs,
        lr=plan.train.lr,
        weight_decay=plan.train.weight_decay,
        log_prefix=f"[{site.name} r{server_round}] ",
    )
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, result


def evaluate_round(
    site: Site,
    plan: RunPlan,
    weights: Mapping[str, torch.Tensor],
    *,
    validate_data: bool = True,
) -> EvalResult:
    """Dice of the global ``weights`` on the site's validation cases."""
    _set_threads(plan)
    manifest = load_site_manifest(site, plan)
    cases = manifest.split(VAL)
    if validate_data:
        require_valid(manifest, cases)
    model = new_model(plan)
    model.load_state_dict(weights)
    return evaluate(
        model,
        eval_loader(cases, plan.data),
        num_classes=max(plan.data.labels) + 1,
        roi_size=plan.data.patch_size,
    )
