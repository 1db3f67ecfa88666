"""Secure aggregation (SecAgg+) by direct calls: the server's round loop over an in-process
grid that serialises every message both ways, as Flower's transport does (server and sites
share no objects), with Flower's SecAggPlusWorkflow and secaggplus_mod running unchanged."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Error, Message, MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from fl_imaging.config import ConfigError, RunPlan, compose, plan_to_yaml
from fl_imaging.data.synthetic import generate_federation
from fl_imaging.ml.models import new_model
from fl_imaging.outputs.reporting import RunFolder, read_metrics
from fl_imaging.secagg import SecureAggregationError
from fl_imaging.server import rounds as server
from fl_imaging.tools.launch import local_superlink_pids, run_simulation
from fl_imaging.updates.compression import decode_update
from fl_imaging.updates.wire import message_bytes, read_update
from tests.conftest import REPO_ROOT, tiny_overrides
from tests.local_grid import LocalGrid

SECURE = ["secure_aggregation=secaggplus"]
# what the secaggplus group turns off; plain runs turn it off too, to compare like with like
NO_SINGLE_UPDATE_USE = ["strategy.screen_norm_factor=null", "strategy.cross_site_epochs=0"]


def over_the_wire(msg: Message) -> Message:
    """``msg`` serialised as Flower ships it, and rebuilt (a copy sharing nothing)."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    return inflate_object_from_contents(msg.object_id, contents)


def stage_of(msg: Message) -> str | None:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if configs is None else str(configs[Key.STAGE])


class WireGrid(LocalGrid):
    """An in-process grid whose messages travel serialised; ``inbox`` is everything the
    server received. ``offline`` holds ``(node, stage)`` pairs: that site is gone from
    that SecAgg+ stage on (it already answered the stages before)."""

    def __init__(
        self, overrides: list[str], num_nodes: int = 3, offline: Iterable[tuple[int, str]] = ()
    ) -> None:
        super().__init__(overrides, num_nodes)
        self.offline = set(offline)
        self.inbox: list[Message] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        delivered, replies = [], []
        for msg in messages:
            if (msg.metadata.dst_node_id, stage_of(msg)) in self.offline:
                replies.append(Message(Error(code=1, reason="site went offline"), reply_to=msg))
            else:
                delivered.append(over_the_wire(msg))
        # the sites run as in a ClientApp process: without the ServerApp's task identity
        identity = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
        TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None
        try:
            answered = super().send_and_receive(delivered)
        finally:
            TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = identity
        replies += [over_the_wire(r) for r in answered]
        self.inbox += [over_the_wire(r) for r in replies]  # as received (the server edits them)
        return replies


@dataclass
class Federation:
    plan: RunPlan
    run: Path
    grid: WireGrid


def federate(overrides: list[str], out: Path, num_nodes: int = 3, **grid: Any) -> Federation:
    plan = compose("demo", overrides)
    run = RunFolder.create(out, plan.name, plan_to_yaml(plan))
    wire = WireGrid(overrides, num_nodes, **grid)
    server.run_federation(wire, plan, run, run_id=1)
    return Federation(plan, run.path, wire)


def final_model(fed: Federation) -> dict[str, np.ndarray]:
    ckpt = torch.load(fed.run / "checkpoints" / "last.pt", weights_only=False)
    return {k: v.double().numpy() for k, v in ckpt["state_dict"].items()}


def initial_model(plan: RunPlan) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in new_model(plan).state_dict().items()}


def train_rows(fed: Federation) -> dict[str, dict[str, Any]]:
    rows = [json.loads(line) for line in (fed.run / "metrics.jsonl").read_text().splitlines()]
    return {r["site"]: r for r in rows if r["split"] == "train" and "error" not in r}


def site_models(fed: Federation) -> dict[str, tuple[dict[str, np.ndarray], int]]:
    """Each site's round-1 model and training cases, from a plain run's replies."""
    reference = initial_model(fed.plan)
    out = {}
    for reply in fed.grid.inbox:
        if reply.metadata.message_type == MessageType.TRAIN and "update" in reply.content:
            site = str(reply.content["site"]["name"])
            weights = decode_update(read_update(reply.content), reference)
            out[site] = (weights, int(reply.content["metrics"]["num-examples"]))
    return out


