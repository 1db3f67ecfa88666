"""Which configured site a node is, where its files are, and its manifest.

Free of Flower: the ClientApp passes in the ``node_config`` mapping. Deployment and
simulation differ only in how ``node_config`` names the site.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_imaging.config import ConfigError, RunPlan, SiteConfig
from fl_imaging.data.manifest import (
    TRAIN,
    VAL,
    Manifest,
    ManifestError,
    load_manifest,
)
from fl_imaging.protocol import NodeConfigKey


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


def site_batch_size(site: Site, plan: RunPlan, num_train: int) -> int:
    """Cases per step at ``site``: its own batch size, else ``train.batch_size`` (0: all)."""
    configured = site.config.batch_size or plan.train.batch_size
    return min(configured, num_train) if configured else num_train
