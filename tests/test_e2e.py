"""End to end: ``flwr run`` on a local simulation, 3 tiny hospitals x 2 rounds (~40 s)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fl_imaging.launch import local_superlink_pids, run_simulation
from fl_imaging.reporting import read_metrics
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
