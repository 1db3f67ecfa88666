"""Run this app with ``flwr run`` on a local simulation SuperLink, and clean up after.

``flwr run .`` on the ``local`` connection starts a detached SuperLink that
outlives the run and keeps the environment (PATH, venv, working directory) it
was started with. :func:`run_simulation` therefore

* sets ``FLWR_HOME`` to a project-local folder and disables Flower's per-run
  dependency installation (it needs the internet),
* sizes the simulation to the configured number of sites,
* passes the project root explicitly so relative paths resolve the same in every process,
* checks the run's final status (``flwr run --stream`` can exit 0 for a failed run),
* stops the SuperLink it started (by PID), so nothing keeps running afterwards,
* hands ``flwr run`` a staged copy of the app (:func:`fl_imaging.tools.bundle.stage_app`):
  Flower walks every file under the app folder before filtering, a virtual environment
  inside the project included (about 45,000 files, 2.5-4.5 s of ``flwr run`` here).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from fl_imaging.config import (
    ConfigError,
    RunPlan,
    compose,
    run_config_string,
    split_overrides,
    with_root,
)
from fl_imaging.ml.models import initial_weights
from fl_imaging.outputs.reporting import find_run
from fl_imaging.privacy.planning import plan_lines
from fl_imaging.privacy.requests import privacy_plans
from fl_imaging.server.strategies import strategy_problems
from fl_imaging.site.resolve import check_sites
from fl_imaging.tools.bundle import stage_app
from fl_imaging.tools.console import ConsoleFilter
from fl_imaging.tools.gpu_share import gpu_share
from fl_imaging.tools.processes import flwr_run, list_runs, stop_processes

logger = logging.getLogger(__name__)
# every line `flwr run --stream` printed, shown on the console or not (in the run folder)
CONSOLE_LOG = "console.log"

_SUPERLINK = "flower-superlink"
_SUPEREXEC = "flower-superexec"


@dataclass(frozen=True)
class RunOutcome:
    """What a launched run ended as."""

    run_id: str
    status: str  # e.g. "finished:completed", "finished:failed"
    run_dir: Path | None  # the run folder the ServerApp wrote for this run id
    seconds: float

    @property
    def ok(self) -> bool:
        """True when Flower reports the run completed."""
        return self.status == "finished:completed"


def outputs_problems(plan: RunPlan) -> list[str]:
    """Whether the run folder can be written, checked before any process starts.

    A read-only or missing outputs folder otherwise fails half a minute later, inside the
    ServerApp, with a bare ``OSError``.
    """
    outputs = plan.resolve_path(plan.paths.outputs)
    try:
        outputs.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=outputs, prefix=".write-check-"):
            pass
    except OSError as exc:
        return [
            f"paths.outputs={outputs} is not writable ({exc.strerror or exc}); choose "
            f"another folder or fix its permissions"
        ]
    return []


def flwr_env(project_root: Path) -> dict[str, str]:
    """Environment for ``flwr``: project-local FLWR_HOME, offline runtime, this venv first."""
    env = os.environ.copy()
    env.setdefault("FLWR_HOME", str(project_root / ".flwr"))
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # Ray merges similar lines of different sites into one "[repeated 2x across cluster]",
    # seconds later and out of order: each site's line should appear once, when it happens
    env.setdefault("RAY_DEDUP_LOGS", "0")
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def _processes() -> list[tuple[int, list[str]]]:
    procs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            procs.append((int(entry.name), raw.rstrip(b"\0").decode(errors="replace").split("\0")))
    return procs


def local_superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of the local simulation SuperLink that uses ``flwr_home`` and its SuperExec."""
    home = str(flwr_home)
    procs = _processes()
    links = [
        pid
        for pid, cmd in procs
        if any(_SUPERLINK in c for c in cmd[:2]) and any(home in c for c in cmd)
    ]
    execs = [
        pid
        for pid, cmd in procs
        if any(_SUPEREXEC in c for c in cmd[:2])
        and any(c == str(link) for link in links for c in cmd)
    ]
    return links + execs


def any_local_superlink() -> list[int]:
    """PIDs of every local SuperLink process on this machine (whatever its FLWR_HOME)."""
    return [pid for pid, cmd in _processes() if any(_SUPERLINK in c for c in cmd[:2])]


def _unfinished_runs(env: dict[str, str], cwd: Path, exclude: str) -> list[str]:
    return [
        str(r["run-id"])
        for r in list_runs(env, cwd)
        if str(r["run-id"]) != exclude and not str(r["status"]).startswith("finished")
    ]


def _report_here(run_dir: Path) -> None:
    """The report again, with overlays: in a simulation the scans are on this machine."""
    from fl_imaging.outputs.overlays import report_with_overlays

    try:
        logger.info("report with overlays: %s", report_with_overlays(run_dir))
    except Exception as exc:  # the report must not cost the run its results
        logger.warning("overlays skipped: %s", exc)


