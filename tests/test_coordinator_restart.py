"""A coordinator that restarts mid-round, on loopback processes (scripts/deploy/federation.py).

Three registered hospitals over TLS with node authentication; hospital_a trains with
DP-SGD, hospital_b takes longer per round. While round 2 is in flight (hospital_a has
trained it and charged its ledger, hospital_b is still training) the coordinator (the
SuperLink, its ServerApp and the gateway) is SIGKILLed, then restarted on the same
state database. The hospitals' SuperNodes reconnect by themselves and ``resume=latest``
finishes the run: every round appears once in ``metrics.jsonl`` and hospital_a's ledger
charges every round it trained, the cut-short one included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fl_imaging.outputs.reporting import read_metrics
from fl_imaging.privacy.ledger import LEDGER_FILE, read_ledger
from tests.conftest import tiny_overrides
from tests.test_deployment import FEDERATION, _federation, _free_base_port, _wait_for

pytestmark = pytest.mark.e2e

SITES = ["hospital_a", "hospital_b", "hospital_c"]
PRIVATE = "hospital_a"
PRIVATE_A = ["federation.sites.0.privacy.epsilon=8", "federation.sites.0.privacy.delta=1e-3"]
# round 2 is still running at hospital_b when hospital_a has trained it (about 7 s here)
SLOW_B = "federation.sites.1.local_epochs=100"


def _charged(state_dir: Path) -> list[tuple[str, int]]:
    """(run id, round) of every round the site's ledger charged, in order (checked ledger)."""
    ledger = read_ledger(state_dir)
    return [] if ledger is None else [(str(e["run_id"]), int(e["round"])) for e in ledger.rounds]


def _charged_so_far(state_dir: Path) -> list[int]:
    """Rounds in the ledger file while the site may be writing it (no integrity check)."""
    try:
        raw = json.loads((state_dir / LEDGER_FILE).read_text())
    except (OSError, ValueError):
        return []  # not written yet, or being replaced
    return [int(e["round"]) for e in raw.get("rounds", [])]


def test_a_coordinator_killed_mid_round_resumes_and_the_ledger_charges_every_round_run(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "deployment"
    outputs = folder / "outputs"
    state_dir = folder / "state" / PRIVATE
    port = _free_base_port(len(SITES) + 2)  # + gateway, SuperLink
    data_dir = tiny_sites[0].parent.parent
    up = _federation(
        folder, "up", "--port", str(port), "--data-dir", str(data_dir), "--sites", *SITES
    )
    assert up.returncode == 0, up.stderr[-3000:]
    overrides = [
        *tiny_overrides(tiny_sites, folder),
        "rounds=3",
        "strategy.min_sites=2",
        "strategy.cross_site_epochs=0",
        "strategy.screen_norm_factor=null",  # hospital_b's many epochs make a larger update
        f"paths.outputs={outputs}",
        *PRIVATE_A,
        SLOW_B,
    ]
    try:
        first_log = (folder / "logs" / "first-run.log").open("w")
        first = subprocess.Popen(
            [
                sys.executable,
                str(FEDERATION),
                "--dir",
                str(folder),
                "run",
                "--overrides",
                " ".join(overrides),
            ],
            stdout=subprocess.PIPE,
            stderr=first_log,
            text=True,
        )
        _wait_for(
            lambda: 2 in _charged_so_far(state_dir),
            f"{PRIVATE} to train round 2",
            timeout=300,
            proc=first,
        )
        killed = _federation(folder, "kill", "coordinator")
        assert killed.returncode == 0, killed.stderr
        summary_at_kill = json.loads(next(outputs.glob("*-demo/summary.json")).read_text())
        first.terminate()  # the user's `flwr run` lost its SuperLink: not what is tested
        first.communicate(timeout=60)
        first_log.close()
        restarted = _federation(folder, "coordinator")
        assert restarted.returncode == 0, restarted.stderr[-3000:]
        second = _federation(
            folder, "run", "--overrides", " ".join([*overrides, "resume=latest"]), timeout=400
        )
        assert second.returncode == 0, second.stderr[-4000:]
    finally:
        down = _federation(folder, "down")
        assert down.returncode == 0, down.stderr
    assert summary_at_kill["status"] == "running"
    assert summary_at_kill["rounds_completed"] == 1  # round 2 was cut short
    run_dir = next(outputs.glob("*-demo"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["rounds_completed"] == 3
    assert summary["resumed_after_rounds"] == [1]
    rows = read_metrics(run_dir)
    keys = [(r["round"], r["site"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys)), "a round appears twice in metrics.jsonl"
    assert {(n, s, "train") for n in (1, 2, 3) for s in SITES} <= set(keys)
    assert not [r for r in rows if "error" in r], rows
    # hospital_a's ledger: rounds 1 and 2 of the killed run, rounds 2 and 3 of the resumed one
    charged = _charged(state_dir)
    runs = list(dict.fromkeys(run for run, _ in charged))
    assert len(runs) == 2, charged
    assert charged == [(runs[0], 1), (runs[0], 2), (runs[1], 2), (runs[1], 3)]
    trained = [r for r in rows if r["site"] == PRIVATE and r["split"] == "train"]
    assert len(charged) > len(trained)  # never fewer charges than rounds that count
    ledger = read_ledger(state_dir)
    assert ledger is not None
    # what the site reported last includes the charge of the cut-short round
    assert trained[-1]["epsilon_spent"] == pytest.approx(ledger.epsilon_spent)
    assert ledger.epsilon_spent <= 8
    # the SuperNodes reconnected by themselves: each hospital started once
    for site in SITES:
        node_log = (folder / "logs" / f"{site}.log").read_text()
        assert node_log.count("Starting Flower SuperNode") == 1, site
