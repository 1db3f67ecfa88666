"""A real Flower deployment on this machine: one SuperLink and one SuperNode per hospital.

Every component is a separate process talking over loopback, exactly as on separate
machines: TLS on the SuperLink, SuperNode authentication (only registered hospital
keys may join), each SuperNode told who it is through ``--node-config``
(``site``, ``manifest``, ``data-root``, ``state-dir``: see ``fl_imaging/site/resolve.py``).
Everything lives in one folder (``--dir``, default ``deploy/local``)::

    certs/               CA, SuperLink certificate, per-hospital keys (make_certs.py)
    flwr_home/           FLWR_HOME of the `flwr` CLI: config.toml names the connection
    logs/<name>.log      one log per process (superlink, each hospital, each warm executor)
    state/<site>/        each hospital's state (privacy ledger, caches)
    deployment.json      ports and PIDs, so later commands find and stop what `up` started

Commands (all print what they do)::

    python scripts/deploy/federation.py up --sites hospital_a hospital_b hospital_c
    python scripts/deploy/federation.py run --experiment demo --overrides "rounds=3"
    python scripts/deploy/federation.py kill hospital_c      # crash one hospital (SIGKILL)
    python scripts/deploy/federation.py node hospital_c      # (re)start its SuperNode
    python scripts/deploy/federation.py pause hospital_b     # freeze it (SIGSTOP): cut off
    python scripts/deploy/federation.py unpause hospital_b   # thaw it: it rejoins
    python scripts/deploy/federation.py kill coordinator     # crash SuperLink + ServerApp
    python scripts/deploy/federation.py coordinator          # restart it on its database
    python scripts/deploy/federation.py run --overrides "rounds=3 resume=latest"
    python scripts/deploy/federation.py node intruder --unregistered  # a key never registered
    python scripts/deploy/federation.py down                 # stop everything, by PID

``run`` is ``flwr run . <connection>`` (on a staged copy of the app, ``fl_imaging.tools.bundle``)
with ``FLWR_HOME=<dir>/flwr_home``; it exits non-zero unless Flower reports the run
``finished:completed``.

``--isolation warm`` (the default) starts each SuperNode with ``--isolation process`` and
next to it a long-running executor (``warm_executor.py``) that has torch and MONAI imported
already and forks one ClientApp process per message; ``--isolation subprocess`` is Flower's
default (a fresh ``flwr-clientapp`` process per message, which imports everything again).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fl_imaging.tools.bundle import stage_app
from fl_imaging.tools.processes import (
    LaunchError,
    alive,
    any_left,
    flwr_run,
    kill_group,
    port_free,
    stop_processes,
)

# Only fl_imaging's light modules are imported (torch takes seconds): `kill` must be quick.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONNECTION = "fl-imaging-deployment"
STATE_FILE = "deployment.json"
COORDINATOR = "coordinator"  # `kill coordinator`: the SuperLink side, not a site


def log(msg: str) -> None:
    """Progress on stderr (stdout is kept for results)."""
    print(f"[deploy] {msg}", file=sys.stderr, flush=True)


def deploy_env(folder: Path) -> dict[str, str]:
    """Environment for every process: this venv first, offline runtime, the folder's FLWR_HOME."""
    env = os.environ.copy()
    env["FLWR_HOME"] = str(folder / "flwr_home")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def load_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    if not path.is_file():
        sys.exit(f"no deployment in {folder} (run `federation.py up --dir {folder}` first)")
    return json.loads(path.read_text())


