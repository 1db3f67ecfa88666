"""Shared fixtures: tiny synthetic hospitals and the real config, shrunk."""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from fl_imaging.config import RunPlan, compose
from fl_imaging.data.synthetic import generate_federation

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_HIPPOCAMPUS = REPO_ROOT.parent / "shared" / "data" / "msd_hippocampus"


@functools.cache
def load_script(relative: str) -> ModuleType:
    """A script of the repository (e.g. ``scripts/bench_public_pretraining.py``) as a module.

    Its folder goes on ``sys.path`` first, so that it can import its sibling scripts.
    """
    path = REPO_ROOT / relative
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"{path.stem}_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the ``gpu`` tests where torch sees no CUDA device (``-ra`` lists them)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch sees none on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three synthetic hospitals with ~16^3 volumes (fov 32 mm), 18 cases in all."""
    out = tmp_path_factory.mktemp("sites")
    return generate_federation(out, num_sites=3, total_cases=18, fov_mm=32.0, seed=0)


@pytest.fixture(scope="session")
def dp_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three synthetic hospitals with 80 tiny cases each: DP-SGD needs many patients."""
    out = tmp_path_factory.mktemp("dp_sites")
    return generate_federation(out, num_sites=3, total_cases=240, skew=0.0, fov_mm=32.0, seed=0)


def tiny_overrides(manifests: list[Path], root: Path) -> list[str]:
    """Overrides that shrink the real demo config to tiny data, model and rounds."""
    sites = [f"federation.sites.{i}.manifest={m}" for i, m in enumerate(manifests)]
    return [
        *sites,
        "model=unet_tiny",
        "data.patch_size=[16,16,16]",
        "rounds=2",
        "train.local_epochs=1",
        f"paths.root={root}",
    ]


@pytest.fixture
def tiny_plan(tiny_sites: list[Path], tmp_path: Path) -> RunPlan:
    """The real ``demo`` experiment shrunk to the tiny hospitals, writing under tmp_path."""
    return compose("demo", tiny_overrides(tiny_sites, tmp_path))


@pytest.fixture
def task_identity() -> Iterator[None]:
    # Flower's strategies stamp the run id on each message they create; the
    # ServerApp process sets it, a bare test process must do so itself.
    from flwr.supercore.task_identity import TaskIdentity

    previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous
