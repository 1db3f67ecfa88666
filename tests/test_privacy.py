"""Per-site DP: planning, cumulative accounting, the ledger across restarts, exhaustion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fl_imaging.config import ConfigError, RunPlan, compose
from fl_imaging.ml.models import new_model
from fl_imaging.privacy.accounting import epsilon_of, noise_for_budget
from fl_imaging.privacy.ledger import (
    AUDIT_FILE,
    LedgerError,
    ledger_path,
    open_ledger,
    read_ledger,
)
from fl_imaging.site.resolve import resolve_site
from fl_imaging.site.rounds import train_round
from fl_imaging.tools.cli import main
from tests.conftest import tiny_overrides


@pytest.mark.parametrize(
    ("epsilon", "delta", "rounds", "steps", "sample_rate"),
    [
        (8.0, 1e-5, 10, 30, 0.034),  # hippocampus-like site
        (1.0, 1e-5, 10, 3, 0.34),  # a small site with a tight budget
        (4.0, 1e-3, 5, 8, 0.125),
        (0.5, 1e-4, 3, 20, 0.05),
        (16.0, 1e-6, 20, 2, 0.5),
    ],
)
def test_planned_noise_never_exceeds_and_nearly_spends_the_budget(
    epsilon: float, delta: float, rounds: int, steps: int, sample_rate: float
) -> None:
    sigma = noise_for_budget(
        history=[],
        epsilon=epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=rounds * steps,
        accountant="rdp",
    )
    spent = [
        epsilon_of([(sigma, sample_rate, steps * r)], delta=delta, accountant="rdp")
        for r in range(1, rounds + 1)
    ]
    assert all(e <= epsilon for e in spent)
    assert spent == sorted(spent)
    assert spent[-1] >= 0.95 * epsilon


@pytest.mark.parametrize("stop_after", [1, 4])
def test_replanning_after_a_restart_spends_the_rest_exactly(stop_after: int) -> None:
    epsilon, delta, q, steps, rounds = 8.0, 1e-5, 0.1, 10, 6
    sigma = noise_for_budget(
        history=[],
        epsilon=epsilon,
        delta=delta,
        sample_rate=q,
        steps=steps * rounds,
        accountant="rdp",
    )
    history = [(sigma, q, steps * stop_after)]
    # a new run plans its own 6 rounds over what is left
    sigma2 = noise_for_budget(
        history=history,
        epsilon=epsilon,
        delta=delta,
        sample_rate=q,
        steps=steps * rounds,
        accountant="rdp",
    )
    assert sigma2 > sigma  # less budget left, more noise
    final = epsilon_of([*history, (sigma2, q, steps * rounds)], delta=delta, accountant="rdp")
    assert 0.95 * epsilon <= final <= epsilon


def test_no_noise_helps_once_the_budget_is_spent() -> None:
    with pytest.raises(ValueError, match="is spent"):
        noise_for_budget(
            history=[(0.5, 0.5, 1000)],
            epsilon=1.0,
            delta=1e-5,
            sample_rate=0.5,
            steps=1,
            accountant="rdp",
        )


@pytest.fixture
def private_plan(tiny_sites: list[Path], tmp_path: Path) -> RunPlan:
    """Tiny demo with hospital_a private (epsilon 8) over 3 planned rounds."""
    return compose(
        "demo",
        [
            *tiny_overrides(tiny_sites, tmp_path),
            "rounds=3",
            "federation.sites.0.privacy.epsilon=8",
            "federation.sites.0.privacy.delta=1e-3",
        ],
    )


def test_reported_epsilon_matches_an_independent_opacus_recount(private_plan: RunPlan) -> None:
    site = resolve_site({"partition-id": 0}, private_plan)
    weights = new_model(private_plan).state_dict()
    reports = []
    for server_round in (1, 2):
        outcome = train_round(site, private_plan, weights, server_round=server_round, run_id="r1")
        assert outcome.weights is not None and outcome.privacy is not None
        assert set(outcome.weights) == set(weights)  # plain keys, no "_module." prefix
        weights = outcome.weights
        reports.append(outcome.privacy)
    ledger = read_ledger(site.state_dir)
    assert ledger is not None and len(ledger.rounds) == 2
    independent = RDPAccountant()
    for entry in ledger.rounds:
        for _ in range(entry["accounted_steps"]):
            independent.step(
                noise_multiplier=entry["noise_multiplier"], sample_rate=entry["sample_rate"]
            )
    assert reports[-1].epsilon_spent == pytest.approx(independent.get_epsilon(delta=1e-3))
    assert 0 < reports[0].epsilon_spent < reports[1].epsilon_spent <= 8.0


def test_ledger_survives_a_restart_and_exhaustion_blocks_training(
    private_plan: RunPlan,
) -> None:
    site = resolve_site({"partition-id": 0}, private_plan)
    weights = new_model(private_plan).state_dict()
    first = [
        train_round(site, private_plan, weights, server_round=r, run_id="run-1").privacy
        for r in (1, 2)
    ]  # the run is killed after round 2 of 3
    resumed = train_round(site, private_plan, weights, server_round=1, run_id="run-2").privacy
    assert first[1] is not None and resumed is not None
    assert resumed.epsilon_spent > first[1].epsilon_spent  # continues, not from zero
    for r in (2, 3):
        last = train_round(site, private_plan, weights, server_round=r, run_id="run-2").privacy
    assert last is not None and 0.95 * 8 <= last.epsilon_spent <= 8.0
    # every later run finds the budget spent: the site refuses to train
    refused = train_round(site, private_plan, weights, server_round=1, run_id="run-3")
    assert refused.weights is None and refused.result is None
    assert refused.privacy is not None and refused.privacy.exhausted
    assert refused.privacy.epsilon_spent == pytest.approx(last.epsilon_spent)


def test_a_changed_budget_is_refused_until_an_audited_reset(
    private_plan: RunPlan, capsys: pytest.CaptureFixture[str]
) -> None:
    site = resolve_site({"partition-id": 0}, private_plan)
    train_round(
        site, private_plan, new_model(private_plan).state_dict(), server_round=1, run_id="a"
    )
    with pytest.raises(LedgerError, match=r"site hospital_a.*epsilon=8.*epsilon=4.*privacy reset"):
        open_ledger(site.state_dir, site="hospital_a", epsilon=4.0, delta=1e-3, accountant="rdp")

    overrides = [
        f"paths.root={private_plan.paths.root}",
        *[
            f"federation.sites.{i}.manifest={s.manifest}"
            for i, s in enumerate(private_plan.federation.sites)
        ],
    ]
    assert main(["privacy", "status", "experiment=demo", *overrides]) == 0
    assert "hospital_a" in capsys.readouterr().out
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
    assert not ledger_path(site.state_dir).exists()
    [event] = [json.loads(x) for x in (site.state_dir / AUDIT_FILE).read_text().splitlines()]
    assert event["site"] == "hospital_a" and event["reason"] == "new cohort"
    assert event["epsilon_spent"] > 0 and (site.state_dir / event["archived_to"]).is_file()
    # a fresh ledger with the new budget is accepted now
    open_ledger(site.state_dir, site="hospital_a", epsilon=4.0, delta=1e-3, accountant="rdp")


def test_a_corrupt_ledger_stops_the_site(private_plan: RunPlan) -> None:
    site = resolve_site({"partition-id": 0}, private_plan)
    site.state_dir.mkdir(parents=True)
    ledger_path(site.state_dir).write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable"):
        train_round(site, private_plan, new_model(private_plan).state_dict(), server_round=1)


def test_fedprox_and_batchnorm_are_refused_with_private_sites() -> None:
    with pytest.raises(ConfigError, match=r"proximal_mu.*private sites"):
        compose("demo_private", "strategy=fedprox")
    with pytest.raises(ConfigError, match=r"model\.norm=batch"):
        compose("demo_private", "model.norm=batch")
