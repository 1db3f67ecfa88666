"""Deployment on loopback: a SuperLink and one SuperNode per hospital, TLS and node auth.

One deployment (scripts/deploy/federation.py) serves every test here, because each
start costs tens of seconds: three registered hospitals and one hospital whose key was
never registered; one registered hospital is killed (SIGKILL) as round 1 starts and
restarted once the server has recorded its failure. The run must still complete, with
the restarted hospital back in a later round.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fl_imaging.reporting import read_metrics
from tests.conftest import REPO_ROOT, tiny_overrides

pytestmark = pytest.mark.e2e

FEDERATION = REPO_ROOT / "scripts" / "deploy" / "federation.py"
SITES = ["hospital_a", "hospital_b", "hospital_c"]
KILLED = "hospital_c"
INTRUDER = "intruder"


# hospital_a's own privacy policy, held on its side and named by its --node-config
POLICY_SITE = "hospital_a"
POLICY = "require_dp: true\nepsilon: 8\ndelta: 1.0e-3\n"
PRIVATE_A = ["federation.sites.0.privacy.epsilon=8", "federation.sites.0.privacy.delta=1e-3"]


@dataclass
class Deployment:
    folder: Path
    outcome: dict
    run_dir: Path
    intruder_alive: bool
    pids: list[int]
    # a second run that asks hospital_a to train without DP (its policy refuses)
    refused_outcome: dict
    refused_run_dir: Path


def _free_base_port(count: int) -> int:
    # shuffled: two test sessions at once (shared machine) rarely probe the same ports
    for base in random.sample(range(29400, 29900, 20), k=25):
        ports_free = True
        for port in range(base, base + count):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    ports_free = False
                    break
        if ports_free:
            return base
    raise RuntimeError("no free loopback ports in 29400-29900")


def _federation(folder: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(FEDERATION), "--dir", str(folder), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _wait_for(predicate, what: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def _rows(outputs: Path) -> list[dict]:
    runs = [p for p in outputs.glob("*-demo") if (p / "metrics.jsonl").is_file()]
    return read_metrics(runs[0]) if runs else []


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def deployment(
    tiny_sites: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("deployment")
    outputs = folder / "outputs"
    data_dir = tiny_sites[0].parent.parent
    port = _free_base_port(len(SITES) + 2)
    policies = folder / "policies"
    policies.mkdir()
    (policies / f"{POLICY_SITE}.yaml").write_text(POLICY)
    up = _federation(folder, "up", "--port", str(port), "--data-dir", str(data_dir),
                     "--policy-dir", str(policies), "--sites", *SITES)  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        intruder = _federation(folder, "node", INTRUDER, "--unregistered")
        assert intruder.returncode == 0, intruder.stderr[-3000:]
        overrides = [
            *tiny_overrides(tiny_sites, folder),
            "rounds=3",
            "strategy.min_sites=2",
            "strategy.cross_site_epochs=0",
            f"paths.outputs={outputs}",
            *PRIVATE_A,  # what hospital_a's policy allows
        ]
        run_log = (folder / "logs" / "run.log").open("w")
        run = subprocess.Popen(
            [sys.executable, str(FEDERATION), "--dir", str(folder), "run",
             "--overrides", " ".join(overrides)],
            stdout=subprocess.PIPE, stderr=run_log, text=True,
        )  # fmt: skip
        # crash one hospital as round 1 starts (the server writes the initial model and
        # summary.json just before it sends round 1, whose replies also evaluate that model)...
        _wait_for(
            lambda: any(outputs.glob("*-demo/summary.json")),
            "round 1 to start",
            timeout=240,
            proc=run,
        )
        killed = _federation(folder, "kill", KILLED)
        assert killed.returncode == 0, killed.stderr
        # ...and restart it once the server has given up on it for round 1
        _wait_for(
            lambda: any(r["round"] == 1 and "error" in r for r in _rows(outputs)),
            f"round 1 to record {KILLED}'s failure",
            timeout=150,
            proc=run,
        )
        restarted = _federation(folder, "node", KILLED)
        assert restarted.returncode == 0, restarted.stderr[-3000:]
        out, _ = run.communicate(timeout=400)
        run_log.close()
        assert run.returncode == 0, (folder / "logs" / "run.log").read_text()[-4000:]
        outcome = json.loads(out.strip().splitlines()[-1])
        # the coordinator turns DP off for hospital_a: the hospital's policy refuses
        refused_outputs = folder / "outputs-refused"
        plain = [o for o in overrides if o not in PRIVATE_A and not o.startswith("paths.outputs")]
        second = _federation(folder, "run", "--overrides", " ".join(
            [*plain, "rounds=1", f"paths.outputs={refused_outputs}"]), timeout=300)  # fmt: skip
        assert second.returncode == 0, second.stderr[-4000:]
        refused_outcome = json.loads(second.stdout.strip().splitlines()[-1])
        state = json.loads((folder / "deployment.json").read_text())
        pids = [p for n in state["nodes"].values() for p in n["pids"]] + [state["superlink"]]
        intruder_alive = _pid_alive(state["nodes"][INTRUDER]["pids"][0])
        yield Deployment(
            folder, outcome, next(outputs.glob("*-demo")), intruder_alive, pids,
            refused_outcome, next(refused_outputs.glob("*-demo")),
        )  # fmt: skip
    finally:
        down = _federation(folder, "down")
        assert down.returncode == 0, down.stderr


def test_tls_authenticated_deployment_completes_rounds_and_writes_the_run_folder(
    deployment: Deployment,
) -> None:
    assert deployment.outcome["status"] == "finished:completed"
    superlink_log = (deployment.folder / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in superlink_log  # TLS
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.md"):
        assert (deployment.run_dir / name).is_file(), name
    assert (deployment.run_dir / "checkpoints" / "last.pt").is_file()
    summary = json.loads((deployment.run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["rounds_completed"] == 3
    trained = {(r["round"], r["site"]) for r in read_metrics(deployment.run_dir)
               if r["split"] == "train" and r.get("num_examples", 0) > 0}  # fmt: skip
    assert {(n, s) for n in (1, 2, 3) for s in ("hospital_a", "hospital_b")} <= trained


def test_unregistered_hospital_is_refused_and_the_refusal_is_logged(
    deployment: Deployment,
) -> None:
    intruder_log = (deployment.folder / "logs" / f"{INTRUDER}.log").read_text()
    assert "Failed to activate SuperNode" in intruder_log
    superlink_log = (deployment.folder / "logs" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log
    assert not deployment.intruder_alive, "the unregistered SuperNode is still running"
    sites = {r["site"] for r in read_metrics(deployment.run_dir)}
    assert INTRUDER not in sites
    assert sites == set(SITES)


def test_killed_hospital_does_not_end_the_run_and_rejoins_after_restart(
    deployment: Deployment,
) -> None:
    rows = read_metrics(deployment.run_dir)
    failures = [r for r in rows if r["round"] == 1 and r["split"] == "train" and "error" in r]
    assert [r["site"] for r in failures] == [KILLED]
    rejoined = [r for r in rows if r["round"] > 1 and r["split"] == "train" and r["site"] == KILLED]
    assert any(r.get("num_examples", 0) > 0 for r in rejoined), rows
    node_log = (deployment.folder / "logs" / f"{KILLED}.log").read_text()
    assert node_log.count("Starting Flower SuperNode") == 2


def test_a_hospitals_own_policy_refuses_a_run_without_dp_over_tls(
    deployment: Deployment,
) -> None:
    # first run: hospital_a trained privately, as its policy allows
    first = [r for r in read_metrics(deployment.run_dir)
             if r["site"] == POLICY_SITE and r["split"] == "train"]  # fmt: skip
    assert first and all(0 < r["epsilon_spent"] <= 8 for r in first)
    # second run: the coordinator asked for no DP; hospital_a refused, the others trained
    assert deployment.refused_outcome["status"] == "finished:completed"
    summary = json.loads((deployment.refused_run_dir / "summary.json").read_text())
    assert "requires it" in summary["refused_by_policy"][POLICY_SITE]
    rows = [r for r in read_metrics(deployment.refused_run_dir) if r["split"] == "train"]
    [refused] = [r for r in rows if r["site"] == POLICY_SITE]
    assert refused["status"] == "refused_by_policy" and refused["num_examples"] == 0
    assert f"{POLICY_SITE}.yaml" in refused["reason"]
    assert {r["site"] for r in rows if r.get("num_examples", 0) > 0} == {
        "hospital_b", "hospital_c"
    }  # fmt: skip
    node_log = (deployment.folder / "logs" / f"{POLICY_SITE}.log").read_text()
    node_log += "".join(p.read_text() for p in (deployment.folder / "logs").glob(
        f"{POLICY_SITE}.executor.log"))  # fmt: skip
    assert "refused to train" in node_log


def test_down_stops_every_process_it_started(deployment: Deployment) -> None:
    down = _federation(deployment.folder, "down")
    assert down.returncode == 0, down.stderr
    alive = [p for p in deployment.pids if _pid_alive(p)]
    assert alive == []
    for pid in deployment.pids:  # nor any of their process groups' members
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        raise AssertionError(f"process group {pid} still has members")
