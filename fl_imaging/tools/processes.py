"""Processes the tools start: `flwr run` streams, run status, and stopping what was started.

Shared by the simulation launcher (:mod:`fl_imaging.tools.launch`) and the deployment
script (``scripts/deploy/federation.py``). Standard library only: the deployment
script's ``kill`` and ``down`` must not wait for torch to import.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# what `flwr run` prints once the SuperLink accepted the run
RUN_ID = re.compile(r"Successfully started run (\d+)")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port``."""
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def free_port_range(count: int, low: int = 29400, high: int = 29900) -> int:
    """A base port with ``count`` free ports after it, between ``low`` and ``high``.

    The bases are tried in random order, so two sessions on one machine rarely probe the
    same ports. Raises RuntimeError when there is none.
    """
    for base in random.sample(range(low, high - count, 20), k=min(25, (high - count - low) // 20)):
        if all(port_free(port) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} free loopback ports in {low}-{high}")


def alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def kill_group(pids: Sequence[int], sig: int) -> None:
    """Send ``sig`` to each process and to its process group (its children started with it)."""
    for pid in pids:
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, sig)


def any_left(pids: Sequence[int]) -> bool:
    """True while a process, or a member of its process group (e.g. a ClientApp), lives."""
    for pid in pids:
        if alive(pid):
            return True
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        return True
    return False


def stop_processes(pids: Sequence[int], timeout: float = 15.0) -> None:
    """SIGTERM ``pids`` and their process groups; SIGKILL what is left after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        kill_group(pids, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any_left(pids):
            time.sleep(0.2)
        if not any_left(pids):
            return


def stream_flwr_run(
    cmd: Sequence[str], env: dict[str, str], cwd: Path, on_line: Callable[[str], None]
) -> tuple[str, int]:
    """Run ``flwr run ... --stream``, handing each output line to ``on_line``.

    Returns ``(run_id, exit code)``; the run id is empty when Flower never started a run.
    """
    run_id = ""
    with subprocess.Popen(
        list(cmd),
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        for line in proc.stdout or ():
            on_line(line)
            if not run_id and (match := RUN_ID.search(line)):
                run_id = match.group(1)
        code = proc.wait()
    return run_id, code


class LaunchError(RuntimeError):
    """``flwr run`` did not start a run."""


def flwr_run(
    app: Path,
    run_config: str,
    env: dict[str, str],
    cwd: Path,
    on_line: Callable[[str], None],
    *,
    connection: str | None = None,
    extra_args: Sequence[str] = (),
) -> tuple[str, str]:
    """``flwr run APP [CONNECTION] --stream --run-config RUN_CONFIG``: its run id and final status.

    Every line of the stream goes to ``on_line``. The status is Flower's once it says the
    run finished (``finished:completed``, ``finished:failed``, ...); ``flwr run --stream``
    can exit 0 for a failed run, so callers check the status, not the exit code. Used by
    ``fl-imaging run`` and its sweeps (local simulation) and by the deployment script.

    Raises:
        LaunchError: Flower never started a run (the exit code is in the message).
    """
    cmd = [
        "flwr",
        "run",
        str(app),
        *([connection] if connection else []),
        "--stream",
        "--run-config",
        run_config,
        *extra_args,
    ]
    logger.info("$ %s", shlex.join(cmd))
    run_id, code = stream_flwr_run(cmd, env, cwd, on_line)
    if not run_id:
        raise LaunchError(f"`flwr run` exited with code {code} before starting a run")
    return run_id, final_status(run_id, env, cwd, connection)


def list_runs(env: dict[str, str], cwd: Path, connection: str | None = None) -> list[dict]:
    """The SuperLink's runs (``flwr list [connection] --format json``); empty if it cannot tell."""
    cmd = ["flwr", "list", *([connection] if connection else []), "--format", "json"]
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    try:
        return list(json.loads(out.stdout)["runs"])
    except (ValueError, KeyError, TypeError):
        logger.warning("`flwr list` gave no run list: %s %s", out.stdout[-200:], out.stderr[-200:])
        return []


def run_status(run_id: str, env: dict[str, str], cwd: Path, connection: str | None = None) -> str:
    """Flower's status string for ``run_id`` (e.g. ``finished:completed``; else ``unknown``)."""
    for run in list_runs(env, cwd, connection):
        if str(run["run-id"]) == run_id:
            return str(run["status"])
    return "unknown"


def final_status(
    run_id: str, env: dict[str, str], cwd: Path, connection: str | None = None, tries: int = 50
) -> str:
    """The run's status once Flower reports it finished (it can lag the end of the stream)."""
    status = run_status(run_id, env, cwd, connection)
    for _ in range(tries):
        if status.startswith("finished"):
            break
        time.sleep(0.2)
        status = run_status(run_id, env, cwd, connection)
    return status