def save_state(folder: Path, state: dict) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def _wait_port(port: int, pid: int, what: str, log_file: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            sys.exit(f"{what} exited; see {log_file}:\n{log_file.read_text()[-2000:]}")
        if not port_free(port):
            return
        time.sleep(0.2)
    sys.exit(f"{what} did not listen on port {port} within {timeout:.0f} s; see {log_file}")


def spawn(cmd: Sequence[str], log_file: Path, env: dict[str, str]) -> int:
    """Start ``cmd`` in its own session (so its children stop with it); return its PID."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log(f"$ {shlex.join(cmd)}  > {log_file}")
    with log_file.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=PROJECT_ROOT,
            start_new_session=True,
        )
    return proc.pid


def _tls_args(state: dict) -> list[str]:
    return [] if state["insecure"] else ["--root-certificates", state["certs"] + "/ca.crt"]


def write_connection(folder: Path, state: dict) -> None:
    """``$FLWR_HOME/config.toml`` naming this SuperLink (Flower 1.42 connections).

    It is the coordinator's connection: the SuperLink's own port (Control API), which
    the gateway does not expose.
    """
    home = folder / "flwr_home"
    home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "127.0.0.1:{control_port(state)}"',
    ]
    if state["insecure"]:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{state["certs"]}/ca.crt"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def start_superlink(folder: Path, state: dict, env: dict[str, str]) -> int:
    certs = state["certs"]
    cmd = ["flower-superlink", "--disable-runtime-dependency-installation"]
    if state["insecure"]:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", f"{certs}/ca.crt", *_serving_tls(certs)]
        if state["auth"]:
            cmd.append("--enable-supernode-auth")
    # with the gateway, the SuperLink itself (Fleet, Control, Runtime API) is on the
    # coordinator's loopback only; the hospitals reach the gateway
    port = control_port(state)
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--database", str(folder / "superlink.db")]
    log_file = folder / "logs" / "superlink.log"
    pid = spawn(cmd, log_file, env)
    _wait_port(port, pid, "flower-superlink", log_file)
    return pid


def _serving_tls(certs: str) -> list[str]:
    """The SuperLink's certificate and key: what the SuperLink and the gateway serve with."""
    return ["--ssl-certfile", f"{certs}/superlink.crt", "--ssl-keyfile", f"{certs}/superlink.key"]


def control_port(state: dict) -> int:
    """Where the SuperLink listens: its own port behind the gateway, else the public one."""
    return int(state.get("control_port") or state["port"])


def start_gateway(folder: Path, state: dict, env: dict[str, str]) -> int:
    """``fl-imaging gateway``: only the Fleet API on the public port, forwarded to the SuperLink."""
    certs = state["certs"]
    cmd = [
        sys.executable,
        "-m",
        "fl_imaging.tools.cli",
        "gateway",
        "--listen",
        f"127.0.0.1:{state['port']}",
        "--superlink",
        f"127.0.0.1:{control_port(state)}",
    ]
    if state["insecure"]:
        cmd.append("--insecure")
    else:
        cmd += [*_serving_tls(certs), "--root-certificates", f"{certs}/ca.crt"]
    log_file = folder / "logs" / "gateway.log"
    pid = spawn(cmd, log_file, env)
    _wait_port(state["port"], pid, "fl-imaging gateway", log_file)
    return pid


def register(site: str, state: dict, env: dict[str, str]) -> None:
    """``flwr supernode register <site>.pub``: the coordinator admits a hospital's key."""
    key = f"{state['certs']}/supernodes/{site}.pub"
    cmd = ["flwr", "supernode", "register", key, CONNECTION, "--name", site, "--format", "json"]
    log(f"$ {shlex.join(cmd)}")
    out = subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True)
    if "Public key already in use" in out.stdout:
        log(f"{site}'s key was registered before")
        return
    if out.returncode != 0 or '"success": true' not in out.stdout:
        sys.exit(f"could not register {site}: {out.stdout[-1000:]} {out.stderr[-1000:]}")


def fingerprint(site: str, state: dict) -> str:
    """The SHA-256 of ``site``'s registered public key (``federation.site_keys``)."""
    from fl_imaging.server.identity import file_fingerprint

    return file_fingerprint(Path(state["certs"]) / "supernodes" / f"{site}.pub")


