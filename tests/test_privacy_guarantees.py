"""The privacy guarantee holds against the coordinator: secret noise, hospital-owned policy,
a ledger that cannot be lost, edited or raced, and budgets that cannot be nonsense.

Each test reproduces a finding of the privacy audit (issue 14) and shows it closed.
"""

from __future__ import annotations

import json
import shutil
import stat
import threading
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.optimizers import optimizer as opacus_optimizer

from fl_imaging.config import ConfigError, RunPlan, compose, plan_to_yaml
from fl_imaging.data.manifest import load_manifest
from fl_imaging.ml.models import new_model
from fl_imaging.outputs.reporting import RunFolder, read_metrics
from fl_imaging.privacy import dp_sgd, randomness
from fl_imaging.privacy.accounting import default_delta, epsilon_of
from fl_imaging.privacy.ledger import (
    AUDIT_FILE,
    LOCK_FILE,
    MARKER_FILE,
    LedgerBusyError,
    LedgerError,
    ledger_lock,
    ledger_path,
    read_ledger,
)
from fl_imaging.privacy.policy import POLICY_FILE, PolicyError
from fl_imaging.server import rounds as server
from fl_imaging.site.resolve import Site, resolve_site
from fl_imaging.site.rounds import train_round
from fl_imaging.tools.cli import main
from tests.conftest import tiny_overrides
from tests.local_grid import LocalGrid

PRIVATE_A = ["federation.sites.0.privacy.epsilon=8", "federation.sites.0.privacy.delta=1e-3"]


def plan_for(tiny_sites: list[Path], root: Path, *extra: str) -> RunPlan:
    return compose("demo", [*tiny_overrides(tiny_sites, root), "rounds=3", *extra])


@pytest.fixture
def private_plan(tiny_sites: list[Path], tmp_path: Path) -> RunPlan:
    """Tiny demo, hospital_a private (epsilon 8, delta 1e-3) over 3 planned rounds."""
    return plan_for(tiny_sites, tmp_path, *PRIVATE_A)


def site_a(plan: RunPlan, state_dir: Path | None = None, **node: str) -> Site:
    config = {"site": "hospital_a", **node}
    if state_dir is not None:
        config["state-dir"] = str(state_dir)
    return resolve_site(config, plan)


def train(site: Site, plan: RunPlan, server_round: int = 1, run_id: str = "r1"):
    return train_round(
        site, plan, new_model(plan).state_dict(), server_round=server_round, run_id=run_id
    )


def max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ----------------------------------------------------------------- 1: secret randomness


def test_the_same_config_and_data_give_different_noise(private_plan: RunPlan, tmp_path: Path):
    # the audit regenerated every noise tensor from plan.seed: two sites (or two tries)
    # with the same config and data then released identical weights
    first = train(site_a(private_plan, tmp_path / "s1"), private_plan)
    second = train(site_a(private_plan, tmp_path / "s2"), private_plan)
    assert first.weights is not None and second.weights is not None
    assert max_gap(first.weights, second.weights) > 1e-4


