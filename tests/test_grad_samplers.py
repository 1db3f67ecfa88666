"""fl-imaging's Opacus grad samplers equal per-sample gradients computed one sample at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fl_imaging.config import ModelConfig
from fl_imaging.ml.models import build_model
from fl_imaging.privacy import grad_samplers
from fl_imaging.privacy.grad_samplers import compute_conv_grad_sample, compute_prelu_grad_sample

BATCH = 3


def _reference(layer: nn.Module, inputs: torch.Tensor, grad_out: torch.Tensor) -> dict:
    """Per-sample gradients by running each sample through autograd on its own."""
    per_sample: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layer.named_parameters()}
    for b in range(inputs.shape[0]):
        layer.zero_grad(set_to_none=True)
        layer(inputs[b : b + 1]).backward(grad_out[b : b + 1])
        for name, param in layer.named_parameters():
            per_sample[name].append(param.grad.clone())
    return {n: torch.stack(g) for n, g in per_sample.items()}


def _check(layer: nn.Module, input_shape: tuple[int, ...], sampler) -> None:
    torch.manual_seed(0)
    inputs = torch.randn(BATCH, *input_shape, dtype=torch.float64)
    layer = layer.double()
    with torch.no_grad():
        grad_out = torch.randn_like(layer(inputs))
    expected = _reference(layer, inputs, grad_out)
    got = sampler(layer, [inputs], grad_out)
    assert set(got) == set(layer.parameters())
    for name, param in layer.named_parameters():
        assert got[param].shape == (BATCH, *param.shape), name
        torch.testing.assert_close(got[param], expected[name], rtol=1e-9, atol=1e-9)


CONVS = [
    (nn.Conv3d(2, 5, 3, padding=1), (2, 6, 7, 5)),
    (nn.Conv3d(4, 6, 3, stride=2, padding=1, bias=False), (4, 9, 8, 7)),
    (nn.Conv3d(4, 6, (3, 1, 2), stride=(1, 2, 1), dilation=(2, 1, 1), groups=2), (4, 8, 6, 5)),
    (nn.Conv3d(3, 2, 1), (3, 4, 4, 4)),
    (nn.ConvTranspose3d(4, 3, 3, stride=2, padding=1, output_padding=1), (4, 4, 5, 3)),
    (nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2, bias=False), (4, 3, 3, 3)),
    (nn.Conv2d(2, 3, 3, padding=2, dilation=2), (2, 8, 6)),
    (nn.ConvTranspose1d(2, 3, 4, stride=3, padding=1), (2, 7)),
    # the layer pads by itself or pads by name: handed to functorch, still exact
    (nn.Conv3d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 5, 5, 5)),
    (nn.Conv3d(2, 3, 3, padding="same"), (2, 5, 6, 5)),
]


@pytest.mark.parametrize(("layer", "input_shape"), CONVS, ids=lambda v: str(v)[:60])
def test_conv_per_sample_gradients_match_one_sample_at_a_time(layer, input_shape) -> None:
    _check(layer, input_shape, compute_conv_grad_sample)


@pytest.mark.parametrize("num_parameters", [1, 4])
def test_prelu_per_sample_gradients_match_one_sample_at_a_time(num_parameters) -> None:
    layer = nn.PReLU(num_parameters=num_parameters, init=0.3)
    _check(layer, (4, 3, 5, 2), compute_prelu_grad_sample)


def test_empty_batch_gives_zero_gradients_of_the_right_shape() -> None:
    layer = nn.Conv3d(2, 3, 3, padding=1)
    got = compute_conv_grad_sample(layer, [torch.zeros(0, 2, 4, 4, 4)], torch.zeros(0, 3, 4, 4, 4))
    assert got[layer.weight].shape == (1, *layer.weight.shape)
    assert not got[layer.weight].any() and not got[layer.bias].any()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("num_res_units", [0, 2])
def test_unet_hooks_mode_equals_functorch_mode(num_res_units: int) -> None:
    """Through Opacus: the whole MONAI UNet's per-sample gradients, hooks vs functorch."""
    grad_samplers.register()
    torch.manual_seed(0)
    config = ModelConfig(channels=[4, 8, 8], strides=[2, 2], num_res_units=num_res_units)
    model = build_model(config, in_channels=1, out_channels=3).double()
    images = torch.randn(BATCH, 1, 12, 12, 12, dtype=torch.float64)
    samples = {}
    for mode in ("hooks", "functorch"):
        wrapped = GradSampleModule(copy.deepcopy(model), force_functorch=mode == "functorch")
        wrapped(images).square().mean().backward()
        samples[mode] = {n: p.grad_sample for n, p in wrapped.named_parameters()}
    assert samples["hooks"].keys() == samples["functorch"].keys()
    names = list(samples["hooks"])
    assert any("conv" in n for n in names) and any("adn.A" in n for n in names)  # PReLU
    for name, expected in samples["functorch"].items():
        torch.testing.assert_close(samples["hooks"][name], expected, rtol=1e-8, atol=1e-10)
