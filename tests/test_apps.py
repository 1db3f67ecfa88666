"""The Flower apps by direct calls: client handlers with hand-built messages, and the
server's round loop driven through an in-process grid that calls those handlers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    RecordDict,
)

from fl_imaging.apps import client_app
from fl_imaging.config import RunPlan, compose, plan_to_yaml
from fl_imaging.ml.models import new_model
from fl_imaging.outputs.reporting import RunFolder
from fl_imaging.protocol import MetricKey, RecordKey
from fl_imaging.server import rounds as server
from tests.conftest import tiny_overrides
from tests.local_grid import LocalGrid, context_for, make_message, sent_weights


@pytest.fixture
def overrides(tiny_sites: list[Path], tmp_path: Path) -> list[str]:
    return tiny_overrides(tiny_sites, tmp_path)


def global_arrays(overrides: list[str]) -> ArrayRecord:
    return ArrayRecord(new_model(compose("demo", overrides)).state_dict())


def test_train_reply_holds_weights_metrics_and_site_name_only(overrides: list[str]) -> None:
    arrays = global_arrays(overrides)
    msg = make_message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
        MessageType.TRAIN,
        dst=1,
    )
    reply = client_app.train(msg, context_for(0, overrides))
    content = reply.content
    assert set(content.keys()) == {
        RecordKey.UPDATE,
        RecordKey.CODEC,
        RecordKey.METRICS,
        RecordKey.SITE,
    }
    # only the model's own tensors travel (as an update): same names and shapes
    sent = sent_weights(reply, arrays)
    expected = arrays.to_torch_state_dict()
    assert sent.keys() == expected.keys()
    assert all(sent[k].shape == tuple(expected[k].shape) for k in sent)
    metrics = content[RecordKey.METRICS]
    assert metrics[MetricKey.NUM_EXAMPLES] > 0 and metrics[MetricKey.LOSS] > 0
    assert content[RecordKey.SITE]["name"] == "hospital_a"


def test_evaluate_reply_holds_per_class_dice(overrides: list[str]) -> None:
    msg = make_message(
        RecordDict({"arrays": global_arrays(overrides), "config": ConfigRecord()}),
        MessageType.EVALUATE,
        dst=3,
    )
    reply = client_app.evaluate(msg, context_for(2, overrides))
    metrics = reply.content[RecordKey.METRICS]
    assert set(metrics.keys()) == {"num-examples", "loss", "dice-mean", "dice-1", "dice-2"}
    assert RecordKey.ARRAYS not in reply.content
    assert 0.0 <= metrics["dice-mean"] <= 1.0


def test_server_loop_writes_the_run_folder_contract(
    overrides: list[str], tmp_path: Path, task_identity: None
) -> None:
    plan: RunPlan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    grid = LocalGrid(overrides)
    summary = server.run_federation(grid, plan, run, run_id=1)

    assert (tmp_path / "outputs" / "latest").resolve() == run.path
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert sorted({r["round"] for r in val}) == [0, 1, 2]
    assert {r["site"] for r in val} == set(plan.site_names)
    for row in rows:
        assert {"round", "site", "split", "loss"} <= row.keys()
    for row in val:
        assert {"dice_mean", "dice_oedema", "dice_core"} <= row.keys()
    on_disk = json.loads((run.path / "summary.json").read_text())
    assert on_disk["rounds_completed"] == 2 and on_disk["status"] == "finished"
    assert on_disk["sites"] == plan.site_names
    assert set(on_disk["final_dice_per_site"]) == set(plan.site_names)
    assert on_disk["final_dice_mean"] == pytest.approx(
        sum(on_disk["final_dice_per_site"].values()) / 3
    )
    assert summary["final_dice_mean"] == on_disk["final_dice_mean"]
    last = torch.load(run.path / "checkpoints" / "last.pt", weights_only=False)
    best = torch.load(run.path / "checkpoints" / "best.pt", weights_only=False)
    assert last["round"] == 2 and best["round"] == on_disk["best_round"]
    assert last["state_dict"].keys() == new_model(plan).state_dict().keys()
    assert (run.path / "config.yaml").read_text() == plan_to_yaml(plan)
    # wall-clock phases of every round: train messages also evaluate the model they carry
    # (strategy.evaluate_in_train), only the final model has an evaluate phase of its own
    assert sorted(on_disk["round_seconds"], key=int) == ["1", "2"]
    phases = on_disk["round_seconds"]
    assert all(phases[r][k] > 0 for r in ("1", "2") for k in ("train", "aggregate"))
    assert on_disk["round_seconds"]["1"]["evaluate"] == 0.0
    assert on_disk["round_seconds"]["2"]["evaluate"] > 0
    assert on_disk["started_at"] <= on_disk["first_train_sent_at"] <= time.time()
    # cross-site evaluation: the global and each site's fine-tuned model at every site
    cross = json.loads((run.path / "cross_site.json").read_text())
    assert cross["models"] == ["global"] + [f"{s} fine-tuned" for s in sorted(plan.site_names)]
    assert all(0 <= cross["dice"][m][s] <= 1 for m in cross["models"] for s in plan.site_names)
    assert set(on_disk["finetuned_dice_per_site"]) == set(plan.site_names)
    assert (run.path / "report" / "cross_site.png").is_file()
    # nothing but updates, numbers and the site name came back from the sites (the server
    # replaced each encoded update by the decoded weights)
    for reply in grid.received:
        assert set(reply.content.keys()) <= {"arrays", "update", "codec", "metrics", "site"}


def test_server_gives_up_clearly_when_sites_do_not_connect(
    overrides: list[str], tmp_path: Path, task_identity: None
) -> None:
    plan = compose("demo", [*overrides, "strategy.connect_timeout=0"])
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    with pytest.raises(server.FederationError, match="num-supernodes=3"):
        server.run_federation(LocalGrid(overrides, num_nodes=2), plan, run, run_id=1)


def _corrupt_first_training_case(site_manifest: Path, dest: Path) -> Path:
    import shutil

    from fl_imaging.data.manifest import load_manifest

    shutil.copytree(site_manifest.parent, dest)
    victim = load_manifest(dest / "dataset.json").split("train")[0].label
    victim.write_bytes(b"garbage")
    return victim


def test_a_failing_site_is_recorded_and_the_round_goes_on(
    tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    victim = _corrupt_first_training_case(tiny_sites[0], tmp_path / "hospital_a")
    manifests = [tmp_path / "hospital_a" / "dataset.json", *tiny_sites[1:]]
    overrides = [*tiny_overrides(manifests, tmp_path), "rounds=1"]
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    summary = server.run_federation(LocalGrid(overrides), plan, run, run_id=1)

    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    failures = [r for r in rows if "error" in r]
    assert [(r["round"], r["site"], r["split"]) for r in failures] == [(1, "hospital_a", "train")]
    assert str(victim) in failures[0]["error"]
    assert summary["rounds_completed"] == 1  # the other two sites carried the round


@pytest.mark.parametrize("allow", [False, True])
def test_a_site_failing_on_its_data_makes_the_run_finish_with_failures(
    allow: bool, tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    # the audit: exit 0, "status": "finished", the site listed with a final Dice, and the
    # case and file buried at the end of a multi-line traceback
    victim = _corrupt_first_training_case(tiny_sites[0], tmp_path / "hospital_a")
    manifests = [tmp_path / "hospital_a" / "dataset.json", *tiny_sites[1:]]
    overrides = [
        *tiny_overrides(manifests, tmp_path),
        "rounds=2",
        f"strategy.allow_site_failures={str(allow).lower()}",
    ]
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    summary = server.run_federation(LocalGrid(overrides), plan, run, run_id=1)

    assert summary["status"] == "finished_with_failures"
    reason = summary["failed_sites"]["hospital_a"]
    assert str(victim) in reason and "\n" not in reason and len(reason) < 900
    assert "Traceback" not in reason and reason.startswith("round 2: ManifestError: ")
    assert [f["round"] for f in summary["site_failures"]["hospital_a"]] == [1, 2]
    # the traceback stays at the site, in its state folder
    errors_log = plan.site_state_dir(plan.federation.sites[0]) / "site_errors.log"
    assert "Traceback" in errors_log.read_text()
    # outputs/latest moves only to a run that completed (or whose failures are accepted)
    latest = tmp_path / "outputs" / "latest"
    assert (latest.resolve() == run.path) if allow else not latest.exists()


def test_too_few_sites_left_stops_with_the_failing_site_named(
    tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    _corrupt_first_training_case(tiny_sites[0], tmp_path / "hospital_a")
    manifests = [tmp_path / "hospital_a" / "dataset.json", *tiny_sites[1:]]
    overrides = [*tiny_overrides(manifests, tmp_path), "strategy.min_sites=3"]
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    with pytest.raises(server.FederationError, match="hospital_a"):
        server.run_federation(LocalGrid(overrides), plan, run, run_id=1)
    # what was written before the failure is intact
    assert json.loads((run.path / "summary.json").read_text())["rounds_completed"] == 0
    assert (run.path / "checkpoints" / "last.pt").is_file()


def test_private_run_trains_and_reports_epsilon_per_site(
    dp_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    overrides = [
        # hippocampus_private's recipe (small UNet, SGD with momentum, PRV accounting),
        # with every case in every step and lr 0.1 so that 3 tiny rounds learn
        *tiny_overrides(dp_sites, tmp_path),
        "model=unet_dp",
        "rounds=3",
        "train.local_epochs=5",
        "train.batch_size=0",
        "train.optimizer=sgd",
        "train.lr=0.1",
        "privacy.accountant=prv",
        "federation.sites.0.privacy.epsilon=8",
        "federation.sites.1.privacy.epsilon=8",
        "federation.sites.2.privacy.epsilon=1",
        "privacy.delta=1e-3",
    ]
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    summary = server.run_federation(LocalGrid(overrides), plan, run, run_id=1)

    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    dice = {
        r: sum(x["dice_mean"] for x in rows if x["split"] == "val" and x["round"] == r) / 3
        for r in (0, 3)
    }
    # measured 0.044 -> 0.31 and 0.30 (the noise is secret: every run differs)
    assert dice[3] > dice[0] + 0.1, dice
    budgets = {"hospital_a": 8.0, "hospital_b": 8.0, "hospital_c": 1.0}
    train = [r for r in rows if r["split"] == "train"]
    for row in train:
        assert 0 < row["epsilon_spent"] <= budgets[row["site"]]
    for site, budget in budgets.items():
        spent = [r["epsilon_spent"] for r in train if r["site"] == site]
        assert spent == sorted(spent) and len(spent) == 3
        assert 0.95 * budget <= summary["epsilon_spent_per_site"][site] <= budget


def test_a_site_out_of_budget_sends_no_update_and_the_run_goes_on(
    tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    private = [
        *tiny_overrides(tiny_sites, tmp_path),
        "rounds=1",
        "federation.sites.2.privacy.epsilon=1",
        "privacy.delta=1e-3",
    ]
    plan = compose("demo", private)
    first = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    server.run_federation(LocalGrid(private), plan, first, run_id=1)  # spends it all
    second = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    summary = server.run_federation(LocalGrid(private), plan, second, run_id=2)

    rows = [json.loads(line) for line in (second.path / "metrics.jsonl").read_text().splitlines()]
    [refused] = [r for r in rows if r.get("status") == "budget_exhausted"]
    assert refused["site"] == "hospital_c" and refused["epsilon_spent"] <= 1.0
    assert summary["rounds_completed"] == 1  # the other two sites carried the round


def test_central_dp_noises_the_aggregate(
    overrides: list[str], tmp_path: Path, task_identity: None
) -> None:
    def final_weights(extra: list[str], name: str) -> dict[str, torch.Tensor]:
        plan = compose("demo", [*overrides, "rounds=1", *extra])
        run = RunFolder.create(tmp_path / name, plan.name, plan_to_yaml(plan))
        server.run_federation(LocalGrid([*overrides, "rounds=1", *extra]), plan, run, 1)
        return torch.load(run.path / "checkpoints" / "last.pt", weights_only=False)["state_dict"]

    plain = final_weights([], "plain")
    again = final_weights([], "again")
    noised = final_weights(
        ["privacy.central.noise_multiplier=0.5", "privacy.central.clipping_norm=1.0"], "central"
    )
    # training is deterministic (up to the order Flower samples the sites in)
    assert all(torch.allclose(plain[k], again[k], atol=1e-6) for k in plain)
    assert any(not torch.allclose(plain[k], noised[k], atol=1e-3) for k in plain)


class FlakyGrid(LocalGrid):
    """hospital_b (node 2) raises in round 2 and hospital_c (node 3) never answers it."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        train_round_2 = [
            m
            for m in messages
            if m.metadata.message_type == MessageType.TRAIN
            and int(m.content["config"]["server-round"]) == 2
        ]
        if not train_round_2:
            return super().send_and_receive(messages, timeout=timeout)
        replies = super().send_and_receive(
            [m for m in messages if m.metadata.dst_node_id == 1], timeout=timeout
        )
        crash = next(m for m in messages if m.metadata.dst_node_id == 2)
        return [*replies, Message(Error(code=1, reason="site crashed"), reply_to=crash)]