def test_noise_and_sampling_come_only_from_the_os_secret(
    private_plan: RunPlan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Provenance: with os.urandom fixed, the round is reproducible whatever the torch seed;
    with other urandom bytes it is not. Nothing the server knows enters the noise."""
    drawn: list[torch.Generator] = []
    made = randomness.secret_generator

    def recorded(device: torch.device | str = "cpu") -> torch.Generator:
        drawn.append(made(device))
        return drawn[-1]

    seen: list[tuple[object, bool]] = []
    original_noise = opacus_optimizer._generate_noise

    def noise_spy(std, reference, generator=None, secure_mode=False):
        seen.append((generator, secure_mode))
        return original_noise(std, reference, generator, secure_mode)

    monkeypatch.setattr(dp_sgd, "secret_generator", recorded)
    monkeypatch.setattr(opacus_optimizer, "_generate_noise", noise_spy)
    secret = {"bytes": b"\x01" * randomness.SEED_BYTES}
    monkeypatch.setattr(randomness.os, "urandom", lambda n: secret["bytes"][:n])

    results = []
    for i, torch_seed in enumerate((0, 12345)):
        torch.manual_seed(torch_seed)  # the global RNG the audit could predict
        outcome = train(site_a(private_plan, tmp_path / f"fixed{i}"), private_plan)
        assert outcome.weights is not None
        results.append(outcome.weights)
    assert max_gap(results[0], results[1]) == 0.0
    secret["bytes"] = b"\x02" * randomness.SEED_BYTES
    other = train(site_a(private_plan, tmp_path / "other"), private_plan).weights
    assert other is not None and max_gap(results[0], other) > 1e-4
    # every noise draw used a secret generator, with Opacus' floating-point-safe sampling
    assert seen and all(secure for _, secure in seen)
    assert {id(g) for g, _ in seen} <= {id(g) for g in drawn}


# ------------------------------------------------------------ 2: the hospital's policy


def write_policy(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / POLICY_FILE
    path.write_text(text)
    return path


def test_a_policy_requiring_dp_refuses_a_run_that_turns_it_off(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    # the audit: federation.sites.0.privacy.epsilon=null made hospital_a train without DP
    plan = plan_for(tiny_sites, tmp_path, "federation.sites.0.privacy.epsilon=null")
    site = site_a(plan)
    write_policy(site.state_dir, "require_dp: true\nepsilon: 8\n")
    outcome = train(site, plan)
    assert outcome.weights is None and outcome.result is None
    assert outcome.refusal is not None and "requires it" in outcome.refusal
    assert str(site.state_dir / POLICY_FILE) in outcome.refusal


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("federation.sites.0.privacy.epsilon=16", "epsilon 16 > the policy's 8"),
        ("federation.sites.0.privacy.delta=1e-2", "delta 0.01 > the policy's 0.001"),
        ("federation.sites.0.privacy.max_grad_norm=5", "max_grad_norm 5 > the policy's 1"),
        ("privacy.accountant=prv", "accountant prv is not the policy's rdp"),
        ("rounds=40", "40 rounds > the policy's max_rounds 20"),
        ("train.local_epochs=3", "3 local epochs > the policy's max_local_epochs 2"),
    ],
)
def test_a_run_asking_for_weaker_privacy_than_the_policy_is_refused(
    tiny_sites: list[Path], tmp_path: Path, override: str, reason: str
) -> None:
    plan = plan_for(tiny_sites, tmp_path, *PRIVATE_A, override)
    site = site_a(plan)
    write_policy(site.state_dir, POLICY)
    outcome = train(site, plan)
    assert outcome.weights is None and outcome.refusal is not None
    assert reason in outcome.refusal
    assert read_ledger(site.state_dir) is None  # refused before anything was spent


POLICY = """\
require_dp: true
epsilon: 8
delta: 1.0e-3
max_grad_norm: 1.0
accountant: rdp
max_rounds: 20
max_local_epochs: 2
"""


def _sites(plan: RunPlan) -> list[str]:
    return [
        f"federation.sites.{i}.manifest={s.manifest}" for i, s in enumerate(plan.federation.sites)
    ]


def test_a_run_at_least_as_strict_as_the_policy_trains(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    plan = plan_for(tiny_sites, tmp_path, *PRIVATE_A, "federation.sites.0.privacy.epsilon=4")
    site = site_a(plan)
    write_policy(site.state_dir, POLICY)
    outcome = train(site, plan)
    assert outcome.weights is not None and outcome.privacy is not None
    assert outcome.privacy.epsilon_budget == 4.0  # the run's stricter budget, not the policy's


def test_too_little_planned_noise_is_refused(private_plan: RunPlan) -> None:
    site = site_a(private_plan)
    write_policy(site.state_dir, "min_noise_multiplier: 1000\n")
    outcome = train(site, private_plan)
    assert outcome.weights is None and outcome.refusal is not None
    assert "below the policy's min_noise_multiplier 1000" in outcome.refusal


def test_the_policy_named_by_the_node_config_is_used_and_must_exist(
    private_plan: RunPlan, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "hospital", "epsilon: 2\n")
    site = site_a(private_plan, **{"privacy-policy": str(policy)})
    outcome = train(site, private_plan)
    assert outcome.refusal is not None and "epsilon 8 > the policy's 2" in outcome.refusal
    missing = site_a(private_plan, **{"privacy-policy": str(tmp_path / "nope.yaml")})
    with pytest.raises(PolicyError, match=r"nope\.yaml.*does not exist"):
        train(missing, private_plan)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epsilon: 8\nepsilonn: 4\n", r"unknown keys \['epsilonn'\]"),
        ("epsilon: .nan\n", "epsilon must be finite and > 0"),
        ("epsilon: -1\n", "epsilon must be finite and > 0"),
        ("require_dp: maybe\n", "require_dp must be true or false"),
        ("max_rounds: 0\n", "max_rounds must be an integer >= 1"),
        ("- a list\n", "must be a YAML mapping"),
    ],
)
def test_an_invalid_policy_stops_the_site_naming_the_file(
    private_plan: RunPlan, text: str, message: str
) -> None:
    site = site_a(private_plan)
    path = write_policy(site.state_dir, text)
    with pytest.raises(PolicyError, match=message) as info:
        train(site, private_plan)
    assert str(path) in str(info.value)


def test_a_site_with_a_ledger_never_trains_without_dp(
    private_plan: RunPlan, tiny_sites: list[Path]
) -> None:
    site = site_a(private_plan)
    assert train(site, private_plan).privacy is not None
    plain = compose("demo", [*tiny_overrides(tiny_sites, Path(private_plan.paths.root))])
    outcome = train(site_a(plain), plain)
    assert outcome.weights is None and outcome.refusal is not None
    assert "has a privacy ledger" in outcome.refusal


def test_the_server_records_a_refusal_and_the_run_goes_on(
    tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    overrides = [*tiny_overrides(tiny_sites, tmp_path), "rounds=1", "strategy.cross_site_epochs=0"]
    plan = compose("demo", overrides)
    write_policy(plan.site_state_dir(plan.federation.sites[0]), "require_dp: true\n")
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    summary = server.run_federation(LocalGrid(overrides), plan, run, run_id=1)
    rows = read_metrics(run.path)
    [row] = [r for r in rows if r["split"] == "train" and "status" in r]
    assert not [r for r in rows if r["split"] == "val" and "status" in r]  # its Dice is fine
    assert (row["site"], row["status"]) == ("hospital_a", "refused_by_policy")
    assert "requires it" in row["reason"] and row["num_examples"] == 0
    assert "requires it" in summary["refused_by_policy"]["hospital_a"]
    assert summary["rounds_completed"] == 1  # hospital_b and hospital_c carried the round


# ------------------------------------------------------------------------ 3: the ledger


def test_a_deleted_ledger_is_refused_until_an_audited_reset(
    private_plan: RunPlan, capsys: pytest.CaptureFixture[str]
) -> None:
    # the audit: deleting the ledger restored the full budget, without an audit entry
    site = site_a(private_plan)
    spent = train(site, private_plan).privacy
    assert spent is not None and spent.epsilon_spent > 0
    ledger_path(site.state_dir).unlink()
    with pytest.raises(LedgerError, match="ledger is missing"):
        train(site, private_plan, run_id="r2")
    overrides = [f"paths.root={private_plan.paths.root}", *_sites(private_plan), *PRIVATE_A]
    assert (
        main(
            [
                "privacy",
                "reset",
                "--site",
                "hospital_a",
                "--yes",
                "--reason",
                "new cohort",
                "experiment=demo",
                *overrides,
            ]
        )
        == 0
    )
    [event] = [json.loads(x) for x in (site.state_dir / AUDIT_FILE).read_text().splitlines()]
    assert event["reason"] == "new cohort" and "ledger is missing" in event["problem"]
    assert train(site, private_plan, run_id="r3").weights is not None


def test_an_emptied_or_edited_ledger_fails_its_integrity_check(private_plan: RunPlan) -> None:
    site = site_a(private_plan)
    train(site, private_plan)
    path = ledger_path(site.state_dir)
    original = path.read_text()
    for edit in ({"history": []}, {"epsilon_budget": 80.0}):
        path.write_text(json.dumps({**json.loads(original), **edit}))
        with pytest.raises(LedgerError, match="integrity check"):
            train(site, private_plan, server_round=2)
    path.write_text(original)
    assert train(site, private_plan, server_round=2).weights is not None


def test_an_older_copy_of_the_ledger_is_refused(private_plan: RunPlan, tmp_path: Path) -> None:
    site = site_a(private_plan)
    train(site, private_plan)
    backup = tmp_path / "ledger-after-round-1.json"
    shutil.copy(ledger_path(site.state_dir), backup)
    train(site, private_plan, server_round=2)
    shutil.copy(backup, ledger_path(site.state_dir))  # rounds 2.. "forgotten"
    with pytest.raises(LedgerError, match="not the latest version"):
        train(site, private_plan, server_round=3)


def test_a_crash_between_ledger_and_marker_writes_loses_nothing(private_plan: RunPlan) -> None:
    site = site_a(private_plan)
    train(site, private_plan)
    marker = (site.state_dir / MARKER_FILE).read_text()
    train(site, private_plan, server_round=2)
    (site.state_dir / MARKER_FILE).write_text(marker)  # the marker write of round 2 was lost
    ledger = read_ledger(site.state_dir)
    assert ledger is not None and len(ledger.rounds) == 2


def test_a_second_training_on_the_same_state_waits_for_the_lock(private_plan: RunPlan) -> None:
    # the audit: two trainings at once both released weights, the ledger kept one
    site = site_a(private_plan)
    outcomes = {}

    def run(server_round: int) -> None:
        outcomes[server_round] = train(site, private_plan, server_round=server_round)

    threads = [threading.Thread(target=run, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o.weights is not None for o in outcomes.values())
    ledger = read_ledger(site.state_dir)
    assert ledger is not None and sorted(r["round"] for r in ledger.rounds) == [1, 2]
    recount = RDPAccountant()
    for entry in ledger.rounds:
        for _ in range(entry["accounted_steps"]):
            recount.step(
                noise_multiplier=entry["noise_multiplier"], sample_rate=entry["sample_rate"]
            )
    assert ledger.epsilon_spent == pytest.approx(recount.get_epsilon(delta=1e-3))


def test_a_training_that_cannot_get_the_lock_in_time_is_refused_clearly(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    plan = plan_for(tiny_sites, tmp_path, *PRIVATE_A, "privacy.lock_timeout=0.3")
    site = site_a(plan)
    busy = pytest.raises(LedgerBusyError, match=r"site hospital_a: another training holds")
    with ledger_lock(site.state_dir, site="hospital_a", timeout=0), busy:
        train(site, plan)
    assert read_ledger(site.state_dir) is None


def test_privacy_state_files_are_private_to_the_site_user(private_plan: RunPlan) -> None:
    site = site_a(private_plan)
    train(site, private_plan)
    for name in (ledger_path(site.state_dir).name, MARKER_FILE, LOCK_FILE):
        mode = stat.S_IMODE((site.state_dir / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))


# ------------------------------------------------------------------------ 5: the budget


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0"])
def test_a_budget_must_be_finite_and_positive(value: str) -> None:
    # the audit: nan trained a round at sigma 10, inf trained every round
    with pytest.raises(ConfigError, match=r"sites\[hospital_a\]\.privacy\.epsilon must be a fin"):
        compose("demo", f"federation.sites.0.privacy.epsilon={value}")


def test_a_misspelt_site_key_added_with_plus_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown keys .*federation\.sites\[0\]\.privcy"):
        compose("demo", "+federation.sites.0.privcy.epsilon=8")


def test_default_delta_is_far_below_one_over_the_cohort() -> None:
    assert default_delta(7) == 1e-5  # was 1 / (10 x 7) = 0.014
    assert default_delta(100_000) == pytest.approx(100_000**-1.1)
    assert all(default_delta(n) < 1 / n for n in (1, 7, 119, 10**4, 10**6, 10**8))
    assert all(default_delta(n) <= 1 / (10 * n) for n in (1, 7, 119, 10**4))


def test_reported_epsilon_is_never_negative() -> None:
    # the audit: budget 0.001 with delta 0.025 reported epsilon -0.0055 (Opacus: < 0)
    raw = RDPAccountant()
    raw.history = [(100.0, 0.5, 2)]
    assert raw.get_epsilon(delta=0.025) < 0
    assert epsilon_of([(100.0, 0.5, 2)], delta=0.025, accountant="rdp") == 0.0


def test_a_delta_not_below_one_over_the_cohort_is_refused_at_the_site(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    plan = plan_for(
        tiny_sites,
        tmp_path,
        "federation.sites.0.privacy.epsilon=8",
        "federation.sites.0.privacy.delta=0.9",
    )
    with pytest.raises(ConfigError, match=r"site hospital_a: delta=0.9 must be below 1/"):
        train(site_a(plan), plan)


# ------------------------------------------------------------- the pre-flight plan


def test_the_privacy_plan_equals_opacus_and_the_training_that_runs(
    private_plan: RunPlan, capsys: pytest.CaptureFixture[str]
) -> None:
    from opacus.accountants.utils import get_noise_multiplier

    from fl_imaging.privacy.planning import plan_lines
    from fl_imaging.privacy.requests import privacy_plans

    [plan] = privacy_plans(private_plan)
    site = site_a(private_plan)
    num_train = len(load_manifest(site.manifest).split("train"))
    steps_per_epoch = -(-num_train // private_plan.train.batch_size)
    assert (plan.num_train, plan.sample_rate) == (num_train, 1 / steps_per_epoch)
    # an independent recount with Opacus' own functions
    sigma = get_noise_multiplier(
        target_epsilon=8.0,
        target_delta=1e-3,
        sample_rate=1 / steps_per_epoch,
        steps=plan.total_steps,
        accountant="rdp",
        epsilon_tolerance=0.01,
    )
    assert plan.noise_multiplier == pytest.approx(sigma)
    recount = RDPAccountant()
    recount.history = [(sigma, 1 / steps_per_epoch, plan.steps_per_round)]
    assert plan.epsilon_per_round[0] == pytest.approx(recount.get_epsilon(delta=1e-3))
    assert plan.epsilon_per_round[-1] <= 8.0
    # the site plans exactly this when its first round starts
    train(site, private_plan)
    ledger = read_ledger(site.state_dir)
    assert ledger is not None and ledger.plan is not None
    assert ledger.plan.noise_multiplier == pytest.approx(plan.noise_multiplier)
    assert ledger.epsilon_spent == pytest.approx(plan.epsilon_per_round[0])
    overrides = [f"paths.root={private_plan.paths.root}", *_sites(private_plan), *PRIVATE_A]
    assert main(["privacy", "plan", "experiment=demo", "rounds=3", *overrides]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["site", "cases", "batch"]
    assert "hospital_a" in out and "warning: site hospital_a: the noise" in out
    assert "warning: site hospital_a: train.optimizer=adam under DP-SGD" in out
    assert plan_lines([plan])[1].split()[0] == "hospital_a"