def run_simulation(
    experiment: str,
    overrides: Sequence[str] | str = (),
    *,
    project_root: Path,
    extra_flwr_args: Sequence[str] = (),
    stop_superlink: bool = True,
    plan: RunPlan | None = None,
    verbose: bool = False,
) -> RunOutcome:
    """Launch ``flwr run`` for ``experiment`` on a local simulation; wait; check the outcome.

    Args:
        experiment: a file name (without ``.yaml``) in ``conf/experiment/``.
        overrides: Hydra overrides (``["rounds=3", "train.lr=1e-3"]`` or one string).
        project_root: the app folder (holds ``pyproject.toml`` and ``conf/``); relative
            paths of the config resolve against it unless ``paths.root`` is overridden.
        extra_flwr_args: more arguments for ``flwr run``.
        plan: the plan ``experiment`` + ``overrides`` compose to, when the caller has
            composed it already (a Hydra sweep job cannot compose a second time).
        stop_superlink: stop the SuperLink afterwards if this call started it (a
            SuperLink that was already running is left alone).
        verbose: print every line of Flower's stream; by default known noise is left
            out (:mod:`fl_imaging.tools.console`). Every line goes to the run folder's
            ``console.log`` either way.

    Raises:
        ConfigError: the composed configuration is invalid (checked before launching).
        LaunchError: ``flwr run`` could not start the run
            (:func:`fl_imaging.tools.processes.flwr_run`).
    """
    project_root = project_root.resolve()
    items = with_root(split_overrides(overrides), project_root)
    if plan is None:
        plan = compose(experiment, items)
    preflight(plan)  # fail fast, before any process starts
    gpus_per_site = gpu_share(plan, experiment, items)  # auto: measured on the GPU first
    env = flwr_env(project_root)
    flwr_home = Path(env["FLWR_HOME"])
    _warn_foreign_superlink(flwr_home)
    already_running = set(local_superlink_pids(flwr_home))
    run_config = run_config_string(experiment, items)
    staging = Path(tempfile.mkdtemp(prefix="fl-imaging-app-"))
    # every line of the stream, until the run folder is known (then moved into it)
    handle, name = tempfile.mkstemp(prefix="fl-imaging-console-", suffix=".log")
    os.close(handle)  # reopened by name below
    console_log = Path(name)
    console = ConsoleFilter(verbose=verbose)
    start = time.monotonic()
    run_id = ""
    try:
        app = stage_app(project_root, staging)
        federation = [
            "--federation-config",
            _federation_config(plan, gpus_per_site),
            *extra_flwr_args,
        ]
        with console_log.open("w", encoding="utf-8") as raw:
            run_id, status = flwr_run(
                app, run_config, env, project_root, _show(raw, console), extra_args=federation
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if stop_superlink:
            _stop_started_superlink(flwr_home, already_running, env, project_root, run_id)
    run_dir = _keep_console(plan, run_id, console_log, console)
    return RunOutcome(run_id, status, run_dir, time.monotonic() - start)


def _keep_console(
    plan: RunPlan, run_id: str, console_log: Path, console: ConsoleFilter
) -> Path | None:
    """Move the stream's log into the run's own folder and say where; returns that folder.

    The folder is found by ``run_id`` (``outputs/latest`` moves only to a run that
    completed); None when the run wrote none, and the log stays where it is.
    """
    run_dir = find_run(plan.resolve_path(plan.paths.outputs), run_id)
    kept = console_log
    if run_dir is not None:
        kept = Path(shutil.move(console_log, run_dir / CONSOLE_LOG))
        _report_here(run_dir)
    if console.hidden:
        logger.info(
            "%d lines of Flower's stream not shown (--verbose shows them): %s", console.hidden, kept
        )
    return run_dir


def preflight(plan: RunPlan) -> RunPlan:
    """Check what a launch can check before any process starts; print the private sites' plan.

    Raises:
        ConfigError: a site's data, the strategy, the outputs folder or the initial
            checkpoint is not usable (every problem is listed).
    """
    problems = check_sites(plan) + strategy_problems(plan) + outputs_problems(plan)
    if plan.model.init_checkpoint:
        try:
            initial_weights(plan)  # fits the model? (else the server would fail later)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("the configured sites are not usable:\n  - " + "\n  - ".join(problems))
    plans = privacy_plans(plan)
    if plans:  # what each private site will run (fl-imaging privacy plan)
        logger.info("DP-SGD plan of the private sites (at their first round):")
        for line in plan_lines(plans):
            (logger.warning if line.startswith("warning:") else logger.info)("%s", line)
    return plan


def _federation_config(plan: RunPlan, gpus_per_site: float) -> str:
    """``--federation-config`` of the local simulation: how many sites, their resources.

    ``gpus_per_site``: each site's GPU share (:func:`fl_imaging.tools.gpu_share.gpu_share`).
    """
    sim = plan.federation.simulation
    return (
        f"num-supernodes={sim.num_supernodes or len(plan.federation.sites)} "
        f"client-resources-num-cpus={sim.num_cpus_per_site:g} "
        f"client-resources-num-gpus={gpus_per_site:g}"
    )


def _warn_foreign_superlink(flwr_home: Path) -> None:
    foreign = [p for p in any_local_superlink() if p not in local_superlink_pids(flwr_home)]
    if foreign:
        logger.warning(
            "a local SuperLink from another FLWR_HOME is running (pids %s) and will be used; "
            "it keeps the environment it was started with",
            foreign,
        )


def _show(raw: TextIO, console: ConsoleFilter) -> Callable[[str], None]:
    """Each line of the stream: into the console log, and to the terminal unless filtered."""

    def on_line(line: str) -> None:
        raw.write(line)
        shown = console.show(line)
        if shown is not None:
            sys.stdout.write(shown)
            sys.stdout.flush()

    return on_line


def _stop_started_superlink(
    flwr_home: Path, already_running: set[int], env: dict[str, str], cwd: Path, run_id: str
) -> None:
    """Stop what `flwr run` / `flwr list` started for ``flwr_home`` during this launch.

    Unless another run (e.g. a concurrent `fl-imaging run`) still uses it.
    """
    started = [p for p in local_superlink_pids(flwr_home) if p not in already_running]
    if not started:
        return
    others = _unfinished_runs(env, cwd, exclude=run_id)
    if others:
        logger.warning(
            "leaving the local SuperLink (pids %s) running: runs %s still use it", started, others
        )
    else:
        stop_processes(started)
