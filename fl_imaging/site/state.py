"""What a site keeps in its own state folder between rounds: caches and FedBN tensors.

Everything here stays on the site's disk (0700 folder); nothing is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from fl_imaging.config import RunPlan
from fl_imaging.data.loading import (
    preprocessing_key,
)
from fl_imaging.ml.models import new_model
from fl_imaging.site.resolve import Site

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


def keep_local_norm(site: Site, plan: RunPlan, weights: Mapping[str, torch.Tensor]) -> None:
    """FedBN: store the site's normalisation tensors after training (atomically)."""
    if not plan.strategy.local_norm:
        return
    keys = norm_keys(new_model(plan))
    site.state_dir.mkdir(parents=True, exist_ok=True)
    path = site.state_dir / LOCAL_NORM_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({k: v for k, v in weights.items() if k in keys}, tmp)
    tmp.replace(path)
