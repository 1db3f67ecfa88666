"""scripts/bench_public_pretraining.py's public split: no patient is public and private."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "data_manifests" / "hippocampus" / "B_float.json"


def _script() -> ModuleType:
    return load_script("scripts/bench_public_pretraining.py")


def test_public_cases_leave_the_site_and_its_validation_cases_stay(tmp_path: Path) -> None:
    public, private, ids = _script().split_public(MANIFEST, 40, 0, tmp_path)
    site = json.loads(MANIFEST.read_text())["training"]
    pub = json.loads(public.read_text())["training"]
    priv = json.loads(private.read_text())["training"]
    assert len(ids) == 40 and sorted(e["case"] for e in pub) == ids
    assert not {e["case"] for e in pub} & {e["case"] for e in priv}
    assert sorted(e["case"] for e in pub + priv) == sorted(e["case"] for e in site)
    site_val = {e["case"] for e in site if e["split"] == "val"}
    assert site_val == {e["case"] for e in priv if e["split"] == "val"}
    assert not site_val & set(ids)  # drawn from training cases only
    assert all("split" not in e for e in pub)  # loading holds out its own 20 %
    # seeded: the same draw again, another seed another draw
    assert _script().split_public(MANIFEST, 40, 0, tmp_path / "again")[2] == ids
    assert _script().split_public(MANIFEST, 40, 1, tmp_path / "other")[2] != ids


def test_asking_for_more_public_cases_than_training_cases_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="119 training cases, cannot make 119"):
        _script().split_public(MANIFEST, 119, 0, tmp_path)


@pytest.mark.parametrize("count", [0, 1])
def test_fewer_than_two_public_cases_are_refused_before_anything_is_written(
    count: int, tmp_path: Path
) -> None:
    with pytest.raises(SystemExit, match=f"--public-cases {count}: at least 2 are needed"):
        _script().split_public(MANIFEST, count, 0, tmp_path / "split")
    assert not (tmp_path / "split").exists()
