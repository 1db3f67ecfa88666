"""Hydra multirun sweep: the one slow subprocess test (two short runs + one failing job)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fl_imaging.tools.sweep import varying_overrides
from tests.conftest import REPO_ROOT, tiny_overrides


def test_varying_overrides_keep_only_what_changes() -> None:
    short = varying_overrides(["a=1 b=2 c=x", "a=1 b=3 c=x"])
    assert short == {"a=1 b=2 c=x": "b=2", "a=1 b=3 c=x": "b=3"}


@pytest.mark.e2e
def test_sweep_runs_each_job_and_summarises_failures_too(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_sites, tmp_path) if not o.startswith("rounds=")]
    cmd = [
        sys.executable,
        "-m",
        "fl_imaging.tools.cli",
        "sweep",
        "-m",
        "experiment=demo",
        *overrides,
        "rounds=1",
        "train.lr=0.003,0.001,-1",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / ".flwr")}
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # one job failed

    with (sweep_dir / "sweep_summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    done = [r for r in rows if r["status"] == "finished:completed"]
    assert sorted({r["job"] for r in done}) == ["0", "1"]
    assert sorted(r["site"] for r in done if r["job"] == "0") == [
        "hospital_a",
        "hospital_b",
        "hospital_c",
    ]
    assert all(0.0 <= float(r["final_dice"]) <= 1.0 and r["rounds"] == "1" for r in done)
    [failed] = [r for r in rows if r["job"] == "2"]
    assert failed["status"] == "failed" and "train.lr" in failed["error"]
    for job in ("0", "1"):
        run_dirs = [
            p
            for p in (sweep_dir / job).iterdir()
            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
        ]
        assert len(run_dirs) == 1 and (run_dirs[0] / "summary.json").is_file()
        assert (run_dirs[0] / "config.yaml").is_file()
    assert (sweep_dir / "sweep_summary.png").stat().st_size > 1000
