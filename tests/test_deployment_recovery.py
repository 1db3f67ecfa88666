"""Recovery on loopback processes (scripts/deploy/federation.py): one deployment, two faults.

Three registered hospitals over TLS with node authentication and the gateway.

* (first) A hospital is cut off mid-round (SIGSTOP, as ``docker pause`` does) for longer than
  ``strategy.round_timeout``: the round goes on without it and records why, its late reply
  is discarded, and it trains again in the next round once it is back.
* (second) The coordinator restarts mid-round: hospital_a trains with DP-SGD, hospital_b takes
  longer per round. As soon as round 1 ends hospital_b is paused, so round 2 cannot end however
  slow hospital_a is; while round 2 is in flight (hospital_a has trained it and
  charged its ledger, hospital_b has not replied) the coordinator (SuperLink, ServerApp,
  gateway) is SIGKILLed, hospital_b thawed, and the coordinator restarted on the same state
  database. The SuperNodes reconnect by themselves and ``resume=latest`` finishes the run:
  every round appears once in ``metrics.jsonl`` and hospital_a's ledger charges every round
  it trained, the cut-short one included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fl_imaging.outputs.reporting import read_metrics
from fl_imaging.privacy.ledger import LEDGER_FILE, read_ledger
from fl_imaging.site.audit import read_audit
from tests.conftest import tiny_overrides
from tests.test_deployment import FEDERATION, _federation, _free_base_port, _rows, _wait_for

pytestmark = pytest.mark.e2e

SITES = ["hospital_a", "hospital_b", "hospital_c"]
PRIVATE = "hospital_a"
CUT_OFF = "hospital_c"  # paused mid-round 1 for longer than the round
SLOW_C = "federation.sites.2.local_epochs=20"  # about 2 s a round here
PRIVATE_A = ["federation.sites.0.privacy.epsilon=8", "federation.sites.0.privacy.delta=1e-3"]
# hospital_b takes about 7 s a round here: longer than the time it takes to pause it
SLOW_B = "federation.sites.1.local_epochs=100"
HELD = "hospital_b"  # paused from the end of round 1 until the coordinator is killed


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


@pytest.fixture(scope="module")
def deployment(tiny_sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The deployment's folder (``up`` before the first test, ``down`` after the last)."""
    folder = tmp_path_factory.mktemp("recovery")
    port = _free_base_port(len(SITES) + 2)  # + gateway, SuperLink
    data_dir = tiny_sites[0].parent.parent
    up = _federation(
        folder, "up", "--port", str(port), "--data-dir", str(data_dir), "--sites", *SITES
    )
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        yield folder
    finally:
        down = _federation(folder, "down")
        assert down.returncode == 0, down.stderr


def _overrides(tiny_sites: list[Path], folder: Path, outputs: Path) -> list[str]:
    return [
        *tiny_overrides(tiny_sites, folder),
        "rounds=3",
        "strategy.cross_site_epochs=0",
        f"paths.outputs={outputs}",
    ]


