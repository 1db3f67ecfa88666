"""Checkpoint and resume: a killed run continues after its last completed round."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import Message, MessageType

from fl_imaging.config import ConfigError, compose, plan_to_yaml
from fl_imaging.outputs.reporting import RunFolder, last_started_run
from fl_imaging.server import rounds as server
from tests.conftest import tiny_overrides
from tests.local_grid import LocalGrid


class Killed(RuntimeError):
    """Stands for the server process dying."""


class DyingGrid(LocalGrid):
    """Dies at the first exchange after round ``die_at``'s training rows were written.

    With an evaluate message per round that is round ``die_at``'s evaluation; with
    ``strategy.evaluate_in_train`` it is round ``die_at + 1``'s train message (which
    would also have evaluated round ``die_at``'s model).
    """

    def __init__(self, overrides: list[str], die_at: int) -> None:
        super().__init__(overrides)
        self.die_at = die_at
        self.trained_rounds = 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else None
        if kind != MessageType.QUERY and self.trained_rounds == self.die_at:
            raise Killed("server killed")
        if kind == MessageType.TRAIN:
            self.trained_rounds += 1
        return super().send_and_receive(messages, timeout=timeout)


def read_rows(run: RunFolder) -> list[dict]:
    return [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("evaluate_in_train", [False, True])
def test_a_killed_run_resumes_without_losing_or_repeating_rounds(
    evaluate_in_train: bool, tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    overrides = [
        *tiny_overrides(tiny_sites, tmp_path),
        "rounds=3",
        "strategy=fedadam",
        f"strategy.evaluate_in_train={str(evaluate_in_train).lower()}",
    ]
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    with pytest.raises(Killed):
        server.run_federation(DyingGrid(overrides, die_at=2), plan, run, run_id=1)
    assert {(r["round"], r["split"]) for r in read_rows(run)} >= {(2, "train")}
    # with an evaluate message per round, round 2 was cut short before its checkpoint
    last_round = 2 if evaluate_in_train else 1
    checkpoint = torch.load(run.path / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["round"] == last_round
    assert set(checkpoint["strategy_state"]) == {"m_t", "v_t"}

    resumed_plan = compose("demo", [*overrides, "resume=latest"])
    # resume=latest: the most recently active run (outputs/latest moves only on completion)
    reopened = RunFolder.reopen(last_started_run(tmp_path / "outputs"))
    state = server.load_resume_state(reopened, resumed_plan)
    assert state.last_round == last_round
    summary = server.run_federation(LocalGrid(overrides), resumed_plan, reopened, 2, state)

    rows = read_rows(reopened)
    keys = [(r["round"], r["site"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys))  # nothing repeated
    assert {(k[0], k[2]) for k in keys} == {(0, "val")} | {
        (r, s) for r in (1, 2, 3) for s in ("train", "val")
    }  # nothing lost
    assert summary["rounds_completed"] == 3 and summary["resumed_after_rounds"] == [last_round]
    assert sorted(summary["dice_mean_per_round"]) == ["0", "1", "2", "3"]


def _one_round_run(tiny_sites: list[Path], tmp_path: Path) -> tuple[list[str], RunFolder]:
    """A finished one-round run and the overrides it was run with."""
    overrides = [*tiny_overrides(tiny_sites, tmp_path), "rounds=1"]
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    server.run_federation(LocalGrid(overrides), plan, run, run_id=1)
    return overrides, run


def test_resuming_with_another_model_is_refused(
    tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    overrides, run = _one_round_run(tiny_sites, tmp_path)
    other = compose("demo", [*overrides, "model=unet_small", "resume=latest"])
    with pytest.raises(ConfigError, match="model config differs"):
        server.load_resume_state(run, other)


def test_resuming_a_run_with_no_round_left_is_refused_and_changes_nothing(
    tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    overrides, run = _one_round_run(tiny_sites, tmp_path)
    metrics = (run.path / "metrics.jsonl").read_bytes()
    again = compose("demo", [*overrides, "resume=latest"])
    with pytest.raises(ConfigError, match="completed 1 rounds, and rounds=1 leaves nothing"):
        server.load_resume_state(run, again)
    assert (run.path / "metrics.jsonl").read_bytes() == metrics


class _Payload:
    """Unpickling this runs code (a crafted checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_or_corrupt_checkpoint_is_refused_before_any_code_runs(
    tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    # the audit: a crafted last.pt ran code on resume (torch.load weights_only=False); a
    # corrupt one failed with a raw UnicodeDecodeError that did not name the file
    overrides = [*tiny_overrides(tiny_sites, tmp_path), "rounds=1", "strategy=fedadam"]
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    server.run_federation(LocalGrid(overrides), plan, run, run_id=1)
    last = run.path / "checkpoints" / "last.pt"
    resumed = compose("demo", [*overrides, "resume=latest", "rounds=2"])
    assert server.load_resume_state(run, resumed).strategy_state  # FedAdam moments load
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {}, "round": 1, "evil": _Payload(marker)}, last)
    with pytest.raises(ConfigError, match=rf"cannot resume .*{last.name}: not a safe"):
        server.load_resume_state(run, resumed)
    assert not marker.exists()
    last.write_bytes(b"\\x80\\x02garbage" * 10)
    with pytest.raises(ConfigError, match=r"last\.pt: not a safe fl-imaging checkpoint") as info:
        server.load_resume_state(run, resumed)
    assert "\\n" not in str(info.value)
