"""Where a site trains: ``train.device`` (auto, cpu, cuda[:i])."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl_imaging.config import ConfigError, RunPlan, compose
from fl_imaging.ml.devices import select_device
from fl_imaging.ml.models import new_model
from fl_imaging.site.resolve import resolve_site
from fl_imaging.site.rounds import train_round
from tests.conftest import tiny_overrides


def test_auto_picks_cuda_only_when_the_machine_has_it() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device("cpu") == torch.device("cpu")


def test_asking_for_a_missing_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        assert select_device("cuda:0").type == "cuda"
    else:
        with pytest.raises(ValueError, match=r"no CUDA device"):
            select_device("cuda")


@pytest.mark.parametrize("device", ["gpu", "cuda0", "tpu"])
def test_unknown_device_names_are_config_errors(
    device: str, tiny_sites: list[Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"train\.device"):
        compose("demo", [*tiny_overrides(tiny_sites, tmp_path), f"train.device={device}"])


def test_a_site_trains_on_the_configured_device_and_returns_cpu_weights(
    tiny_plan: RunPlan,
) -> None:
    site = resolve_site({"partition-id": 0}, tiny_plan)
    outcome = train_round(site, tiny_plan, new_model(tiny_plan).state_dict(), server_round=1)
    assert outcome.weights is not None
    assert {t.device.type for t in outcome.weights.values()} == {"cpu"}
