"""Strategy factory: every configured name builds the Flower strategy it names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_imaging.config import KNOWN_STRATEGIES, compose, plan_to_yaml
from fl_imaging.outputs.reporting import RunFolder
from fl_imaging.server import rounds as server
from fl_imaging.server.strategies import STRATEGIES, build_strategy, strategy_problems
from tests.local_grid import LocalGrid


def test_config_and_factory_know_the_same_strategies() -> None:
    assert set(KNOWN_STRATEGIES) == set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_config_builds_its_flower_strategy(name: str) -> None:
    plan = compose("demo", f"strategy={name}")
    assert type(build_strategy(plan)) is STRATEGIES[name]
    assert strategy_problems(plan) == []


def test_parameters_a_strategy_does_not_take_are_a_named_problem() -> None:
    plan = compose("demo", "strategy=fedavg +strategy.params.eta=0.1")
    [problem] = strategy_problems(plan)
    assert "strategy.params" in problem and "FedAvg" in problem and "eta" in problem


@pytest.mark.parametrize("name", ["fedadam", "fedmedian"])
def test_server_optimiser_and_robust_aggregator_run_rounds(
    name: str, tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    from tests.conftest import tiny_overrides

    overrides = [*tiny_overrides(tiny_sites, tmp_path), f"strategy={name}"]
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    summary = server.run_federation(LocalGrid(overrides), plan, run, run_id=1)
    assert summary["rounds_completed"] == 2
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert {r["round"] for r in rows if r["split"] == "val"} == {0, 1, 2}