def node_config(site: str, state: dict, folder: Path, claim: str | None = None) -> str:
    """The SuperNode's ``--node-config``: who it is and where its data and state are.

    ``claim``: the site the node says it is, when that is not ``site`` (an impostor).
    """
    items = {"site": claim or site, "state-dir": str(folder / "state" / site)}
    if state.get("data_dir"):
        root = Path(state["data_dir"]) / (claim or site)
        items["data-root"] = str(root)
        items["manifest"] = str(root / "dataset.json")
    policy = Path(state["policy_dir"]) / f"{site}.yaml" if state.get("policy_dir") else None
    if policy is not None and policy.is_file():  # the hospital's own privacy policy
        items["privacy-policy"] = str(policy)
    return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())


def start_node(
    site: str, folder: Path, state: dict, env: dict[str, str], port: int, claim: str | None = None
) -> int:
    """Spawn ``site``'s SuperNode; return its PID (see :func:`start_executor`)."""
    certs = state["certs"]
    isolation = "process" if state["isolation"] == "warm" else "subprocess"
    cmd = [
        "flower-supernode",
        "--superlink",
        f"127.0.0.1:{state['port']}",
        "--port",
        str(port),
        "--isolation",
        isolation,
        "--node-config",
        node_config(site, state, folder, claim),
        # ride out a coordinator restart, but give up (and exit) if the SuperLink stays
        # unreachable, rather than retry forever
        "--max-wait-time",
        f"{state.get('reconnect_for', 60):g}",
    ]
    if state["insecure"]:
        cmd.append("--insecure")
    else:
        cmd += _tls_args(state)
        if state["auth"]:
            cmd += ["--auth-supernode-private-key", f"{certs}/supernodes/{site}.key"]
    return spawn(cmd, folder / "logs" / f"{site}.log", env)


def start_executor(
    site: str, folder: Path, state: dict, env: dict[str, str], pid: int
) -> list[int]:
    """Wait for ``site``'s SuperNode (PID ``pid``); start its warm executor; return all PIDs."""
    port = state["nodes"][site]["port"]
    _wait_port(port, pid, f"flower-supernode {site}", folder / "logs" / f"{site}.log")
    if state["isolation"] != "warm":
        return [pid]
    executor = [
        sys.executable,
        str(HERE / "warm_executor.py"),
        "--runtime-api-address",
        f"127.0.0.1:{port}",
        "--parent-pid",
        str(pid),
        "--object-poll",
        str(state.get("object_poll", 0.05)),
    ]
    approved = Path(state["approved_dir"]) / f"{site}.txt" if state.get("approved_dir") else None
    if approved is not None and approved.is_file():  # the hospital pins its app bundles
        executor += ["--approved-bundles", str(approved)]
    return [pid, spawn(executor, folder / "logs" / f"{site}.executor.log", env)]


