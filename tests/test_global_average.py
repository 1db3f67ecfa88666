"""strategy.global_ema_decay: the run evaluates and delivers the moving average of its
global models, trains on from the plain aggregate, and resumes both."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import Message, MessageType

from fl_imaging.config import ConfigError, compose, plan_to_yaml
from fl_imaging.outputs.reporting import RunFolder, load_checkpoint
from fl_imaging.protocol import RecordKey
from fl_imaging.server import rounds as server
from fl_imaging.server.averaging import GlobalAverage
from tests.conftest import tiny_overrides
from tests.local_grid import LocalGrid
from tests.test_resume import DyingGrid, Killed

State = dict[str, torch.Tensor]


def test_the_average_folds_each_round_and_keeps_counters_newest() -> None:
    average = GlobalAverage(0.75)
    models = [
        {"w": torch.tensor([4.0, 0.0]), "n": torch.tensor(1)},
        {"w": torch.tensor([0.0, 8.0]), "n": torch.tensor(2)},
        {"w": torch.tensor([8.0, 8.0]), "n": torch.tensor(3)},
    ]
    folded = [average.fold(m) for m in models]
    assert torch.equal(folded[0]["w"], torch.tensor([4.0, 0.0]))  # starts at the first model
    assert torch.allclose(folded[1]["w"], torch.tensor([3.0, 2.0]))  # 0.75 * avg + 0.25 * new
    assert torch.allclose(folded[2]["w"], torch.tensor([4.25, 3.5]))
    assert [int(f["n"]) for f in folded] == [1, 2, 3]
    assert average.folded == 3
    folded[2]["w"].zero_()  # a copy: the caller cannot change the average
    assert torch.allclose(average.fold(models[2])["w"], torch.tensor([5.1875, 4.625]))
    with pytest.raises(ValueError, match="tensors changed between rounds"):
        average.fold({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        GlobalAverage(1.0)


def test_a_decay_outside_0_1_is_refused_by_the_config(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"strategy.global_ema_decay must be in \(0, 1\)"):
        compose("demo", [*tiny_overrides(tiny_sites, tmp_path), "strategy.global_ema_decay=1.5"])


class Recording:
    """A grid mixin: keeps the model each train and evaluate message carried, by type."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        sent: dict[str, list[State]] = self.__dict__.setdefault("sent", {})
        for msg in messages:
            kind = msg.metadata.message_type
            if kind in (MessageType.TRAIN, MessageType.EVALUATE):
                sent.setdefault(kind, []).append(
                    msg.content[RecordKey.ARRAYS].to_torch_state_dict()
                )
        return super().send_and_receive(messages, timeout=timeout)  # type: ignore[misc]


class RecordingGrid(Recording, LocalGrid):
    """The in-process grid, recording."""


class RecordingDyingGrid(Recording, DyingGrid):
    """The grid that dies after round ``die_at``'s training, recording."""


def per_round(models: list[State], sites: int = 3) -> list[State]:
    """One model per round (every site got the same one)."""
    return models[::sites]


def mix(average: State, model: State, decay: float = 0.5) -> State:
    return {k: decay * average[k] + (1 - decay) * model[k] for k in average}


def close(a: State, b: State) -> bool:
    return all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_run_delivers_the_average_trains_on_the_aggregate_and_resumes_both(
    tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    overrides = [
        *tiny_overrides(tiny_sites, tmp_path),
        "rounds=4",
        "strategy.global_ema_decay=0.5",
        "strategy.cross_site_epochs=0",
    ]
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    killed = RecordingDyingGrid(overrides, die_at=3)  # dies at round 3's evaluation
    with pytest.raises(Killed):
        server.run_federation(killed, plan, run, run_id=1)
    trained = per_round(killed.sent[MessageType.TRAIN])  # the global models w0, w1, w2
    evaluated = per_round(killed.sent[MessageType.EVALUATE])  # rounds 0, 1, 2
    w0, w1, w2 = trained
    assert close(evaluated[0], w0)  # round 0: the initial model
    assert close(evaluated[1], w1)  # the average starts at the first aggregate
    average = mix(w1, w2)
    assert close(evaluated[2], average) and not close(average, w2)
    last = load_checkpoint(run.path / "checkpoints" / "last.pt")
    assert last["round"] == 2
    assert close(last["state_dict"], average)  # delivered: the average
    assert close(last["training_state_dict"], w2)  # resume trains on from the aggregate

    resumed_plan = compose("demo", [*overrides, "resume=latest"])
    state = server.load_resume_state(RunFolder.reopen(run.path), resumed_plan)
    grid = RecordingGrid(overrides)
    server.run_federation(grid, resumed_plan, RunFolder.reopen(run.path), 2, state)
    w2_again, w3 = per_round(grid.sent[MessageType.TRAIN])
    assert close(w2_again, w2)  # not the average
    last = load_checkpoint(run.path / "checkpoints" / "last.pt")
    w4 = last["training_state_dict"]
    averages = [mix(average, w3)]
    averages.append(mix(averages[0], w4))
    evaluated = per_round(grid.sent[MessageType.EVALUATE])
    assert len(evaluated) == 2 and all(
        close(a, b) for a, b in zip(evaluated, averages, strict=True)
    )
    assert close(last["state_dict"], averages[1]) and last["round"] == 4
    best = load_checkpoint(run.path / "checkpoints" / "best.pt")
    assert any(close(best["state_dict"], a) for a in [w0, w1, average, *averages])
