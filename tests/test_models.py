"""The network factory."""

from __future__ import annotations

import pytest
import torch

from fl_imaging.config import ModelConfig, compose
from fl_imaging.ml.models import build_model


@pytest.mark.parametrize(("in_channels", "out_channels"), [(1, 3), (2, 3), (4, 2)])
@pytest.mark.parametrize("size", ["unet_tiny", "unet_small"])
def test_forward_shape(size: str, in_channels: int, out_channels: int) -> None:
    model = build_model(
        compose("demo", f"model={size}").model, in_channels=in_channels, out_channels=out_channels
    )
    x = torch.zeros(2, in_channels, 16, 16, 16)
    assert model(x).shape == (2, out_channels, 16, 16, 16)


def test_unknown_model_name_is_named() -> None:
    with pytest.raises(ValueError, match=r"model\.name 'segresnet'"):
        build_model(ModelConfig(name="segresnet"), in_channels=1, out_channels=2)


@pytest.mark.parametrize("act", ["prelu", "relu", "leakyrelu"])
def test_activations_build_and_leakyrelu_has_no_weights(act: str) -> None:
    config = compose("demo", ["model=unet_tiny", f"model.act={act}"]).model
    model = build_model(config, in_channels=1, out_channels=3)
    assert model(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    acts = [m for m in model.modules() if isinstance(m, (torch.nn.PReLU, torch.nn.LeakyReLU))]
    if act == "leakyrelu":
        assert acts and all(m.negative_slope == 0.25 for m in acts)
        assert all(not list(m.parameters()) for m in acts)


def test_unknown_activation_is_named() -> None:
    with pytest.raises(ValueError, match=r"model\.act 'gelu'"):
        build_model(ModelConfig(act="gelu"), in_channels=1, out_channels=2)
