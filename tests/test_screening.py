"""Update screening: malformed, non-finite and outlying updates are rejected with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Message

from fl_imaging.config import compose, plan_to_yaml
from fl_imaging.outputs.reporting import RunFolder
from fl_imaging.server import rounds as server
from fl_imaging.updates.compression import Codec
from fl_imaging.updates.screening import screen_updates, update_norm
from fl_imaging.updates.wire import to_numpy
from tests.conftest import tiny_overrides
from tests.local_grid import TamperingGrid, send_weights

REF = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def shifted(by: float) -> dict[str, np.ndarray]:
    return {k: v + by for k, v in REF.items()}


def test_well_formed_similar_updates_pass() -> None:
    updates = {"a": shifted(0.1), "b": shifted(0.2), "c": shifted(0.15)}
    assert screen_updates(REF, updates) == {}


def test_update_norm_is_the_distance_to_the_reference() -> None:
    assert update_norm(shifted(1.0), REF) == np.sqrt(9.0)


def test_wrong_tensors_shapes_and_non_finite_values_are_named() -> None:
    bad_shape = {**shifted(0.1), "b": np.zeros(4, dtype=np.float32)}
    nan = shifted(0.1)
    nan["w"][0, 0] = np.nan
    reasons = screen_updates(
        REF, {"keys": {"w": REF["w"]}, "shape": bad_shape, "nan": nan, "ok": shifted(0.1)}
    )
    assert set(reasons) == {"keys", "shape", "nan"}
    assert "missing ['b']" in reasons["keys"]
    assert "wrong shape for b" in reasons["shape"]
    assert "non-finite" in reasons["nan"] and "w" in reasons["nan"]


def test_an_update_far_outside_the_round_is_rejected() -> None:
    updates = {"a": shifted(0.1), "b": shifted(0.12), "c": shifted(0.11), "evil": shifted(50.0)}
    reasons = screen_updates(REF, updates, norm_factor=10)
    assert list(reasons) == ["evil"] and "median" in reasons["evil"]
    assert screen_updates(REF, updates, norm_factor=None) == {}


def test_norm_screening_needs_three_updates() -> None:
    assert screen_updates(REF, {"a": shifted(0.1), "evil": shifted(50.0)}) == {}


class PoisoningGrid(TamperingGrid):
    """hospital_a (node 1) returns NaN weights in every training round."""

    def tamper(self, reply: Message, received: ArrayRecord) -> None:
        if reply.metadata.src_node_id == 1:
            nan = {k: np.full_like(v, np.nan) for k, v in to_numpy(received).items()}
            send_weights(reply, nan, received, Codec())


def test_a_poisoned_update_is_rejected_and_the_round_goes_on(
    tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    overrides = [*tiny_overrides(tiny_sites, tmp_path), "rounds=1"]
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    summary = server.run_federation(PoisoningGrid(overrides), plan, run, run_id=1)

    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    [rejected] = [r for r in rows if r.get("status") == "rejected"]
    assert rejected["site"] == "hospital_a" and "non-finite" in rejected["reason"]
    assert summary["rejected_updates"] == 1 and summary["rounds_completed"] == 1
    assert all(v is not None for v in summary["final_dice_per_site"].values())