def _start_run(folder: Path, overrides: list[str], log_name: str) -> subprocess.Popen:
    """``federation.py run`` in the background: its JSON on stdout, its log in logs/."""
    cmd = [sys.executable, str(FEDERATION), "--dir", str(folder), "run"]
    with (folder / "logs" / log_name).open("w") as log:
        return subprocess.Popen(
            [*cmd, "--overrides", " ".join(overrides)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )


def _received(log: Path) -> int:
    return log.read_text().count("Receiving: train message")


def test_a_hospital_cut_off_mid_round_is_dropped_its_late_reply_discarded_and_it_rejoins(
    deployment: Path, tiny_sites: list[Path]
) -> None:
    # first in this module: hospital_a has no privacy ledger yet, so it trains without DP
    folder = deployment
    outputs = folder / "outputs-cut-off"
    overrides = [
        *_overrides(tiny_sites, folder, outputs),
        "strategy.round_timeout=15",  # Flower's reconnect backoff after the pause: ~5 s here
        "strategy.min_sites=2",
        "strategy.screen_norm_factor=null",  # its many epochs make a larger update
        SLOW_C,  # still training when it is paused
    ]
    node_log = folder / "logs" / f"{CUT_OFF}.log"
    before = _received(node_log)
    run = _start_run(folder, overrides, "cut-off-run.log")
    try:
        _wait_for(lambda: _received(node_log) > before, f"{CUT_OFF} to get round 1", 240, run)
        paused = _federation(folder, "pause", CUT_OFF)
        assert paused.returncode == 0, paused.stderr
        _wait_for(
            lambda: any(
                r["round"] == 1 and r["site"] == CUT_OFF and "error" in r for r in _rows(outputs)
            ),
            f"round 1 to give up on {CUT_OFF}",
            120,
            run,
        )
        unpaused = _federation(folder, "unpause", CUT_OFF)
        assert unpaused.returncode == 0, unpaused.stderr
        out, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
        _federation(folder, "unpause", CUT_OFF)
    assert run.returncode == 0, (folder / "logs" / "cut-off-run.log").read_text()[-4000:]
    run_id = int(json.loads(out.strip().splitlines()[-1])["run_id"])
    run_dir = next(outputs.glob("*-demo"))
    rows = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    [missed] = [r for r in rows if r["site"] == CUT_OFF and r["round"] == 1]
    assert missed["error"] == "no reply within strategy.round_timeout=15 s"
    others = {r["site"] for r in rows if r["round"] == 1 and r.get("num_examples", 0) > 0}
    assert others == set(SITES) - {CUT_OFF}  # the round went on without it
    # it did finish round 1 and send its reply, late: the server never used it
    sent = [e["round"] for e in read_audit(folder / "state" / CUT_OFF) if e["run_id"] == run_id]
    assert 1 in sent, sent
    # back, it trains again in the next rounds; its failure is recorded, and it recovered
    back = [r for r in rows if r["site"] == CUT_OFF and r["round"] > 1]
    assert sorted(r["round"] for r in back if r.get("num_examples", 0) > 0) == [2, 3], back
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["site_failures"][CUT_OFF] == [
        {"round": 1, "split": "train", "error": "no reply within strategy.round_timeout=15 s"}
    ]
    assert summary["failed_sites"] == {}


def test_a_coordinator_killed_mid_round_resumes_and_the_ledger_charges_every_round_run(
    deployment: Path, tiny_sites: list[Path]
) -> None:
    folder = deployment
    outputs = folder / "outputs"
    state_dir = folder / "state" / PRIVATE
    overrides = [
        *_overrides(tiny_sites, folder, outputs),
        "strategy.min_sites=2",
        "strategy.screen_norm_factor=null",  # hospital_b's many epochs make a larger update
        *PRIVATE_A,
        SLOW_B,
    ]
    held_state = folder / "state" / HELD
    old_runs = {e["run_id"] for e in read_audit(held_state)}
    first = _start_run(folder, overrides, "first-run.log")
    try:
        _wait_for(
            lambda: any(r["round"] == 1 for r in _rows(outputs)),
            "round 1 to end",
            timeout=300,
            proc=first,
        )
        paused = _federation(folder, "pause", HELD)  # round 2 waits for it: no round timeout
        assert paused.returncode == 0, paused.stderr
        _wait_for(
            lambda: 2 in _charged_so_far(state_dir),
            f"{PRIVATE} to train round 2",
            timeout=300,
            proc=first,
        )
        # paused before it could finish round 2 (100 epochs, seconds): round 2 is in flight.
        # Its audit line is written before Flower sends a reply: no line, nothing sent.
        sent = [
            e["round"]
            for e in read_audit(held_state)
            if e["message_type"] == "train" and e["run_id"] not in old_runs
        ]
        assert 2 not in sent, sent
        killed = _federation(folder, "kill", "coordinator")
        assert killed.returncode == 0, killed.stderr
        summary_at_kill = json.loads(next(outputs.glob("*-demo/summary.json")).read_text())
        unpaused = _federation(folder, "unpause", HELD)
        assert unpaused.returncode == 0, unpaused.stderr
        first.terminate()  # the user's `flwr run` lost its SuperLink: not what is tested
        first.communicate(timeout=60)
        restarted = _federation(folder, "coordinator")
        assert restarted.returncode == 0, restarted.stderr[-3000:]
        second = _federation(
            folder, "run", "--overrides", " ".join([*overrides, "resume=latest"]), timeout=400
        )
        assert second.returncode == 0, second.stderr[-4000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
        _federation(folder, "unpause", HELD)
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
