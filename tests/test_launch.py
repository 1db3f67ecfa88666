"""The launcher hands ``flwr run`` a staged copy of the app that bundles identically."""

from __future__ import annotations

import zipfile
from io import BytesIO
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from fl_imaging.tools.bundle import stage_app

ROOT = Path(__file__).resolve().parent.parent


def _members(fab: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(BytesIO(fab)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_staged_app_bundles_exactly_like_the_project(tmp_path: Path) -> None:
    # something Flower leaves out must stay out; something it bundles must stay in
    ignored = ROOT / "state" / "staging-probe.json"
    ignored.parent.mkdir(exist_ok=True)
    ignored.write_text("{}")
    try:
        staged = stage_app(ROOT, tmp_path / "app")
        expected = _members(build_fab_from_disk(ROOT))
    finally:
        ignored.unlink()
    got = _members(build_fab_from_disk(staged))
    assert "fl_imaging/tools/launch.py" in got and "pyproject.toml" in got
    assert not any(name.startswith(("state/", ".venv/", ".flwr/")) for name in got)
    assert got == expected
    assert not (staged / ".venv").exists() and not (staged / ".git").exists()
