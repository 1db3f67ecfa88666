"""A DP-friendly segmentation network: fixed multi-scale image features and a small trained head.

Under DP-SGD every trained weight gets the same noise, while a UNet's deep weights get
almost none of a patient's clipped gradient: measured on the hippocampus pseudo-sites,
the output stage takes most of it, so the deep levels stay noisy random features
(docs/RESULTS.md). Tramèr and Boneh (ICLR 2021, "Differentially private learning needs
better features") showed the way out for small private datasets: features that are
*designed*, not learnt, and a small learnt model on top.

:class:`FixedFeatures` computes, with no weight at all, for every input channel:

- the intensity; at each of ``scales`` (voxels) the Gaussian-smoothed intensity, its
  Laplacian and its gradient magnitude (MONAI's separable Gaussian filtering, then
  scale-normalised central differences);
- at each of ``hessian_scales`` the three eigenvalues of the Hessian (blob, tube and
  sheet detectors);

each normalised per case and channel (instance normalisation: one case's statistics,
as DP-SGD needs), plus three coordinate channels: each voxel's offset from the volume's
centre in units of 32 voxels, so that a head can use where a voxel is (the same under
MONAI's symmetric padding for training patches and sliding windows).

:class:`FeatureHeadNet` puts a per-voxel MLP on them (``model.act`` between its linear
layers): a few thousand trained weights, each of which sees the whole of a patient's gradient.
Nothing is pre-trained and no data chose the features: a private run with it still
starts from random weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from torch import nn

COORDINATE_UNIT = 32.0  # voxels per unit of the coordinate channels


class FixedFeatures(nn.Module):
    """Hand-crafted multi-scale features of a 3D image (no trainable weight).

    Maps ``[B, C, X, Y, Z]`` to ``[B, C x (1 + 3 len(scales) + 3 len(hessian_scales)) + 3,
    X, Y, Z]`` (see the module docstring). Each scale smooths once (MONAI's separable
    Gaussian filter, truncated at 4 sigma, replicate padding); the derivatives are
    central differences of the smoothed image, scale-normalised (order ``n`` times
    ``sigma^n``).
    """

    def __init__(self, scales: Sequence[float], hessian_scales: Sequence[float]) -> None:
        super().__init__()
        if any(s <= 0 for s in (*scales, *hessian_scales)):
            raise ValueError(f"feature scales must be > 0, got {[*scales, *hessian_scales]}")
        self.scales = tuple(float(s) for s in scales)
        self.hessian_scales = tuple(float(s) for s in hessian_scales)
        for i, sigma in enumerate((*self.scales, *self.hessian_scales)):
            kernel = gaussian_1d(torch.tensor(sigma), truncated=4.0, approx="sampled")
            self.register_buffer(f"gaussian{i}", kernel / kernel.sum(), persistent=False)

    def channels_per_input(self) -> int:
        """Feature channels per input channel (the coordinates come on top, once)."""
        return 1 + 3 * len(self.scales) + 3 * len(self.hessian_scales)

    def _smooth(self, x: torch.Tensor, index: int) -> torch.Tensor:
        return separable_filtering(x, getattr(self, f"gaussian{index}"), mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of ``x`` (``[B, C, X, Y, Z]``), as described in the module docstring."""
        features = [x]
        for i, sigma in enumerate(self.scales):
            smooth = self._smooth(x, i)
            first = torch.gradient(smooth, dim=(2, 3, 4))
            laplacian = sum(torch.gradient(d, dim=a + 2)[0] for a, d in enumerate(first))
            magnitude = torch.sqrt(sum(d * d for d in first) + 1e-12)
            features += [smooth, laplacian * sigma**2, magnitude * sigma]
        for j, sigma in enumerate(self.hessian_scales):
            smooth = self._smooth(x, len(self.scales) + j)
            features.extend(hessian_eigenvalues(smooth, sigma))
        image = F.instance_norm(torch.cat(features, dim=1), eps=1e-5)
        return torch.cat([image, self._coordinates(x)], dim=1)

    @staticmethod
    def _coordinates(x: torch.Tensor) -> torch.Tensor:
        axes = [
            (torch.arange(n, device=x.device, dtype=x.dtype) - (n - 1) / 2) / COORDINATE_UNIT
            for n in x.shape[2:]
        ]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
        return grid.unsqueeze(0).expand(x.shape[0], -1, -1, -1, -1)


def hessian_eigenvalues(smooth: torch.Tensor, sigma: float) -> list[torch.Tensor]:
    """The three eigenvalues (ascending) of the scale-normalised Hessian of ``smooth``.

    Central differences for the Hessian; the closed form of a symmetric 3x3 matrix's
    eigenvalues (Smith, CACM 1961), elementwise, instead of a batched eigensolver.
    """
    first = torch.gradient(smooth, dim=(2, 3, 4))
    second = [torch.gradient(d, dim=(2, 3, 4)) for d in first]
    scale = sigma**2
    a11, a22, a33 = (second[k][k] * scale for k in range(3))
    a12, a13, a23 = (
        (second[i][j] + second[j][i]) * (scale / 2) for i, j in ((0, 1), (0, 2), (1, 2))
    )
    q = (a11 + a22 + a33) / 3
    off = a12 * a12 + a13 * a13 + a23 * a23
    p = torch.sqrt(((a11 - q) ** 2 + (a22 - q) ** 2 + (a33 - q) ** 2 + 2 * off) / 6).clamp_min(
        1e-12
    )
    b11, b22, b33 = ((v - q) / p for v in (a11, a22, a33))
    b12, b13, b23 = (v / p for v in (a12, a13, a23))
    det = (
        b11 * (b22 * b33 - b23 * b23)
        - b12 * (b12 * b33 - b23 * b13)
        + b13 * (b12 * b23 - b22 * b13)
    )
    phi = torch.acos((det / 2).clamp(-1.0, 1.0)) / 3
    largest = q + 2 * p * torch.cos(phi)
    smallest = q + 2 * p * torch.cos(phi + 2 * math.pi / 3)
    return [smallest, 3 * q - largest - smallest, largest]


class FeatureHeadNet(nn.Module):
    """:class:`FixedFeatures` and a per-voxel MLP head: ``[B, C, ...]`` to logits ``[B, out, ...]``.

    ``hidden``: the head's hidden widths, each a linear layer over a voxel's features
    followed by ``activation()``. Linear layers on channels-last features rather than
    ``1x1x1`` convolutions: the same function, and Opacus' per-sample gradients of a
    linear layer are one ``einsum``; with a fixed LeakyReLU (no weights of its own) it
    was the fastest DP-SGD step measured (docs/RESULTS.md).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: Sequence[int],
        scales: Sequence[float],
        hessian_scales: Sequence[float],
        activation: Callable[[], nn.Module] = nn.PReLU,
    ) -> None:
        super().__init__()
        self.features = FixedFeatures(scales, hessian_scales)
        width = in_channels * self.features.channels_per_input() + 3
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), activation()]
            width = h
        layers.append(nn.Linear(width, out_channels))
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every voxel of ``x``."""
        with torch.no_grad():
            features = self.features(x)
        return self.head(features.movedim(1, -1)).movedim(-1, 1)
