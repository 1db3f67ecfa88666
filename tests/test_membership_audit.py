"""Membership-inference audit (AUC with a bootstrap interval) and warm start, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_imaging.config import compose, plan_to_yaml
from fl_imaging.outputs.reporting import PRIVACY_AUDIT_FILE, RunFolder, read_summary
from fl_imaging.privacy.membership import attack_auc, audit
from fl_imaging.server import rounds as server
from fl_imaging.tools.cli import main
from tests.conftest import tiny_overrides
from tests.local_grid import LocalGrid


def test_attack_auc_ranks_lower_losses_as_members() -> None:
    assert attack_auc([0.1, 0.2, 0.3], [0.5, 0.6]) == pytest.approx(1.0)
    assert attack_auc([0.5, 0.6], [0.1, 0.2, 0.3]) == pytest.approx(0.0)
    assert attack_auc([0.1, 0.5], [0.1, 0.5]) == pytest.approx(0.5)
    result = audit("a", [0.1, 0.2, 0.35, 0.4], [0.3, 0.5, 0.6], resamples=200)
    assert result.low <= result.auc <= result.high
    assert (result.members, result.non_members) == (4, 3)
    with pytest.raises(ValueError, match="site a: the audit needs training and validation"):
        audit("a", [0.1], [])


def test_audit_of_a_run_and_warm_start_from_its_checkpoint(
    tiny_sites: list[Path], tmp_path: Path, task_identity: None, capsys: pytest.CaptureFixture
) -> None:
    overrides = [*tiny_overrides(tiny_sites, tmp_path), "strategy.cross_site_epochs=0"]
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    server.run_federation(LocalGrid(overrides), plan, run, run_id=1)

    assert main(["privacy", "audit", str(run.path), "--resamples", "50"]) == 0
    printed = capsys.readouterr().out
    stored = json.loads((run.path / PRIVACY_AUDIT_FILE).read_text())
    assert [row["site"] for row in stored["sites"]] == plan.site_names
    for row in stored["sites"]:
        assert 0.0 <= row["low"] <= row["auc"] <= row["high"] <= 1.0
        assert set(row) == {"site", "auc", "low", "high", "members", "non_members"}
        assert f"{row['auc']:.3f}" in printed
    assert "Membership-inference audit" in (run.path / "report.md").read_text()
    assert main(["privacy", "audit", str(run.path), "--site", "nowhere"]) == 2

    # warm start: a second run from the first one's final weights starts where it ended
    final = read_summary(run.path)["final_dice_per_site"]
    warm = [*overrides, f"model.init_checkpoint={run.path / 'checkpoints' / 'last.pt'}", "rounds=1"]
    plan2 = compose("demo", warm)
    run2 = RunFolder.create(tmp_path / "outputs2", plan2.name, plan_to_yaml(plan2))
    server.run_federation(LocalGrid(warm), plan2, run2, run_id=2)
    rows = [json.loads(line) for line in (run2.path / "metrics.jsonl").read_text().splitlines()]
    round0 = {r["site"]: r["dice_mean"] for r in rows if r["split"] == "val" and r["round"] == 0}
    assert round0 == pytest.approx(final, abs=1e-6)
