"""The DP-friendly network of fixed image features and a small trained head (model=features)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fl_imaging.config import ConfigError, compose
from fl_imaging.ml.features import FixedFeatures, hessian_eigenvalues
from fl_imaging.ml.models import new_model
from fl_imaging.ml.training import LocalRecipe
from fl_imaging.privacy.dp_sgd import DpSgdSettings, check_private_model, train_private


def _features_model() -> torch.nn.Module:
    items = ["model=features_dp", "model.channels=[8]", "data.modalities=[T1,T2]"]
    return new_model(compose("demo_private", items))


def test_only_the_head_has_weights_and_the_features_ignore_them() -> None:
    model = _features_model()
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.startswith("head.") for n in names)
    assert not list(model.features.parameters())
    check_private_model(model)  # Opacus can train it
    # 2 modalities: 16 features each (intensity, 3 per scale, 3 per Hessian scale), 3
    # coordinates once
    assert model.features.channels_per_input() == 1 + 3 * 3 + 3 * 2
    x = torch.randn(2, 2, 12, 10, 8)
    assert model(x).shape == (2, 3, 12, 10, 8)
    assert model.features(x).shape == (2, 2 * 16 + 3, 12, 10, 8)


def test_feature_channels_are_normalised_per_case_and_coordinates_are_centred() -> None:
    features = FixedFeatures([1.0, 2.0], [1.5])
    x = torch.randn(3, 1, 9, 11, 7).cumsum(2) * 50 + 1000  # any intensity scale
    out = features(x)
    image, coords = out[:, :-3], out[:, -3:]
    flat = image.reshape(3, image.shape[1], -1)
    assert torch.allclose(flat.mean(-1), torch.zeros(3, image.shape[1]), atol=1e-4)
    assert torch.allclose(flat.std(-1), torch.ones(3, image.shape[1]), atol=1e-2)
    # a case's features do not depend on the other cases of the batch (per-sample)
    assert torch.allclose(features(x[:1]), out[:1], atol=1e-3)  # float32 at ~1000
    # the centre voxel is at 0 along each axis, one voxel is 1/32
    assert float(coords[0, 0, 4, 5, 3]) == 0.0
    assert float(coords[0, 1, 4, 6, 3]) == pytest.approx(1 / 32)
    assert float(coords[0, 2, 4, 5, 0]) == pytest.approx(-3 / 32)


def test_closed_form_hessian_eigenvalues_equal_an_eigensolvers() -> None:
    torch.manual_seed(0)
    smooth = torch.randn(2, 1, 10, 12, 9).cumsum(2).cumsum(3)
    mine = torch.stack(hessian_eigenvalues(smooth, 2.0), -1)
    first = torch.gradient(smooth, dim=(2, 3, 4))
    second = [torch.gradient(d, dim=(2, 3, 4)) for d in first]
    rows = [
        torch.stack([(second[a][b] + second[b][a]) / 2 for b in range(3)], -1) for a in range(3)
    ]
    reference = torch.linalg.eigvalsh(torch.stack(rows, -2) * 4.0)
    assert torch.allclose(mine, reference, atol=1e-4 * float(reference.abs().max()))
    # a constant image: every eigenvalue 0, no NaN from the degenerate case
    flat = hessian_eigenvalues(torch.ones(1, 1, 6, 6, 6), 1.0)
    assert all(float(v.abs().max()) < 1e-9 for v in flat)


def test_a_private_round_trains_only_the_head() -> None:
    model = _features_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 2, 8, 8, 8, generator=g)
    labels = (torch.rand(6, 1, 8, 8, 8, generator=g) > 0.7).float()
    weights, result, history = train_private(
        model,
        DataLoader(TensorDataset(images, labels), batch_size=6),
        LocalRecipe(epochs=2, lr=0.3, optimizer="sgd"),
        DpSgdSettings(noise_multiplier=1.0, max_grad_norm=0.1),
        history=[],
    )
    assert result.steps == 2 and len(history) == 1
    assert set(weights) == set(before)
    assert all(not torch.equal(weights[n], before[n]) for n in before)


def test_the_features_model_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"model.strides must be \[\]"):
        compose("demo", ["model=features_dp", "model.strides=[2]"])
    with pytest.raises(ConfigError, match=r"must be > 0"):
        compose("demo", ["model=features_dp", "model.scales=[0.0]"])
    with pytest.raises(ConfigError, match=r"model.name 'resnet' is unknown"):
        compose("demo", ["model.name=resnet"])