def weighted_mean(models: Iterable[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    models = list(models)
    total = sum(n for _, n in models)
    names = models[0][0]
    return {k: sum(w[k].astype(np.float64) * n for w, n in models) / total for k in names}


def quantisation_bound(plan: RunPlan, num_sites: int, num_examples: int) -> float:
    """Largest error SecAgg+ quantisation can add to one weight of the mean.

    Each site's weighted update is rounded (stochastically) to a step of
    2 x clipping_range / 2**bits; the sum of the sites' rounding errors is divided by
    the total weight num_examples / max_weight. 1e-6 covers float32 rounding.
    """
    cfg = plan.secure_aggregation
    step = 2 * cfg.clipping_range / 2**cfg.quantization_bits
    return num_sites * step / (num_examples / cfg.max_weight) + 1e-6


def max_gap(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


@pytest.fixture(scope="module")
def identity() -> Iterator[None]:
    # Flower stamps the run id on messages it creates; a bare test process sets it itself
    previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous


@pytest.fixture(scope="module")
def base(tiny_sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("secagg")
    return [*tiny_overrides(tiny_sites, root), "rounds=1"]


@pytest.fixture(scope="module")
def plain_and_secure(
    base: list[str], tmp_path_factory: pytest.TempPathFactory, identity: None
) -> tuple[Federation, Federation]:
    """One FedAvg round on the three tiny hospitals, plain and with SecAgg+."""
    out = tmp_path_factory.mktemp("runs")
    plain = federate([*base, *NO_SINGLE_UPDATE_USE], out / "plain")
    secure = federate([*base, *SECURE], out / "secure")
    return plain, secure


def test_secure_aggregate_equals_the_plain_weighted_mean_within_quantisation(
    plain_and_secure: tuple[Federation, Federation],
) -> None:
    plain, secure = plain_and_secure
    rows = train_rows(secure)
    bound = quantisation_bound(secure.plan, 3, sum(r["num_examples"] for r in rows.values()))
    assert max_gap(final_model(secure), final_model(plain)) <= bound
    # the comparison means something: the round moved the model far more than that
    assert max_gap(final_model(plain), initial_model(plain.plan)) > 100 * bound
    # the per-site metrics still arrive, in the clear and unchanged
    plain_rows = train_rows(plain)
    assert set(rows) == set(plain.plan.site_names)
    for site, row in rows.items():
        assert row["num_examples"] == plain_rows[site]["num_examples"] > 0
        assert row["loss"] == pytest.approx(plain_rows[site]["loss"], rel=1e-5)


def test_server_never_receives_a_site_update_unmasked(
    plain_and_secure: tuple[Federation, Federation],
) -> None:
    plain, secure = plain_and_secure
    reference = initial_model(plain.plan)
    cfg = secure.plan.secure_aggregation
    levels = 2**cfg.quantization_bits
    # four SecAgg+ stages, two evaluations, and the sites naming themselves once
    assert len(secure.grid.inbox) == 3 * 4 + 3 * 2 + 3
    queries = [r for r in secure.grid.inbox if r.metadata.message_type == MessageType.QUERY]
    assert [set(r.content.keys()) for r in queries] == [{"site"}] * 3
    masked_replies = 0
    for reply in secure.grid.inbox:
        # no ArrayRecord of any reply holds anything (Flower's mod empties them)
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        if stage_of_reply(reply) != "masked":
            continue
        masked_replies += 1
        site = str(reply.content["site"]["name"])
        weights, num_examples = site_models(plain)[site]
        masked = [bytes_to_ndarray(b) for b in reply.content[RECORD_KEY_CONFIGS]["masked_params"]]
        ratio = num_examples / cfg.max_weight
        for (name, ref), vector in zip(reference.items(), masked[1:], strict=True):
            update = weights[name].astype(np.float64) - ref
            bound = cfg.clipping_range
            quantised = (np.clip(update * ratio, -bound, bound) + bound) * levels / (2 * bound)
            assert vector.shape == update.shape
            assert not np.allclose(vector, update, atol=1e-3)
            assert not np.allclose(vector, weights[name], atol=1e-3)
            if vector.size >= 64:  # masks are uniform on [0, 2**32): far from the update
                assert np.mean(np.abs(vector - quantised)) > 2**32 / 8, name
                assert np.mean(np.abs(vector - quantised) <= 2) < 0.01, name
    assert masked_replies == 3


def stage_of_reply(reply: Message) -> str:
    configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None:
        return "evaluate"
    return "masked" if Key.MASKED_PARAMETERS in configs else "protocol"


def test_fedadam_applies_its_server_step_to_the_secure_mean(
    base: list[str], tmp_path: Path, identity: None
) -> None:
    fedadam = [*base, "strategy=fedadam"]
    plain = federate([*fedadam, *NO_SINGLE_UPDATE_USE], tmp_path / "plain")
    secure = federate([*fedadam, *SECURE], tmp_path / "secure")
    rows = train_rows(secure)
    bound = quantisation_bound(secure.plan, 3, sum(r["num_examples"] for r in rows.values()))
    # FedAdam's round-1 step x + eta_1 m / (sqrt(v) + tau) changes by at most
    # eta_1 (1 - beta_1) / tau per unit change of the mean update (defaults: 7.4)
    eta_1 = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    lipschitz = eta_1 * (1 - 0.9) / 1e-3
    assert max_gap(final_model(secure), final_model(plain)) <= lipschitz * bound
    assert max_gap(final_model(plain), initial_model(plain.plan)) > 100 * lipschitz * bound


@pytest.fixture(scope="module")
def four_sites(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Four tiny hospitals, as overrides of the demo config (rounds=1)."""
    root = tmp_path_factory.mktemp("four")
    manifests = generate_federation(root, num_sites=4, total_cases=24, fov_mm=32.0, seed=1)
    # no spaces or quotes: the override string travels through the Flower run config
    sites = ",".join(
        f"{{name:hospital_{c},manifest:{m}}}" for c, m in zip("abcd", manifests, strict=True)
    )
    return [f"federation.sites=[{sites}]", *tiny_overrides([], root), "rounds=1"]


def test_a_site_dropping_after_sharing_its_keys_leaves_the_mean_of_the_others(
    four_sites: list[str], tmp_path: Path, identity: None
) -> None:
    plain = federate([*four_sites, *NO_SINGLE_UPDATE_USE], tmp_path / "plain", num_nodes=4)
    secure = federate(
        [*four_sites, *SECURE, "secure_aggregation.reconstruction_threshold=3"],
        tmp_path / "secure",
        num_nodes=4,
        offline=[(4, Stage.COLLECT_MASKED_VECTORS)],  # hospital_d, after setup and share keys
    )
    models = site_models(plain)
    expected = weighted_mean(models[s] for s in ("hospital_a", "hospital_b", "hospital_c"))
    examples = sum(models[s][1] for s in ("hospital_a", "hospital_b", "hospital_c"))
    bound = quantisation_bound(secure.plan, 3, examples)
    assert max_gap(final_model(secure), expected) <= bound
    # hospital_d's update would have shown: the mean of all four is far from it
    assert max_gap(final_model(plain), expected) > 100 * bound
    rows = [json.loads(line) for line in (secure.run / "metrics.jsonl").read_text().splitlines()]
    [dropped] = [r for r in rows if "error" in r]
    assert (dropped["round"], dropped["site"], dropped["split"]) == (1, "hospital_d", "train")
    assert "site went offline" in dropped["error"]
    assert set(train_rows(secure)) == {"hospital_a", "hospital_b", "hospital_c"}


def test_too_few_sites_left_for_the_threshold_stops_with_a_clear_error(
    base: list[str], tmp_path: Path, identity: None
) -> None:
    with pytest.raises(SecureAggregationError, match="reconstruction_threshold"):
        federate(
            [*base, *SECURE],
            tmp_path,
            offline=[(2, Stage.COLLECT_MASKED_VECTORS), (3, Stage.COLLECT_MASKED_VECTORS)],
        )


def test_private_sites_mask_their_noised_update_and_an_exhausted_one_weighs_nothing(
    base: list[str],
    plain_and_secure: tuple[Federation, Federation],
    tmp_path: Path,
    identity: None,
) -> None:
    # its own state folder: a site with a ledger never trains without DP again, and the
    # module's other runs are not private
    private = [
        *base,
        *SECURE,
        "federation.sites.2.privacy.epsilon=1",
        "privacy.delta=1e-3",
        f"paths.state={tmp_path / 'state'}",
    ]
    first = federate(private, tmp_path / "first")  # hospital_c spends its whole budget
    row = train_rows(first)["hospital_c"]
    assert 0.9 <= row["epsilon_spent"] <= 1.0 and row["num_examples"] > 0
    second = federate(private, tmp_path / "second")
    assert train_rows(second)["hospital_c"]["status"] == "budget_exhausted"
    # hospital_c sent a zero update of weight 0: the mean of the other two remains
    models = site_models(plain_and_secure[0])
    expected = weighted_mean(models[s] for s in ("hospital_a", "hospital_b"))
    examples = sum(models[s][1] for s in ("hospital_a", "hospital_b"))
    assert max_gap(final_model(second), expected) <= quantisation_bound(second.plan, 3, examples)


def test_one_contributing_site_is_never_unmasked(
    base: list[str], tmp_path: Path, identity: None
) -> None:
    # the audit: with the other two sites out of budget (zero updates of weight 0), the
    # unmasked "sum" equalled hospital_a's update to 2.9e-6
    private = [
        *base,
        *SECURE,
        "privacy.delta=1e-3",
        f"paths.state={tmp_path / 'state'}",
        "federation.sites.1.privacy.epsilon=1",
        "federation.sites.2.privacy.epsilon=1",
    ]
    federate(private, tmp_path / "first")  # hospital_b and hospital_c spend their budgets
    plan = compose("demo", private)
    run = RunFolder.create(tmp_path / "second", plan.name, plan_to_yaml(plan))
    wire = WireGrid(private)
    with pytest.raises(
        SecureAggregationError,
        match=r"only 1 sites contributed an update "
        r"\(hospital_a\).*Not unmasked",
    ) as info:
        server.run_federation(wire, plan, run, run_id=1)
    assert "budget_exhausted" in str(info.value)
    # nothing after the masked vectors was asked: no site sent the shares that unmask
    configs = [r.content.config_records.get(RECORD_KEY_CONFIGS) for r in wire.inbox]
    assert not [c for c in configs if c is not None and Key.SHARE_LIST in c]
    assert sum(c is not None and Key.MASKED_PARAMETERS in c for c in configs) == 3
    rows = read_metrics(run.path)
    assert {r["site"]: r.get("status") for r in rows if r["split"] == "train"} == {
        "hospital_a": None,
        "hospital_b": "budget_exhausted",
        "hospital_c": "budget_exhausted",
    }


def test_min_sites_below_two_is_refused_with_secure_aggregation(base: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"strategy\.min_sites=1 with secure_aggregation"):
        compose("demo", [*base, *SECURE, "strategy.min_sites=1"])


def test_sites_say_when_the_clipping_range_cuts_their_update(
    base: list[str], tmp_path: Path, identity: None, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("fl_imaging.secagg.client")
    logger.addHandler(caplog.handler)  # the apps' "fl_imaging" logger does not propagate
    try:
        federate([*base, *SECURE, "secure_aggregation.clipping_range=1e-5"], tmp_path)
    finally:
        logger.removeHandler(caplog.handler)
    clipped = [r.getMessage() for r in caplog.records if "secure aggregation clips" in r.message]
    assert {m.split(":")[0] for m in clipped} == {
        "site hospital_a",
        "site hospital_b",
        "site hospital_c",
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy=krum", "krum needs every site's own update"),
        ("strategy=fedmedian", "fedmedian needs every site's own update"),
        ("strategy.screen_norm_factor=10", "screening compares single updates"),
        ("strategy.cross_site_epochs=1", "fine-tuned model to the server in the clear"),
        ("privacy.central.noise_multiplier=1.0", "server-side clipping"),
        ("compression=int8", "compression=none"),
        ("secure_aggregation.reconstruction_threshold=3", "below num_shares=3"),
        ("secure_aggregation.num_shares=4", "between 3 and the 3 sites"),
        ("strategy.fraction_train=0.5", "at least 3 sites per round"),
        ("secure_aggregation.quantization_bits=31", "at most 30 bits"),
    ],
)
def test_combinations_that_cannot_work_are_refused(
    base: list[str], override: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        compose("demo", [*base, *SECURE, override])


def test_fewer_than_three_sites_are_refused(tmp_path: Path) -> None:
    two = "federation.sites=[{name: a, manifest: a.json}, {name: b, manifest: b.json}]"
    with pytest.raises(ConfigError, match="at least 3 sites per round"):
        compose("demo", [*tiny_overrides([], tmp_path), two, *SECURE])


@pytest.mark.e2e
def test_flwr_run_with_secaggplus_trains_every_site_and_finishes(
    tiny_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # real Flower: ClientApp processes, message dispatch, context.state across stages
    flwr_home = tmp_path / ".flwr"
    monkeypatch.setenv("FLWR_HOME", str(flwr_home))
    overrides = [*tiny_overrides(tiny_sites, tmp_path), "rounds=2", *SECURE]

    outcome = run_simulation("demo", overrides, project_root=REPO_ROOT)

    assert outcome.ok, outcome.status
    assert outcome.run_dir is not None
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    rows = read_metrics(outcome.run_dir)
    assert not [r for r in rows if "error" in r or "status" in r]
    for server_round in (1, 2):
        trained = {r["site"] for r in rows if r["split"] == "train" and r["round"] == server_round}
        assert trained == {"hospital_a", "hospital_b", "hospital_c"}
    dice = {
        r: [x["dice_mean"] for x in rows if x["split"] == "val" and x["round"] == r] for r in (0, 2)
    }
    assert sum(dice[2]) > sum(dice[0])
    assert local_superlink_pids(flwr_home) == []


def test_every_secure_aggregation_reply_is_in_the_sites_audit_log(
    plain_and_secure: tuple[Federation, Federation],
) -> None:
    from fl_imaging.site.audit import read_audit

    _, secure = plain_and_secure
    logged = {
        e["sha256"]: e
        for site in secure.plan.federation.sites
        for e in read_audit(secure.plan.site_state_dir(site))
    }
    for reply in secure.grid.inbox:  # as the server received them
        entry = logged[reply.content.object_id]
        assert entry["bytes"] == message_bytes(reply)
        if stage_of_reply(reply) == "masked":  # the masked vector: no array, only its size
            assert all(not record for record in entry["arrays"].values())
            assert str(entry["configs"][RECORD_KEY_CONFIGS]["masked_params"][0]).endswith("bytes>")
