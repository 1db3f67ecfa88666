"""Network factory: MONAI's UNet, or fixed image features and a small trained head.

``model.name=unet``: ``monai.networks.nets.UNet``, the MONAI 3D network that Opacus can
compute per-sample gradients for without patching (BasicUNet and SegResNet use
in-place ops that break Opacus' hooks). ``model.name=features``:
:class:`fl_imaging.ml.features.FeatureHeadNet`, designed multi-scale features with no
weights and a per-voxel MLP, for DP-SGD on small cohorts.
"""

from __future__ import annotations

import torch
from monai.networks.layers import Norm
from monai.networks.layers.utils import get_act_layer
from monai.networks.nets import UNet
from torch import nn

from fl_imaging.config import KNOWN_MODELS, ConfigError, ModelConfig, RunPlan
from fl_imaging.ml.features import FeatureHeadNet

# instance: InstanceNorm without affine weights or running statistics; group: GroupNorm
# (per-case statistics too, with affine weights); both are per-sample, as DP-SGD needs
NORMS = {"instance": Norm.INSTANCE, "group": Norm.GROUP, "batch": Norm.BATCH}
# prelu: MONAI's default (a learnt negative slope, initialised at 0.25); leakyrelu: that
# slope fixed at 0.25, no weights of its own, so DP-SGD computes no per-sample
# gradients for it (cheaper steps, the same function as prelu at initialisation)
ACTIVATIONS: dict[str, str | tuple[str, dict[str, float]]] = {
    "prelu": "prelu",
    "relu": "relu",
    "leakyrelu": ("leakyrelu", {"negative_slope": 0.25}),
}


def _norm(model: ModelConfig) -> str | tuple[str, dict[str, int]]:
    if model.norm == "group":
        return (Norm.GROUP, {"num_groups": model.num_groups})
    return NORMS[model.norm]


def build_model(model: ModelConfig, *, in_channels: int, out_channels: int) -> nn.Module:
    """Build the configured 3D segmentation network.

    Args:
        model: architecture settings (``name``, ``channels``, ``strides``, ...).
        in_channels: input channels (one per imaging modality).
        out_channels: output classes, background included.

    Returns:
        A module mapping ``[B, in_channels, X, Y, Z]`` to logits
        ``[B, out_channels, X, Y, Z]``; X, Y, Z must be divisible by the product
        of ``model.strides``.
    """
    if model.name not in KNOWN_MODELS:
        raise ValueError(f"model.name {model.name!r} is unknown; choose one of {KNOWN_MODELS}")
    if model.norm not in NORMS:
        raise ValueError(f"model.norm {model.norm!r} is unknown; choose one of {sorted(NORMS)}")
    if model.act not in ACTIVATIONS:
        raise ValueError(f"model.act {model.act!r} is unknown; choose one of {sorted(ACTIVATIONS)}")
    if in_channels < 1 or out_channels < 2:
        raise ValueError(
            f"need in_channels >= 1 and out_channels >= 2, got {in_channels}, {out_channels}"
        )
    if model.name == "features":
        return FeatureHeadNet(
            in_channels,
            out_channels,
            hidden=model.channels,
            scales=model.scales,
            hessian_scales=model.hessian_scales,
            # MONAI's activation factory, from the same table as the UNet's
            activation=lambda: get_act_layer(ACTIVATIONS[model.act]),
        )
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(model.channels),
        strides=tuple(model.strides),
        num_res_units=model.num_res_units,
        norm=_norm(model),
        act=ACTIVATIONS[model.act],
        dropout=model.dropout,
    )


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
            for what, keys in (
                ("missing", missing),
                ("unexpected", extra),
                ("other shape (checkpoint vs model)", shapes),
            )
            if keys
        )
        raise ConfigError(
            f"model.init_checkpoint: {path} does not fit the configured model "
            f"(model.channels {plan.model.channels}, {len(plan.data.modalities)} input "
            f"channels, {len(plan.data.labels)} classes): {details}"
        )
    return {k: weights[k].to(v.dtype) for k, v in fresh.items()}
