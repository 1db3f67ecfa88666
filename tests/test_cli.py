"""The ``fl-imaging`` command's data tools, called in-process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fl_imaging.tools.cli import main


def test_synth_then_check_data_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--cases", "12", "--fov-mm", "32"]) == 0
    manifests = sorted(out.glob("*/dataset.json"))
    assert len(manifests) == 3
    assert main(["check-data", *map(str, manifests)]) == 0
    assert "0 with problems" in capsys.readouterr().out


def test_check_data_fails_and_names_the_broken_file(
    tiny_sites: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site"
    shutil.copytree(tiny_sites[0].parent, site)
    label = sorted((site / "labelsTr").glob("*.nii.gz"))[0]
    label.write_bytes(b"not a nifti")
    assert main(["check-data", str(site / "dataset.json")]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {label.name.removesuffix('.nii.gz')}" in out and str(label) in out


def test_bad_config_override_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "experiment=demo", "train.lrr=1"]) == 2
    assert "train.lrr" in capsys.readouterr().err