def cmd_up(args: argparse.Namespace) -> int:
    folder: Path = args.dir.resolve()
    if (folder / STATE_FILE).is_file() and any(
        alive(p) for p in _all_pids(json.loads((folder / STATE_FILE).read_text()))
    ):
        sys.exit(f"a deployment in {folder} is still running: `federation.py down --dir {folder}`")
    if COORDINATOR in args.sites:
        sys.exit(f"{COORDINATOR!r} names the coordinator in `kill`; call the site otherwise")
    folder.mkdir(parents=True, exist_ok=True)
    certs = (args.certs or folder / "certs").resolve()
    gateway = not args.no_gateway
    ports = [args.port + i for i in range(len(args.sites) + 1)]
    if gateway:
        ports.append(args.control_port or args.port + len(args.sites) + 1)
    busy = [p for p in ports if not port_free(p)]
    if busy:
        sys.exit(f"ports {busy} are in use; pick another --port")
    state = {
        "port": args.port,
        "insecure": args.insecure,
        "auth": not args.insecure and not args.no_auth,
        "certs": str(certs),
        "isolation": args.isolation,
        "object_poll": args.object_poll,
        "reconnect_for": args.reconnect_for,
        "data_dir": str(args.data_dir.resolve()) if args.data_dir else None,
        "policy_dir": str(args.policy_dir.resolve()) if args.policy_dir else None,
        "approved_dir": str(args.approved_dir.resolve()) if args.approved_dir else None,
        "next_port": args.port + 1,
        "control_port": ports[-1] if gateway else None,
        "superlink": None,
        "gateway": None,
        "site_keys": {},
        "nodes": {},
    }
    if not args.insecure:
        subprocess.run(
            [
                sys.executable,
                str(HERE / "make_certs.py"),
                "--out",
                str(certs),
                "--sites",
                *args.sites,
                *[a for h in args.host for a in ("--host", h)],
            ],
            check=True,
        )
    env = deploy_env(folder)
    write_connection(folder, state)
    state["superlink"] = start_superlink(folder, state, env)
    save_state(folder, state)
    if gateway:
        state["gateway"] = start_gateway(folder, state, env)
        save_state(folder, state)
    if state["auth"]:
        for site in args.sites:
            register(site, state, env)
            state["site_keys"][site] = fingerprint(site, state)
        save_state(folder, state)
    # start the SuperNodes side by side, then wait for each (each imports Flower: seconds)
    pids = {site: _spawn_node(site, folder, state, env) for site in args.sites}
    for site, pid in pids.items():
        state["nodes"][site]["pids"] = start_executor(site, folder, state, env, pid)
        save_state(folder, state)
    exposure = (
        f"gateway 127.0.0.1:{state['port']} (Fleet API only) -> SuperLink "
        f"127.0.0.1:{control_port(state)} (coordinator only)"
        if gateway
        else f"SuperLink 127.0.0.1:{state['port']} (all APIs)"
    )
    log(f"up: {exposure}, SuperNodes {list(state['nodes'])}")
    return 0


def _spawn_node(
    site: str, folder: Path, state: dict, env: dict[str, str], claim: str | None = None
) -> int:
    """Spawn ``site``'s SuperNode on its port (a new one, or the one it had); record it."""
    port = state["nodes"].get(site, {}).get("port")
    if port is None:  # the next port that is not the SuperLink's own
        while state["next_port"] == state.get("control_port"):
            state["next_port"] += 1
        port = state["next_port"]
        state["next_port"] += 1
    if not port_free(port):
        sys.exit(f"port {port} for {site} is in use")
    pid = start_node(site, folder, state, env, port, claim)
    state["nodes"][site] = {"port": port, "pids": [pid]}
    save_state(folder, state)
    return pid


