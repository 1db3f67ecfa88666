"""Deployment on loopback: a SuperLink behind its Fleet-only gateway, one SuperNode per
hospital, TLS and node auth.

One deployment (scripts/deploy/federation.py) serves every test here, because each
start costs tens of seconds: three registered hospitals, one hospital whose key was
never registered, and an impostor with a registered key of its own that says it is
hospital_a; one registered hospital is killed (SIGKILL) as round 1 starts and restarted
once the server has recorded its failure. The run must still complete, with the
restarted hospital back in a later round. hospital_b pins its app bundles: a third run
with a modified bundle is refused there before any of it is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fl_imaging.outputs.reporting import read_metrics
from fl_imaging.site.audit import read_audit
from fl_imaging.tools.bundle import bundle_hash, fab_bytes, stage_app
from fl_imaging.tools.processes import free_port_range
from tests.conftest import REPO_ROOT, tiny_overrides

pytestmark = pytest.mark.e2e

FEDERATION = REPO_ROOT / "scripts" / "deploy" / "federation.py"
SITES = ["hospital_a", "hospital_b", "hospital_c"]
KILLED = "hospital_c"
INTRUDER = "intruder"
IMPOSTOR = "impostor"  # registered key of its own, claims to be hospital_a
PINNED = "hospital_b"  # runs only the bundles it approved


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
    # a third run with a modified app bundle (hospital_b has not approved it)
    modified_outcome: dict
    modified_run_dir: Path
    modified_hash: str
    # what an outsider holding only ca.crt got from the hospitals' port: command -> output
    outsider: dict[str, subprocess.CompletedProcess]


def _free_base_port(count: int) -> int:
    return free_port_range(count, 29400, 29900)


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


def _outsider_calls(folder: Path, port: int) -> dict[str, subprocess.CompletedProcess]:
    """``flwr`` commands of someone who holds only ``ca.crt`` and reaches the hospitals' port."""
    home = folder / "outsider"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "target"\n\n[superlink.target]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{folder}/certs/ca.crt"\n'
    )
    attacker = folder / "certs" / "supernodes" / f"{INTRUDER}.pub"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1"}
    flwr = str(Path(sys.executable).parent / "flwr")
    app = folder / "modified-app"
    commands = {
        "register": [flwr, "supernode", "register", str(attacker), "target", "--format", "json"],
        "list nodes": [flwr, "supernode", "list", "target", "--format", "json"],
        "list runs": [flwr, "list", "target", "--format", "json"],
        "run": [flwr, "run", str(app), "target", "--format", "json"],
    }
    return {
        name: subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=120, check=False, cwd=folder
        )
        for name, cmd in commands.items()
    }


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
    port = _free_base_port(len(SITES) + 4)  # + gateway, SuperLink, intruder, impostor
    policies = folder / "policies"
    policies.mkdir()
    (policies / f"{POLICY_SITE}.yaml").write_text(POLICY)
    approved = folder / "approved"  # hospital_b reviewed this checkout and approved it
    approve = subprocess.run(
        [
            sys.executable,
            "-m",
            "fl_imaging.tools.cli",
            "site",
            "approve",
            str(REPO_ROOT),
            "--to",
            str(approved / f"{PINNED}.txt"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert approve.returncode == 0, approve.stderr
    up = _federation(
        folder,
        "up",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--policy-dir",
        str(policies),
        "--approved-dir",
        str(approved),
        "--sites",
        *SITES,
    )
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        intruder = _federation(folder, "node", INTRUDER, "--unregistered")
        assert intruder.returncode == 0, intruder.stderr[-3000:]
        impostor = _federation(folder, "node", IMPOSTOR, "--claim", "hospital_a")
        assert impostor.returncode == 0, impostor.stderr[-3000:]
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
            stderr=run_log,
            text=True,
        )
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
        second = _federation(
            folder,
            "run",
            "--overrides",
            " ".join([*plain, "rounds=1", f"paths.outputs={refused_outputs}"]),
            timeout=300,
        )
        assert second.returncode == 0, second.stderr[-4000:]
        refused_outcome = json.loads(second.stdout.strip().splitlines()[-1])
        # the coordinator submits a modified bundle: hospital_b has not approved it
        modified_app = stage_app(REPO_ROOT, folder / "modified-app")
        with (modified_app / "fl_imaging" / "apps" / "client_app.py").open("a") as source:
            source.write("\n# changed by the coordinator after the hospitals' review\n")
        modified_outputs = folder / "outputs-modified"
        third = _federation(
            folder,
            "run",
            "--app",
            str(modified_app),
            "--overrides",
            " ".join(
                [
                    *[o for o in overrides if not o.startswith("paths.outputs")],
                    "rounds=1",
                    "strategy.min_sites=1",
                    "strategy.allow_site_failures=true",
                    f"paths.outputs={modified_outputs}",
                ]
            ),
            timeout=300,
        )
        assert third.returncode == 0, third.stderr[-4000:]
        modified_outcome = json.loads(third.stdout.strip().splitlines()[-1])
        outsider = _outsider_calls(folder, port)
        state = json.loads((folder / "deployment.json").read_text())
        pids = [p for n in state["nodes"].values() for p in n["pids"]]
        pids += [state["superlink"], state["gateway"]]
        intruder_alive = _pid_alive(state["nodes"][INTRUDER]["pids"][0])
        yield Deployment(
            folder,
            outcome,
            next(outputs.glob("*-demo")),
            intruder_alive,
            pids,
            refused_outcome,
            next(refused_outputs.glob("*-demo")),
            modified_outcome,
            next(modified_outputs.glob("*-demo")),
            bundle_hash(fab_bytes(modified_app)),
            outsider,
        )
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
    trained = {
        (r["round"], r["site"])
        for r in read_metrics(deployment.run_dir)
        if r["split"] == "train" and r.get("num_examples", 0) > 0
    }
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
    first = [
        r
        for r in read_metrics(deployment.run_dir)
        if r["site"] == POLICY_SITE and r["split"] == "train"
    ]
    assert first and all(0 < r["epsilon_spent"] <= 8 for r in first)
    # second run: the coordinator asked for no DP; hospital_a refused, the others trained
    assert deployment.refused_outcome["status"] == "finished:completed"
    summary = json.loads((deployment.refused_run_dir / "summary.json").read_text())
    assert "requires it" in summary["refused_by_policy"][POLICY_SITE]
    rows = [r for r in read_metrics(deployment.refused_run_dir) if r["split"] == "train"]
    [refused] = [r for r in rows if r["site"] == POLICY_SITE]
    assert refused["status"] == "refused_by_policy" and refused["num_examples"] == 0
    assert f"{POLICY_SITE}.yaml" in refused["reason"]
    assert {r["site"] for r in rows if r.get("num_examples", 0) > 0} == {"hospital_b", "hospital_c"}
    node_log = (deployment.folder / "logs" / f"{POLICY_SITE}.log").read_text()
    node_log += "".join(
        p.read_text() for p in (deployment.folder / "logs").glob(f"{POLICY_SITE}.executor.log")
    )
    assert "refused to train" in node_log


def test_an_impostor_with_a_registered_key_of_its_own_is_refused_and_never_trains(
    deployment: Deployment,
) -> None:
    summary = json.loads((deployment.run_dir / "summary.json").read_text())
    [refusal] = [r for r in summary["refused_nodes"] if r["claimed_site"] == "hospital_a"]
    assert "belongs to no site in federation.site_keys" in refusal["reason"]
    rows = read_metrics(deployment.run_dir)
    a_train = [r for r in rows if r["site"] == "hospital_a" and r["split"] == "train"]
    assert sorted(r["round"] for r in a_train) == [1, 2, 3]  # one hospital_a, not two
    run_log = (deployment.folder / "logs" / "run.log").read_text()
    assert f"REFUSED node {refusal['node']}" in run_log
    # each run asked it which site it is; it was never sent a model (its own audit log)
    sent = list(read_audit(deployment.folder / "state" / IMPOSTOR))
    assert sent and {e["message_type"] for e in sent} == {"query"}


def test_each_hospitals_audit_log_matches_the_bytes_the_server_received(
    deployment: Deployment,
) -> None:
    run_id = int(deployment.outcome["run_id"])
    received = [
        r for r in read_metrics(deployment.run_dir) if r["split"] == "train" and "error" not in r
    ]
    assert {r["site"] for r in received} == set(SITES)
    for site in SITES:
        logged = [
            (e["round"], e["bytes"])
            for e in read_audit(deployment.folder / "state" / site)
            if e["run_id"] == run_id and e["message_type"] == "train"
        ]
        server = [(r["round"], r["bytes_up"]) for r in received if r["site"] == site]
        # every reply the server got is in the log with its size (a reply cut off by the
        # SIGKILL may be logged and never have arrived)
        assert server and all(pair in logged for pair in server), (site, server, logged)


def test_an_outsider_with_only_the_ca_certificate_cannot_use_the_control_api(
    deployment: Deployment,
) -> None:
    for name, result in deployment.outsider.items():
        answer = json.loads(result.stdout)
        assert answer["success"] is False, (name, result.stdout)
        assert "403 Forbidden" in answer["error-message"], (name, result.stdout)
    gateway_log = (deployment.folder / "logs" / "gateway.log").read_text()
    for path in ("register-node", "list-nodes", "list-runs", "start-run"):
        assert f"refused POST /v1/control/{path}" in gateway_log
    superlink_log = (deployment.folder / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in superlink_log


def test_a_hospital_refuses_a_bundle_it_has_not_approved_before_any_of_it_runs(
    deployment: Deployment,
) -> None:
    assert deployment.modified_outcome["status"] == "finished:completed"
    summary = json.loads((deployment.modified_run_dir / "summary.json").read_text())
    assert summary["status"] == "finished_with_failures"
    reason = summary["failed_sites"][PINNED]
    assert f"app bundle sha256 {deployment.modified_hash} is not approved" in reason
    rows = [r for r in read_metrics(deployment.modified_run_dir) if r["split"] == "train"]
    trained = {r["site"] for r in rows if r.get("num_examples", 0) > 0}
    assert "hospital_c" in trained and PINNED not in trained
    executor_log = (deployment.folder / "logs" / f"{PINNED}.executor.log").read_text()
    assert executor_log.count("is approved") >= 1  # the reviewed bundle ran in runs 1 and 2
    assert "BundleNotApprovedError" in executor_log
    assert f"{deployment.modified_hash[:16]}... is approved" not in executor_log


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
