"""Hydra multirun sweeps: one federated ``flwr run`` per job, one summary for the sweep.

``fl-imaging sweep -m experiment=hippocampus strategy=fedavg,fedprox rounds=2``
composes ``conf/`` with Hydra (so sweeps use the same config as every run),
launches one simulation per job through :func:`fl_imaging.tools.launch.run_simulation`
(the same path ``flwr run .`` takes), puts each job's run folder inside the job's
Hydra folder, and at the end writes ``sweep_summary.csv`` (one row per job and
site) and ``sweep_summary.png``. A failed job is listed as failed; the others go on.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fl_imaging.config import conf_dir, register_schema, split_experiment
from fl_imaging.outputs.reporting import read_summary

logger = logging.getLogger(__name__)

JOB_RESULT = "job_result.json"
SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_PNG = "sweep_summary.png"
CSV_FIELDS = (
    "job",
    "overrides",
    "status",
    "site",
    "final_dice",
    "epsilon_spent",
    "rounds",
    "minutes",
    "run_dir",
    "error",
)


def run_job(cfg: DictConfig, project_root: Path) -> float:
    """Body of one Hydra job: launch its federated run, record the outcome.

    Returns the final mean Dice (NaN for a failed job): the metric a sweeper optimises.
    """
    from hydra.core.hydra_config import HydraConfig

    from fl_imaging.config import to_plan
    from fl_imaging.tools.launch import run_simulation

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    task = list(hydra_cfg.overrides.task)
    experiment, overrides = split_experiment(task)
    result: dict[str, Any] = {"job": hydra_cfg.job.num, "overrides": " ".join(task)}
    started = time.monotonic()
    try:
        # Hydra composed this job's config already: validate that same config here
        plan = to_plan(cfg)
        plan.paths.outputs, plan.paths.root = str(job_dir), str(project_root)
        outcome = run_simulation(
            experiment,
            [*overrides, f"paths.outputs={job_dir}", f"paths.root={project_root}"],
            project_root=project_root,
            plan=plan,
        )
        result.update(
            status=outcome.status,
            run_id=outcome.run_id,
            run_dir=str(outcome.run_dir) if outcome.run_dir else "",
        )
    except Exception as exc:  # a failed job is reported in the summary; the sweep goes on
        logger.error("job %s (%s) failed: %s", result["job"], result["overrides"], exc)
        result.update(status="failed", error=str(exc), run_dir="")
    result["minutes"] = (time.monotonic() - started) / 60
    tmp = job_dir / f".{JOB_RESULT}.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, job_dir / JOB_RESULT)
    summary = read_summary(Path(result["run_dir"])) if result["run_dir"] else {}
    value = summary.get("final_dice_mean")
    return float(value) if isinstance(value, int | float) else math.nan


def summary_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job and site from the jobs' results and run summaries."""
    rows: list[dict[str, Any]] = []
    results = sorted(
        sweep_dir.glob(f"*/{JOB_RESULT}"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else p.parent.name,
    )
    for path in results:
        job = json.loads(path.read_text())
        summary = read_summary(Path(job["run_dir"])) if job.get("run_dir") else {}
        status = job.get("status", "failed")
        if summary and summary.get("status") != "finished" and status.endswith("completed"):
            status = f"run {summary.get('status')}"
        base = {
            "job": job["job"],
            "overrides": job["overrides"],
            "status": status,
            "minutes": round(float(job.get("minutes", 0.0)), 2),
            "run_dir": job.get("run_dir", ""),
            "error": job.get("error") or summary.get("error", ""),
        }
        if not summary or not summary.get("final_dice_per_site"):
            rows.append(
                {
                    **base,
                    "site": "",
                    "final_dice": "",
                    "epsilon_spent": "",
                    "rounds": summary.get("rounds_completed", 0),
                }
            )
            continue
        spent = summary.get("epsilon_spent_per_site") or {}
        for site, dice in summary["final_dice_per_site"].items():
            rows.append(
                {
                    **base,
                    "site": site,
                    "final_dice": dice,
                    "epsilon_spent": spent.get(site, ""),
                    "rounds": summary.get("rounds_completed", 0),
                }
            )
    return rows


def write_summary(sweep_dir: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Write ``sweep_summary.csv`` and ``sweep_summary.png`` in ``sweep_dir``."""
    rows = summary_rows(sweep_dir)
    csv_path = sweep_dir / SUMMARY_CSV
    tmp = sweep_dir / f".{SUMMARY_CSV}.tmp"
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    _plot(rows, sweep_dir / SUMMARY_PNG)
    return csv_path, rows


def varying_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """For each job's override string, only the overrides whose value differs between jobs."""
    parsed = {
        ov: dict(item.split("=", 1) for item in ov.split() if "=" in item) for ov in overrides
    }
    keys = {k for d in parsed.values() for k in d}
    varying = {k for k in keys if len({d.get(k) for d in parsed.values()}) > 1}
    return {
        ov: " ".join(f"{k}={v}" for k, v in d.items() if k in varying) or ov
        for ov, d in parsed.items()
    }


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = sorted({(r["job"], r["overrides"]) for r in rows})
    sites = sorted({r["site"] for r in rows if r["site"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(jobs) + 2), 4), dpi=100)
    width = 0.8 / max(len(sites), 1)
    for i, site in enumerate(sites):
        values = [
            next((r["final_dice"] for r in rows if r["job"] == job and r["site"] == site), 0.0)
            for job, _ in jobs
        ]
        ax.bar(
            [j + i * width for j in range(len(jobs))],
            [v or 0.0 for v in values],
            width=width,
            label=site,
        )
    ax.set_xticks([j + width * (len(sites) - 1) / 2 for j in range(len(jobs))])
    short = varying_overrides([ov for _, ov in jobs])
    ax.set_xticklabels(
        [f"{job}: {short[ov]}"[:48] for job, ov in jobs], rotation=20, ha="right", fontsize=7
    )
    ax.set_ylabel("final validation Dice")
    ax.set_ylim(0, 1)
    if sites:
        ax.legend(fontsize=7)
    ax.set_title("sweep: final Dice per job and site (failed jobs: no bars)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sweep(argv: Sequence[str], project_root: Path) -> int:
    """Run a Hydra (multi)run with ``argv`` (e.g. ``["-m", "strategy=fedavg,fedprox"]``).

    Returns 0 when every job completed, 1 otherwise; prints where the summary is.
    """
    import hydra

    register_schema()
    args = list(argv)
    sweep_dir = project_root / "multirun" / time.strftime("%Y%m%d-%H%M%S")
    if not any(a.startswith("hydra.sweep.dir=") for a in args):
        args.append(f"hydra.sweep.dir={sweep_dir}")
    else:
        sweep_dir = Path(next(a for a in args if a.startswith("hydra.sweep.dir=")).split("=", 1)[1])
    args += ["hydra.job.chdir=false", f"hydra.run.dir={sweep_dir}/0"]

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def _job(cfg: DictConfig) -> float:
        return run_job(cfg, project_root)

    saved = sys.argv
    sys.argv = ["fl-imaging sweep", *args]
    try:
        _job()
    finally:
        sys.argv = saved
    csv_path, rows = write_summary(sweep_dir)
    print(f"sweep summary: {csv_path}")
    short = varying_overrides([r["overrides"] for r in rows])
    for row in rows:
        dice = f"dice {row['final_dice']:.3f}" if row["final_dice"] != "" else ""
        print(
            f"  job {row['job']} [{short[row['overrides']]}] {row['status']} {row['site']} "
            f"{dice} {row['error']}".rstrip()
        )
    return 0 if rows and all(r["status"] == "finished:completed" for r in rows) else 1