def cmd_node(args: argparse.Namespace) -> int:
    folder: Path = args.dir.resolve()
    state = load_state(folder)
    env = deploy_env(folder)
    old = state["nodes"].get(args.site)
    if old and any(alive(p) for p in old["pids"]):
        sys.exit(f"{args.site} is running (pids {old['pids']}); `kill` it first")
    if args.unregistered or args.claim:  # a key of its own (make_certs keeps existing ones)
        subprocess.run(
            [
                sys.executable,
                str(HERE / "make_certs.py"),
                "--out",
                state["certs"],
                "--sites",
                args.site,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    if args.unregistered:
        # a hospital whose key the coordinator never registered: the SuperLink must refuse it,
        # and its SuperNode exits (so nothing waits for it to listen)
        _spawn_node(args.site, folder, state, env)
        return 0
    # --claim: the audit's impostor, its own key registered (as an open Control API let
    # anyone do) and a node config naming another hospital
    if state["auth"] and not old:
        register(args.site, state, env)
    pid = _spawn_node(args.site, folder, state, env, args.claim)
    state["nodes"][args.site]["pids"] = start_executor(args.site, folder, state, env, pid)
    save_state(folder, state)
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    """SIGSTOP (``pause``) or SIGCONT (``unpause``) a hospital: a network cut, ``docker pause``.

    Its SuperNode, executor and ClientApp processes freeze: no heartbeat, no reply, no work.
    """
    folder: Path = args.dir.resolve()
    node = load_state(folder)["nodes"].get(args.site)
    if not node:
        sys.exit(f"no SuperNode {args.site} in {folder}")
    stop = args.command == "pause"
    kill_group(node["pids"], signal.SIGSTOP if stop else signal.SIGCONT)
    log(f"{'paused' if stop else 'unpaused'} {args.site} (pids {node['pids']})")
    return 0


def _coordinator_pids(state: dict) -> list[int]:
    return [state[k] for k in ("superlink", "gateway") if state.get(k)]


def cmd_kill(args: argparse.Namespace) -> int:
    """SIGKILL a hospital's SuperNode and its ClientApp processes: a crash, not a shutdown.

    ``coordinator``: the SuperLink with its ServerApp processes, and the gateway.
    """
    folder: Path = args.dir.resolve()
    state = load_state(folder)
    if args.site == COORDINATOR:
        pids = _coordinator_pids(state)
        kill_group(pids, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while any_left(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        if any_left(pids):
            sys.exit(f"the coordinator's processes {pids} did not stop")
        log(f"killed the coordinator (pids {pids}, with their process groups)")
        return 0
    node = state["nodes"].get(args.site)
    if not node:
        sys.exit(f"no SuperNode {args.site} in {folder}")
    kill_group(node["pids"], signal.SIGKILL)
    log(f"killed {args.site} (pids {node['pids']})")
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    """(Re)start the coordinator after a crash: the SuperLink on its database, the gateway.

    The SuperLink keeps its registered hospital keys and runs in ``superlink.db``; the
    hospitals' SuperNodes reconnect by themselves. A stopped run continues with
    ``run --overrides resume=latest``.
    """
    folder: Path = args.dir.resolve()
    state = load_state(folder)
    running = [p for p in _coordinator_pids(state) if alive(p)]
    if running:
        sys.exit(f"the coordinator is running (pids {running}); `kill coordinator` first")
    env = deploy_env(folder)
    state["superlink"] = start_superlink(folder, state, env)
    save_state(folder, state)
    if state.get("control_port"):
        state["gateway"] = start_gateway(folder, state, env)
        save_state(folder, state)
    log(f"coordinator restarted on {folder / 'superlink.db'}")
    return 0


def _all_pids(state: dict) -> list[int]:
    pids = [p for n in state.get("nodes", {}).values() for p in n["pids"]]
    return pids + _coordinator_pids(state)


def cmd_down(args: argparse.Namespace) -> int:
    folder: Path = args.dir.resolve()
    if not (folder / STATE_FILE).is_file():
        log(f"nothing to stop in {folder}")
        return 0
    state = load_state(folder)
    pids = _all_pids(state)
    stop_processes(pids)
    left = [p for p in pids if any_left([p])]
    log(f"stopped {len(pids) - len(left)} processes" + (f"; still alive: {left}" if left else ""))
    return 1 if left else 0


def cmd_run(args: argparse.Namespace) -> int:
    folder: Path = args.dir.resolve()
    env = deploy_env(folder)
    state = load_state(folder)
    from fl_imaging.config import run_config_string, with_root  # Hydra, no torch

    items = with_root(shlex.split(args.overrides), PROJECT_ROOT)  # config paths: this checkout
    if not args.no_site_keys:  # each hospital is the site its registered key belongs to
        items += [f"+federation.site_keys.{s}={fp}" for s, fp in state.get("site_keys", {}).items()]
    run_config = run_config_string(args.experiment, items)
    start = time.monotonic()
    # a staged copy of the app: flwr run would walk every file of the checkout (.venv too)
    with tempfile.TemporaryDirectory(prefix="fl-imaging-app-") as staging:
        app = stage_app(args.app.resolve(), Path(staging))
        log(f"flwr run {app} {CONNECTION} (FLWR_HOME={env['FLWR_HOME']}; staged {args.app})")
        log(f"run config: {run_config}")
        try:
            run_id, status = flwr_run(
                app, run_config, env, PROJECT_ROOT, sys.stderr.write, connection=CONNECTION
            )
        except LaunchError as exc:
            log(str(exc))
            return 1
    result = {"run_id": run_id, "status": status, "seconds": round(time.monotonic() - start, 1)}
    print(json.dumps(result))
    return 0 if status == "finished:completed" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=PROJECT_ROOT / "deploy" / "local")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the SuperLink and one SuperNode per site")
    up.add_argument("--sites", nargs="+", default=["hospital_a", "hospital_b", "hospital_c"])
    up.add_argument(
        "--data-dir",
        type=Path,
        default=PROJECT_ROOT / "data" / "synthetic",
        help="<data-dir>/<site>/dataset.json is each site's manifest (default: the demo's)",
    )
    up.add_argument(
        "--policy-dir",
        type=Path,
        help="<policy-dir>/<site>.yaml, where present, is that hospital's privacy policy "
        "(passed as --node-config privacy-policy=...)",
    )
    up.add_argument(
        "--approved-dir",
        type=Path,
        help="<approved-dir>/<site>.txt, where present, lists the app bundles that hospital "
        "accepts (its warm executor refuses any other)",
    )
    up.add_argument(
        "--port", type=int, default=9300, help="the hospitals' port; SuperNodes use +1.."
    )
    up.add_argument(
        "--control-port",
        type=int,
        help="the SuperLink's own port behind the gateway (default: after the SuperNodes')",
    )
    up.add_argument(
        "--no-gateway",
        action="store_true",
        help="the SuperLink itself on --port: every API, Control included, open to all",
    )
    up.add_argument("--certs", type=Path, help="certificate folder (default: <dir>/certs)")
    up.add_argument("--host", action="append", default=[], help="extra SuperLink cert name")
    up.add_argument("--isolation", choices=["warm", "subprocess"], default="warm")
    up.add_argument(
        "--object-poll",
        type=float,
        default=0.05,
        help="warm executor: first retry (s) for message objects; 0: Flower's default (1 s)",
    )
    up.add_argument(
        "--reconnect-for",
        type=float,
        default=600,
        help="seconds a SuperNode keeps reconnecting to an unreachable SuperLink (e.g. while "
        "the coordinator restarts) before it exits",
    )
    up.add_argument("--insecure", action="store_true", help="no TLS, no authentication")
    up.add_argument("--no-auth", action="store_true", help="TLS without SuperNode auth")
    node = sub.add_parser("node", help="start (or restart) one site's SuperNode")
    node.add_argument("site")
    node.add_argument("--unregistered", action="store_true", help="with a key never registered")
    node.add_argument(
        "--claim", metavar="SITE", help="a node with its own registered key that says it is SITE"
    )
    kill = sub.add_parser("kill", help="SIGKILL one site's SuperNode, or the coordinator")
    kill.add_argument("site", help=f"a site, or {COORDINATOR!r} (SuperLink, ServerApp, gateway)")
    sub.add_parser("coordinator", help="restart the coordinator after `kill coordinator`")
    for name, what in (("pause", "freeze (SIGSTOP)"), ("unpause", "thaw (SIGCONT)")):
        sub.add_parser(name, help=f"{what} one site's processes").add_argument("site")
    sub.add_parser("down", help="stop everything this deployment started")
    run = sub.add_parser("run", help="flwr run . on this deployment; wait; check the status")
    run.add_argument("--experiment", default="demo")
    run.add_argument("--overrides", default="", help='Hydra overrides, e.g. "rounds=2"')
    run.add_argument("--app", type=Path, default=PROJECT_ROOT, help="the app folder to submit")
    run.add_argument(
        "--no-site-keys",
        action="store_true",
        help="do not bind sites to their registered keys (a site is what its node declares)",
    )
    args = parser.parse_args(argv)
    handlers = {
        "up": cmd_up,
        "node": cmd_node,
        "kill": cmd_kill,
        "coordinator": cmd_coordinator,
        "pause": cmd_pause,
        "unpause": cmd_pause,
        "down": cmd_down,
        "run": cmd_run,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
