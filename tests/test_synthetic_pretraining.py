"""scripts/bench_synthetic_pretraining.py: synthetic hospitals pre-train a model that fits
the private hippocampus recipe."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from fl_imaging.config import compose
from fl_imaging.ml.models import initial_weights, new_model
from tests.conftest import load_script


def _script() -> ModuleType:
    return load_script("scripts/bench_synthetic_pretraining.py")


def test_the_synthetic_sites_are_seeded_and_name_three_manifests(tmp_path: Path) -> None:
    make = _script().synthetic_sites
    first = make(tmp_path / "a", cases=12, skew=0.5, fov_mm=32.0, seed=3)
    make(tmp_path / "b", cases=12, skew=0.5, fov_mm=32.0, seed=3)
    keys = [item.split("=", 1)[0] for item in first]
    assert keys == [f"federation.sites.{i}.manifest" for i in range(3)]
    manifests = [Path(item.split("=", 1)[1]) for item in first]
    assert all(m.is_file() and m.parent.parent == tmp_path / "a" for m in manifests)

    def scans(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.nii.gz")}

    assert scans(tmp_path / "a") and scans(tmp_path / "a") == scans(tmp_path / "b")
    plan = compose("demo", [*first, "model=unet_dp", f"paths.root={tmp_path}"])
    assert [Path(s.manifest) for s in plan.federation.sites] == manifests


def test_a_model_pretrained_by_default_fits_the_private_hippocampus_recipe(
    tmp_path: Path,
) -> None:
    # the script's default pre-training must make a checkpoint that hippocampus_private
    # with the small UNet accepts as model.init_checkpoint (same keys and shapes)
    script = _script()
    pretraining = compose(
        script.DEFAULT_PRETRAIN_EXPERIMENT, [*script.DEFAULT_PRETRAIN, f"paths.root={tmp_path}"]
    )
    weights = new_model(pretraining).state_dict()
    checkpoint = tmp_path / "best.pt"
    torch.save({"state_dict": weights, "round": 12}, checkpoint)
    private = compose(
        "hippocampus_private",
        ["model=unet_dp", f"model.init_checkpoint={checkpoint}", f"paths.root={tmp_path}"],
    )
    loaded = initial_weights(private)
    assert set(loaded) == set(weights)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