def test_a_crashing_and_a_silent_site_are_recorded_and_min_sites_decides(
    overrides: list[str], tmp_path: Path, task_identity: None
) -> None:
    plan = compose("demo", [*overrides, "strategy.min_sites=1"])
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    summary = server.run_federation(FlakyGrid(overrides), plan, run, run_id=1)
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    failed = {(r["site"], r["error"]) for r in rows if "error" in r and r["round"] == 2}
    assert ("hospital_b", "site crashed") in failed
    assert any(site == "hospital_c" and "no reply" in err for site, err in failed)
    assert summary["rounds_completed"] == 2  # one update was enough with min_sites=1

    strict = compose("demo", overrides)  # min_sites=2: round 2 cannot go on
    run2 = RunFolder.create(tmp_path / "outputs2", strict.name, plan_to_yaml(strict))
    with pytest.raises(server.FederationError, match=r"round 2: only 1 sites.*hospital_b"):
        server.run_federation(FlakyGrid(overrides), strict, run2, run_id=1)
    assert json.loads((run2.path / "summary.json").read_text())["rounds_completed"] == 1


def test_app_modules_import_neither_torch_nor_monai() -> None:
    """Flower loads both apps under one lock before Ray starts: they must stay light."""
    code = (
        "import sys, fl_imaging.apps.server_app, fl_imaging.apps.client_app; "
        "print(sorted(m for m in ('torch', 'monai', 'opacus') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sites_named_before_the_loop_are_not_asked_again(
    overrides: list[str], tmp_path: Path, task_identity: None
) -> None:
    """The ServerApp names the sites while it imports the loop; the loop asks the rest."""
    plan = compose("demo", [*overrides, "rounds=1"])
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    grid = LocalGrid([*overrides, "rounds=1"])
    known = {1: "hospital_a", 2: "hospital_b"}
    server.run_federation(grid, plan, run, run_id=1, node_sites=known)
    queried = [
        r.metadata.src_node_id
        for r in grid.received
        if r.metadata.message_type == MessageType.QUERY
    ]
    assert queried == [3]
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert {r["site"] for r in rows} == set(plan.site_names)
