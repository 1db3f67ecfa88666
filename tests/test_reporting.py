"""The run folder writer and the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fl_imaging.outputs.reporting import (
    RunFolder,
    dice_table,
    last_started_run,
    read_metrics,
    write_report,
)


def test_create_writes_config_and_latest_moves_only_to_a_completed_run(tmp_path: Path) -> None:
    first = RunFolder.create(tmp_path, "demo", "a: 1\n")
    first.mark_latest()  # the server marks a run that completed
    second = RunFolder.create(tmp_path, "demo", "a: 2\n")
    assert first.path != second.path  # same second: distinct folders
    assert (second.path / "config.yaml").read_text() == "a: 2\n"
    # the second has not completed (it may fail): latest still names the first
    assert (tmp_path / "latest").resolve() == first.path
    assert last_started_run(tmp_path) == second.path  # what resume=latest continues
    second.mark_latest()
    assert (tmp_path / "latest").resolve() == second.path


def test_metrics_append_and_nan_becomes_null(tmp_path: Path) -> None:
    run = RunFolder.create(tmp_path, "x", "")
    run.append_metrics([{"round": 0, "site": "a", "split": "val", "dice_mean": float("nan")}])
    run.append_metrics([{"round": 1, "site": "a", "split": "val", "dice_mean": 0.5}])
    rows = read_metrics(run.path)
    assert [r["dice_mean"] for r in rows] == [None, 0.5]
    assert dice_table(rows) == ([1], {"a": {1: 0.5}})


def test_checkpoint_and_summary_are_replaced_whole(tmp_path: Path) -> None:
    run = RunFolder.create(tmp_path, "x", "")
    run.save_checkpoint("last", {"w": torch.ones(2)}, round=1)
    run.save_checkpoint("last", {"w": torch.zeros(2)}, round=2)
    ckpt = torch.load(run.path / "checkpoints" / "last.pt")
    assert ckpt["round"] == 2 and torch.equal(ckpt["state_dict"]["w"], torch.zeros(2))
    run.write_summary({"rounds_completed": 2})
    assert json.loads((run.path / "summary.json").read_text()) == {"rounds_completed": 2}
    assert sorted(p.name for p in run.path.rglob(".*tmp")) == []


def test_report_tabulates_every_round_and_site(tmp_path: Path) -> None:
    run = RunFolder.create(tmp_path, "x", "")
    run.append_metrics(
        {"round": r, "site": s, "split": "val", "dice_mean": d}
        for r, s, d in [(0, "a", 0.1), (0, "b", 0.3), (1, "a", 0.6), (1, "b", 0.8)]
    )
    run.write_summary({"rounds_completed": 1, "final_dice_mean": 0.7})
    write_report(run.path)
    text = (run.path / "report.md").read_text()
    assert "| 0 | 0.100 | 0.300 | 0.200 |" in text
    assert "| 1 | 0.600 | 0.800 | 0.700 |" in text
    assert (run.path / "report" / "dice.png").stat().st_size > 1000


def test_report_lists_nodes_the_server_refused(tmp_path: Path) -> None:
    run = RunFolder.create(tmp_path, "x", "")
    run.append_metrics([{"round": 0, "site": "a", "split": "val", "dice_mean": 0.5}])
    refusal = {
        "node": 7,
        "claimed_site": "a",
        "key_fingerprint": "ab" * 32,
        "reason": "its key abab... belongs to no site in federation.site_keys",
    }
    run.write_summary({"rounds_completed": 0, "status": "finished", "refused_nodes": [refusal]})
    write_report(run.path)
    text = (run.path / "report.md").read_text()
    assert "## Nodes the server refused (identity not verified)" in text
    assert "- **node 7 (claimed a)**: its key abab... belongs to no site" in text
    assert "node 7 (claimed a)" in (run.path / "report" / "index.html").read_text()


def test_report_adds_epsilon_table_and_plot_for_private_sites(tmp_path: Path) -> None:
    run = RunFolder.create(tmp_path, "x", "")
    run.append_metrics(
        [
            {"round": 1, "site": "a", "split": "train", "epsilon_spent": 2.5},
            {"round": 1, "site": "b", "split": "train", "epsilon_spent": float("inf")},
            {"round": 2, "site": "a", "split": "train", "epsilon_spent": 3.5},
            {"round": 2, "site": "a", "split": "val", "dice_mean": 0.5},
        ]
    )
    run.write_summary({"epsilon_budget_per_site": {"a": 4.0}})
    write_report(run.path)
    text = (run.path / "report.md").read_text()
    assert "| 1 | 2.500 |" in text and "| 2 | 3.500 |" in text
    assert "Budgets: a 4" in text
    assert (run.path / "report" / "epsilon.png").is_file()


def test_report_of_a_non_private_run_has_no_epsilon_section(tmp_path: Path) -> None:
    run = RunFolder.create(tmp_path, "x", "")
    run.append_metrics([{"round": 1, "site": "b", "split": "train", "epsilon_spent": None}])
    write_report(run.path)
    assert "epsilon" not in (run.path / "report.md").read_text()
    assert not (run.path / "report" / "epsilon.png").exists()


def test_html_report_is_offline_and_references_existing_images(tmp_path: Path) -> None:
    run = RunFolder.create(tmp_path, "x", "rounds: 1\n")
    run.append_metrics(
        {"round": r, "site": "a", "split": split, "dice_mean": 0.1 * r, "loss": 1.0 - 0.1 * r}
        for r in (0, 1)
        for split in ("train", "val")
    )
    index = write_report(run.path, legend=[("oedema", "#ffd23f")])
    page = index.read_text()
    sources = re.findall(r"<img src='([^']+)'", page)
    assert {"dice.png", "loss.png"} <= set(sources)
    assert all((index.parent / src).is_file() for src in sources)
    assert "http://" not in page and "https://" not in page  # opens offline
    assert "rounds: 1" in page and "oedema" in page  # resolved config and legend


def test_tensorboard_gets_round_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunFolder.create(tmp_path, "x", "")
    run.append_metrics([{"round": 2, "site": "a", "split": "val", "dice_mean": 0.7, "loss": 0.3}])
    run.close()
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    [scalar] = events.Scalars("dice_mean/val/a")
    assert (scalar.step, scalar.value) == (2, pytest.approx(0.7))


def test_report_says_a_stale_running_run_probably_crashed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fl_imaging.tools.cli import main

    run = RunFolder.create(tmp_path, "demo", "data: {labels: {0: bg, 1: a}}\n")
    run.append_metrics([{"round": 0, "site": "a", "split": "val", "dice_mean": 0.1}])
    run.write_summary({"status": "running", "rounds_completed": 0})
    run.close()
    assert main(["report", str(run.path), "--no-overlays"]) == 1
    assert "if no process runs it any more, it crashed" in capsys.readouterr().err


def test_a_crash_of_the_server_leaves_status_crashed(
    tiny_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.app import Context, RecordDict

    from fl_imaging.server import rounds as server
    from tests.conftest import tiny_overrides

    tiny_plan_overrides = tiny_overrides(tiny_sites, tmp_path)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(server, "run_federation", interrupted)
    monkeypatch.setattr(server, "PromptGrid", lambda grid: grid)
    context = Context(
        run_id=7,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"experiment": "demo", "overrides": " ".join(tiny_plan_overrides)},
    )
    with pytest.raises(KeyboardInterrupt):
        server.serve(object(), context)  # type: ignore[arg-type]
    [run_dir] = [p for p in (tmp_path / "outputs").iterdir() if not p.is_symlink()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "crashed"


def test_an_unwritable_outputs_folder_is_refused_before_launch(tmp_path: Path) -> None:
    from fl_imaging.config import compose
    from fl_imaging.tools.launch import outputs_problems

    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    plan = compose("demo", [f"paths.root={tmp_path}", f"paths.outputs={blocked / 'outputs'}"])
    [problem] = outputs_problems(plan)
    assert f"paths.outputs={blocked / 'outputs'} is not writable" in problem


def test_the_servers_report_opens_no_scan_and_says_where_overlays_come_from(
    tiny_plan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nibabel

    from fl_imaging.server import rounds as server

    def no_scans(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server opened a scan")

    monkeypatch.setattr(nibabel, "load", no_scans)
    run = RunFolder.create(tmp_path / "outputs", "x", "")
    run.append_metrics([{"round": 0, "site": "hospital_a", "split": "val", "dice_mean": 0.5}])
    run.write_summary({"rounds_completed": 0, "status": "finished"})
    server._write_report(run, tiny_plan)
    page = (run.path / "report" / "index.html").read_text()
    assert "overlays_" not in page
    assert "`fl-imaging report RUN` run at a hospital draws its own" in page
