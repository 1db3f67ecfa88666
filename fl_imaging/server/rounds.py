"""The server's side of a run: compose the plan, open the run folder, run the rounds.

:func:`serve` is what the Flower ``ServerApp`` (:mod:`fl_imaging.apps.server_app`) runs;
:func:`run_federation` runs the rounds of :class:`~fl_imaging.server.loop.RoundLoop`.
Every exit leaves a status in ``summary.json`` (finished, finished_with_failures,
failed, crashed) and a report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid

from fl_imaging.config import RunPlan, compose, plan_to_yaml
from fl_imaging.logs import setup_logging
from fl_imaging.outputs.overlays import legend
from fl_imaging.outputs.reporting import (
    METRICS_FILE,
    RunFolder,
    last_started_run,
    read_summary,
    write_report,
)
from fl_imaging.protocol import RunConfigKey
from fl_imaging.server.grid import FederationError, PromptGrid
from fl_imaging.server.loop import RoundLoop
from fl_imaging.server.resume import ResumeState, load_resume_state

logger = logging.getLogger("fl_imaging.server")

__all__ = [
    "FederationError",
    "ResumeState",
    "SiteFailureError",
    "load_resume_state",
    "run_federation",
    "serve",
]


class SiteFailureError(RuntimeError):
    """Sites failed and did not recover (the run's results are kept; it counts as failed)."""


def run_federation(
    grid: Grid,
    plan: RunPlan,
    run: RunFolder,
    run_id: int,
    resume: ResumeState | None = None,
    node_sites: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Train up to ``plan.rounds`` rounds; write metrics, checkpoints and summary into ``run``.

    With ``resume``, continue after its last completed round: rows of a round that was
    cut short are dropped from ``metrics.jsonl`` and that round runs again, so every
    completed round appears exactly once. ``node_sites`` (node id -> site name) are the
    sites already identified; the other connected nodes are asked. Returns the summary.
    """
    loop = RoundLoop(grid, plan, run, run_id, node_sites)
    if resume is not None:
        loop.resume(resume)
    for server_round in loop.rounds():
        loop.run_round(server_round)
    return loop.finish()


def serve(grid: Grid, context: Context, node_sites: Mapping[int, str] | None = None) -> None:
    """Compose the run plan from the run config and run the federation (the ServerApp's main).

    ``node_sites``: sites that have already named themselves (node id -> site name).

    Raises:
        SiteFailureError: sites failed and did not recover (without
            ``strategy.allow_site_failures``); the run folder keeps the results.
    """
    setup_logging()
    plan = compose(
        str(context.run_config.get(RunConfigKey.EXPERIMENT, "")),
        str(context.run_config.get(RunConfigKey.OVERRIDES, "")),
    )
    run, resume = _open_run(plan)
    logger.info("run folder: %s", run.path)
    try:
        summary = run_federation(PromptGrid(grid), plan, run, context.run_id, resume, node_sites)
    except BaseException as exc:  # every exit path leaves a status: failed, or crashed
        _record_exit(run, exc)
        raise
    finally:
        run.close()
        if (run.path / METRICS_FILE).is_file():
            _write_report(run, plan)
    failed = _log_outcome(summary, run)
    if failed and not plan.strategy.allow_site_failures:
        raise SiteFailureError(
            f"{len(failed)} site(s) failed and did not recover: {failed}. The run folder "
            f"{run.path} keeps the results (outputs/latest was not moved). Fix the site, or "
            f"accept partial runs with strategy.allow_site_failures=true"
        )


def _open_run(plan: RunPlan) -> tuple[RunFolder, ResumeState | None]:
    """A new run folder, or (``resume``) the one to continue and where it stopped."""
    outputs = plan.resolve_path(plan.paths.outputs)
    if not plan.resume:
        return RunFolder.create(outputs, plan.name, plan_to_yaml(plan)), None
    # latest: the most recently active run folder (a failed run is not outputs/latest)
    target = (
        last_started_run(outputs) if plan.resume == "latest" else plan.resolve_path(plan.resume)
    )
    run = RunFolder.reopen(target.resolve())
    return run, load_resume_state(run, plan)


def _record_exit(run: RunFolder, exc: BaseException) -> None:
    """``summary.json`` says the run failed (an exception) or crashed (e.g. interrupted)."""
    status = "failed" if isinstance(exc, Exception) else "crashed"
    error = str(exc) or type(exc).__name__
    logger.error("run %s: %s", status, error)
    try:
        run.write_summary({**read_summary(run.path), "status": status, "error": error})
    except OSError as write_error:
        logger.error("could not record the %s status: %s", status, write_error)


def _log_outcome(summary: Mapping[str, Any], run: RunFolder) -> dict[str, str]:
    """The run's last console lines (refusals, failed sites, final Dice); the failed sites."""
    for site, reason in summary.get("refused_by_policy", {}).items():
        logger.warning(
            "site %s did not train: its own privacy policy refused the run: %s", site, reason
        )
    failed = summary.get("failed_sites", {})
    for site, reason in failed.items():
        logger.error(
            "site %s FAILED: %s (the traceback is in the site's log and its "
            "state folder's site_errors.log)",
            site,
            reason,
        )
    logger.log(
        logging.ERROR if failed else logging.INFO,
        "%s %d rounds in %.1f min: final mean Dice %.3f %s; results in %s",
        f"FINISHED WITH {len(failed)} FAILED SITE(S):" if failed else "finished",
        summary["rounds_completed"],
        summary["minutes"],
        summary["final_dice_mean"],
        {k: round(v, 3) for k, v in summary["final_dice_per_site"].items()},
        run.path,
    )
    return failed


# the server never opens a scan: overlays are drawn where the scans are
OVERLAY_NOTE = (
    "Overlays need the scans, which stay at the sites: `fl-imaging report RUN` run at a "
    "hospital draws its own (`fl-imaging run` does so for a local simulation)."
)


def _write_report(run: RunFolder, plan: RunPlan) -> None:
    path = write_report(run.path, {}, OVERLAY_NOTE, legend(dict(plan.data.labels)))
    logger.info("report: %s", path)
