"""End to end: ``flwr run`` on a local simulation, 3 tiny hospitals x 2 rounds (~40 s)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from fl_imaging.data.manifest import load_manifest
from fl_imaging.outputs.reporting import read_metrics
from fl_imaging.tools.cli import main
from fl_imaging.tools.launch import local_superlink_pids, run_simulation
from tests.conftest import REPO_ROOT, tiny_overrides


@pytest.mark.e2e
def test_flwr_run_trains_three_sites_and_writes_the_run_folder(
    tiny_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flwr_home = tmp_path / ".flwr"
    monkeypatch.setenv("FLWR_HOME", str(flwr_home))
    overrides = [*tiny_overrides(tiny_sites, tmp_path), "model=unet_small", "train.local_epochs=2"]

    outcome = run_simulation("demo", overrides, project_root=REPO_ROOT)

    assert outcome.ok, outcome.status
    assert outcome.run_dir is not None and outcome.run_dir.parent == tmp_path / "outputs"
    run_dir = outcome.run_dir
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.md"):
        assert (run_dir / name).is_file(), name
    page = (run_dir / "report" / "index.html").read_text()
    sources = re.findall(r"<img src='([^']+)'", page)
    assert all((run_dir / "report" / src).is_file() for src in sources)
    for site in ("hospital_a", "hospital_b", "hospital_c"):  # overlays per site
        assert f"overlays_{site}.png" in sources
    assert any((run_dir / "tensorboard").iterdir())
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["sites"] == ["hospital_a", "hospital_b", "hospital_c"]
    assert set(summary["final_dice_per_site"]) == set(summary["sites"])
    rows = read_metrics(run_dir)
    mean_dice = {
        r: sum(row["dice_mean"] for row in rows if row["split"] == "val" and row["round"] == r) / 3
        for r in (0, 2)
    }
    assert mean_dice[2] > mean_dice[0]
    assert summary["final_dice_mean"] == pytest.approx(mean_dice[2])
    # the SuperLink this test started is gone again
    assert local_superlink_pids(flwr_home) == []


@pytest.mark.e2e
def test_a_site_with_broken_data_makes_fl_imaging_run_fail_loudly(
    tiny_sites: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # the audit: a site whose training case was truncated gave exit 0 and "finished"
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / ".flwr"))
    broken = tmp_path / "hospital_c"
    shutil.copytree(tiny_sites[2].parent, broken)
    victim = load_manifest(broken / "dataset.json").split("train")[0].images[0]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated download
    overrides = [
        *tiny_overrides([*tiny_sites[:2], broken / "dataset.json"], tmp_path),
        "rounds=1",
        "strategy.cross_site_epochs=0",
    ]

    code = main(["run", "--app", str(REPO_ROOT), "experiment=demo", *overrides])

    assert code == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and str(victim) in out
    [run_dir] = [p for p in (tmp_path / "outputs").iterdir() if not p.is_symlink()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished_with_failures"
    assert str(victim) in summary["failed_sites"]["hospital_c"]
    assert "hospital_c" in (run_dir / "report.md").read_text().split("## Validation")[0]
    assert not (tmp_path / "outputs" / "latest").exists()  # never an unfinished model
