"""strategy.evaluate_in_train: one message per round, the same metrics as two."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

from fl_imaging.apps import client_app
from fl_imaging.config import ConfigError, compose, plan_to_yaml
from fl_imaging.ml.models import new_model
from fl_imaging.outputs.reporting import RunFolder
from fl_imaging.protocol import ConfigKey, MetricKey, RecordKey
from fl_imaging.server import rounds as server
from tests.conftest import tiny_overrides
from tests.local_grid import LocalGrid, context_for, make_message


@pytest.fixture
def overrides(tiny_sites: list[Path], tmp_path: Path) -> list[str]:
    return [
        *tiny_overrides(tiny_sites, tmp_path),
        "strategy.evaluate_in_train=true",
        "strategy.cross_site_epochs=0",
    ]


def test_a_train_reply_carries_the_validation_of_the_received_model(
    overrides: list[str],
) -> None:
    plan = compose("demo", overrides)
    arrays = ArrayRecord(new_model(plan).state_dict())
    config = ConfigRecord({ConfigKey.SERVER_ROUND: 1, ConfigKey.EVALUATE_FIRST: 1})
    msg = make_message(
        RecordDict({RecordKey.ARRAYS: arrays, RecordKey.CONFIG: config}), MessageType.TRAIN, 1
    )
    reply = client_app.train(msg, context_for(0, overrides))
    evaluation = reply.content[RecordKey.EVALUATION]
    plain = client_app.evaluate(
        make_message(RecordDict({RecordKey.ARRAYS: arrays}), MessageType.EVALUATE, 1),
        context_for(0, overrides),
    ).content[RecordKey.METRICS]
    assert dict(evaluation) == pytest.approx(dict(plain))
    assert reply.content[RecordKey.METRICS][MetricKey.NUM_EXAMPLES] > 0  # and it trained


def test_one_message_per_site_and_round_and_every_round_evaluated(
    overrides: list[str], tmp_path: Path, task_identity: None
) -> None:
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    grid = LocalGrid(overrides)
    summary = server.run_federation(grid, plan, run, run_id=1)

    kinds = [r.metadata.message_type for r in grid.received]
    assert kinds.count(MessageType.TRAIN) == 2 * 3  # rounds x sites
    assert kinds.count(MessageType.EVALUATE) == 3  # only the final model
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert sorted((r["round"], r["site"]) for r in val) == sorted(
        (n, s) for n in (0, 1, 2) for s in plan.site_names
    )
    assert all("bytes_up" not in r for r in val if r["round"] < 2)  # counted with train
    assert sorted(summary["dice_mean_per_round"], key=int) == ["0", "1", "2"]
    assert summary["dice_mean_per_round"]["2"] > summary["dice_mean_per_round"]["0"]
    assert summary["rounds_completed"] == 2
    best = torch.load(run.path / "checkpoints" / "best.pt", weights_only=False)
    assert best["round"] == summary["best_round"]
    assert best["dice_mean"] == pytest.approx(summary["best_dice_mean"])
    last = torch.load(run.path / "checkpoints" / "last.pt", weights_only=False)
    assert last["round"] == 2 and last["dice_mean"] == pytest.approx(summary["final_dice_mean"])


def test_without_it_every_round_has_its_own_evaluate_message(
    overrides: list[str], tmp_path: Path, task_identity: None
) -> None:
    two = [*overrides, "strategy.evaluate_in_train=false"]
    plan = compose("demo", two)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    grid = LocalGrid(two)
    summary = server.run_federation(grid, plan, run, run_id=1)

    kinds = [r.metadata.message_type for r in grid.received]
    assert kinds.count(MessageType.TRAIN) == 2 * 3
    assert kinds.count(MessageType.EVALUATE) == 3 * 3  # rounds 0, 1 and 2
    assert not any(RecordKey.EVALUATION in r.content for r in grid.received)
    assert sorted(summary["round_seconds"], key=int) == ["0", "1", "2"]
    assert summary["round_seconds"]["0"]["train"] == 0.0
    assert all(summary["round_seconds"][r]["evaluate"] > 0 for r in ("0", "1", "2"))
    assert sorted(summary["dice_mean_per_round"], key=int) == ["0", "1", "2"]


def test_resuming_drops_the_validation_that_will_be_repeated(tmp_path: Path) -> None:
    run = RunFolder.create(tmp_path, "r", "name: r\n")
    run.append_metrics(
        [
            {"round": 1, "site": "a", "split": "train", "loss": 1.0},
            {"round": 1, "site": "a", "split": "val", "loss": 1.0},
            {"round": 2, "site": "a", "split": "train", "loss": 1.0},
        ]
    )
    assert run.truncate_metrics(1, drop_val_of_last=True) == 2
    kept = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["split"]) for r in kept] == [(1, "train")]
    run.close()


def test_not_with_secure_aggregation(overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"strategy\.evaluate_in_train with secure_aggregation"):
        compose(
            "demo",
            [*overrides, "secure_aggregation=secaggplus", "strategy.screen_norm_factor=null"],
        )
