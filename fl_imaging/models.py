"""MONAI network factory.

Only ``monai.networks.nets.UNet`` is offered for now: it is the MONAI 3D network
that Opacus can compute per-sample gradients for without patching (BasicUNet and
SegResNet use in-place ops that break Opacus' hooks).
"""

from __future__ import annotations

from monai.networks.layers import Norm
from monai.networks.nets import UNet
from torch import nn

from fl_imaging.config import ModelConfig

# instance: InstanceNorm without affine weights or running statistics; group: GroupNorm
# (per-case statistics too, with affine weights); both are per-sample, as DP-SGD needs
_NORMS = {"instance": Norm.INSTANCE, "group": Norm.GROUP, "batch": Norm.BATCH}
# prelu: MONAI's default (a learnt negative slope, initialised at 0.25); leakyrelu: that
# slope fixed at 0.25, no weights of its own, so DP-SGD computes no per-sample
# gradients for it (cheaper steps, the same function as prelu at initialisation)
_ACTS: dict[str, str | tuple[str, dict[str, float]]] = {
    "prelu": "prelu",
    "relu": "relu",
    "leakyrelu": ("leakyrelu", {"negative_slope": 0.25}),
}


def _norm(model: ModelConfig) -> str | tuple[str, dict[str, int]]:
    if model.norm == "group":
        return (Norm.GROUP, {"num_groups": model.num_groups})
    return _NORMS[model.norm]


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
    if model.name != "unet":
        raise ValueError(f"model.name {model.name!r} is unknown; choose 'unet'")
    if model.norm not in _NORMS:
        raise ValueError(f"model.norm {model.norm!r} is unknown; choose one of {sorted(_NORMS)}")
    if model.act not in _ACTS:
        raise ValueError(f"model.act {model.act!r} is unknown; choose one of {sorted(_ACTS)}")
    if in_channels < 1 or out_channels < 2:
        raise ValueError(
            f"need in_channels >= 1 and out_channels >= 2, got {in_channels}, {out_channels}"
        )
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(model.channels),
        strides=tuple(model.strides),
        num_res_units=model.num_res_units,
        norm=_norm(model),
        act=_ACTS[model.act],
        dropout=model.dropout,
    )
