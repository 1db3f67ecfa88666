"""Checks of the configured sites against their manifests (what check-config adds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fl_imaging.config import compose
from fl_imaging.site.resolve import check_sites
from fl_imaging.tools.cli import main
from tests.conftest import tiny_overrides


def test_tiny_federation_has_no_problems(tiny_sites: list[Path], tmp_path: Path) -> None:
    assert check_sites(compose("demo", tiny_overrides(tiny_sites, tmp_path))) == []


def test_missing_manifest_names_site_and_file(tiny_sites: list[Path], tmp_path: Path) -> None:
    plan = compose(
        "demo",
        [
            *tiny_overrides(tiny_sites, tmp_path),
            f"federation.sites.1.manifest={tmp_path / 'nope.json'}",
        ],
    )
    [problem] = check_sites(plan)
    assert "federation.sites[hospital_b].manifest" in problem and "nope.json" in problem


def test_delta_must_be_below_one_over_training_cases(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    plan = compose(
        "demo",
        [
            *tiny_overrides(tiny_sites, tmp_path),
            "federation.sites.0.privacy.epsilon=8",
            "federation.sites.0.privacy.delta=0.4",
        ],
    )
    [problem] = check_sites(plan)
    assert "federation.sites[hospital_a].privacy.delta=0.4 must be below 1/" in problem


def test_labels_disagreeing_with_data_config_are_a_site_problem(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    site_dir = tmp_path / "hospital_c"
    shutil.copytree(tiny_sites[2].parent, site_dir)
    doc = json.loads((site_dir / "dataset.json").read_text())
    doc["labels"] = {"0": "background", "1": "lesion"}
    (site_dir / "dataset.json").write_text(json.dumps(doc))
    manifests = [*tiny_sites[:2], site_dir / "dataset.json"]
    [problem] = check_sites(compose("demo", tiny_overrides(manifests, tmp_path)))
    assert "federation.sites[hospital_c]" in problem and "labels" in problem


def test_check_config_prints_config_and_every_problem(
    tiny_sites: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "check-config",
        "experiment=demo",
        *tiny_overrides(tiny_sites, tmp_path),
        f"federation.sites.2.manifest={tmp_path / 'missing.json'}",
        "train.lr=-1",
        "federation.sites.0.privacy.epsilon=0",
    ]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "federation:" in out and "3 problem(s)" in out
    assert "train.lr" in out and "hospital_c" in out and "privacy.epsilon" in out


def test_check_config_accepts_the_tiny_federation(
    tiny_sites: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", "experiment=demo", *tiny_overrides(tiny_sites, tmp_path)]) == 0
    assert "config OK" in capsys.readouterr().out
