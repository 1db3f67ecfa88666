"""Per-sample gradients for convolutions and PReLU, registered with Opacus' hooks mode.

Opacus computes per-sample gradients in ``hooks`` mode from each layer's input
(activations) and output gradient (backprops), with one function per layer type
(its ``GRAD_SAMPLERS`` registry). Its own convolution sampler unfolds the input
(``unfold3d``): at 64^3 that is about 2.5x a non-private step on this CPU. Its
``functorch`` mode re-runs every layer's forward and backward under ``vmap``: about
1.7x. This module registers, through Opacus' extension point
:func:`opacus.grad_sample.register_grad_sampler`, samplers that need neither:

* **Convolutions** (``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``): the weight
  gradient of every sample in one call of PyTorch's own convolution backward
  (``aten.convolution_backward``, weight gradient only), with the batch folded into
  the channels and ``groups`` multiplied by the batch size, so sample ``b``'s input
  channels only meet sample ``b``'s output gradient. This is the same arithmetic as
  the ordinary batch weight gradient, done per sample; no unfolding, no re-run
  forward. The bias gradient is the output gradient summed over space.
* **PReLU**: ``d out / d a = min(x, 0)``, so a sample's gradient is
  ``sum(min(x, 0) * backprops)`` over its voxels (per channel when it has one
  weight per channel).

A convolution whose input is padded by the layer itself in a mode other than zeros
(``padding_mode="reflect"`` etc.) or that uses string padding (``"same"``) is left to
functorch, which re-runs the layer and is therefore exact for any configuration.

Registration is global to the process (Opacus keeps one registry per mode) and
idempotent; :func:`register` is called when :mod:`fl_imaging.privacy.dp_sgd` is
imported, so every site that trains with ``privacy.grad_sample_mode=hooks`` uses
these samplers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from torch import nn

CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

_registered = False


def conv_weight_per_sample(
    layer: nn.modules.conv._ConvNd, activations: torch.Tensor, backprops: torch.Tensor
) -> torch.Tensor:
    """Per-sample weight gradients ``[B, *layer.weight.shape]`` of a convolution.

    Args:
        layer: a ``ConvNd`` or ``ConvTransposeNd`` with zeros padding given as numbers.
        activations: the layer's input ``[B, C_in, *spatial]``.
        backprops: the gradient of the loss with respect to its output ``[B, C_out, *]``.
    """
    batch = activations.shape[0]
    weight = layer.weight
    # Sample b's channels form group block b: a grouped convolution over one "sample"
    # whose channels are all samples' channels gives every sample's weight gradient.
    grouped_weight_shape = (batch * weight.shape[0], *weight.shape[1:])
    spatial = activations.dim() - 2
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        backprops.reshape(1, -1, *backprops.shape[2:]),
        activations.reshape(1, -1, *activations.shape[2:]),
        weight.new_empty(grouped_weight_shape),
        None,
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        layer.transposed,
        list(layer.output_padding) if layer.transposed else [0] * spatial,
        batch * layer.groups,
        [False, True, False],
    )
    return grad_weight.view(batch, *weight.shape)


def _uses_functorch(layer: nn.modules.conv._ConvNd) -> bool:
    """True when the layer pads by itself or has string padding: left to functorch."""
    return layer.padding_mode != "zeros" or isinstance(layer.padding, str)


def compute_conv_grad_sample(
    layer: nn.modules.conv._ConvNd,
    activations: Sequence[torch.Tensor],
    backprops: torch.Tensor,
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus grad sampler for convolutions: ``{parameter: per-sample gradient}``."""
    if _uses_functorch(layer):
        return ft_compute_per_sample_gradient(layer, activations, backprops)
    inputs = activations[0].to(backprops.dtype)
    result: dict[nn.Parameter, torch.Tensor] = {}
    if inputs.shape[0] == 0:  # an empty Poisson batch: zero gradients, as Opacus does
        if layer.weight.requires_grad:
            result[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)
        if layer.bias is not None and layer.bias.requires_grad:
            result[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)
        return result
    if layer.weight.requires_grad:
        result[layer.weight] = conv_weight_per_sample(layer, inputs, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = backprops.sum(dim=tuple(range(2, backprops.dim())))
    return result


def compute_prelu_grad_sample(
    layer: nn.PReLU, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus grad sampler for PReLU: ``sum(min(x, 0) * backprops)`` per sample (and channel)."""
    if not layer.weight.requires_grad:
        return {}
    inputs = activations[0].to(backprops.dtype)
    negative = torch.clamp(inputs, max=0) * backprops
    if layer.weight.numel() == 1:
        grad = negative.reshape(negative.shape[0], -1).sum(dim=1)
    else:  # one weight per channel (dim 1)
        grad = negative.sum(dim=tuple(range(2, negative.dim())))
    return {layer.weight: grad.reshape(negative.shape[0], *layer.weight.shape)}


def register() -> None:
    """Register the convolution and PReLU samplers with Opacus (once per process)."""
    global _registered
    if _registered:
        return
    register_grad_sampler(list(CONV_TYPES))(compute_conv_grad_sample)
    register_grad_sampler(nn.PReLU)(compute_prelu_grad_sample)
    _registered = True
