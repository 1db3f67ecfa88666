"""A hostile site against FedAvg and a robust aggregator (screening off, to test aggregation)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Message

from fl_imaging.config import compose, plan_to_yaml
from fl_imaging.outputs.reporting import RunFolder
from fl_imaging.server import rounds as server
from fl_imaging.updates.compression import Codec
from fl_imaging.updates.wire import to_numpy
from tests.conftest import tiny_overrides
from tests.local_grid import LocalGrid, TamperingGrid, send_weights, sent_weights


class HostileGrid(TamperingGrid):
    """hospital_a (node 1) sends global - 10 x (its honest update) every round."""

    def tamper(self, reply: Message, received: ArrayRecord) -> None:
        if reply.metadata.src_node_id == 1:
            # the site trains honestly, then reverses and scales its update
            honest = sent_weights(reply, received)
            state = to_numpy(received)
            hostile = {k: g - 10 * (honest[k] - g) for k, g in state.items()}
            send_weights(reply, hostile, received, Codec())


def final_dice(grid_cls: type[LocalGrid], strategy: str, sites: list[Path], root: Path) -> float:
    overrides = [
        *tiny_overrides(sites, root),
        "model=unet_small",
        "rounds=3",
        "train.local_epochs=2",
        f"strategy={strategy}",
        "strategy.screen_norm_factor=null",
    ]
    plan = compose("demo", overrides)
    run = RunFolder.create(root / strategy / grid_cls.__name__, plan.name, plan_to_yaml(plan))
    summary = server.run_federation(grid_cls(overrides), plan, run, run_id=1)
    return float(summary["final_dice_mean"])


@pytest.mark.parametrize("robust", ["fedmedian"])
def test_robust_aggregation_shrugs_off_a_hostile_site_fedavg_does_not(
    robust: str, tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    honest_robust = final_dice(LocalGrid, robust, tiny_sites, tmp_path)
    attacked_robust = final_dice(HostileGrid, robust, tiny_sites, tmp_path)
    honest_avg = final_dice(LocalGrid, "fedavg", tiny_sites, tmp_path)
    attacked_avg = final_dice(HostileGrid, "fedavg", tiny_sites, tmp_path)
    print(
        f"{robust}: honest {honest_robust:.3f} attacked {attacked_robust:.3f}; "
        f"fedavg: honest {honest_avg:.3f} attacked {attacked_avg:.3f}"
    )
    assert abs(attacked_robust - honest_robust) <= 0.05
    assert attacked_avg < honest_avg - 0.1
