"""Benchmark a SecAgg+ training round against a plain FedAvg round on the same sites.

Runs the same experiment twice with ``flwr run`` on a local simulation (each run in
this order: plain, then ``secure_aggregation=secaggplus``), with norm screening and
cross-site evaluation off in both (secure aggregation turns them off), and reads each
run's ``summary.json``:

* ``train_seconds``: wall-clock seconds of each round's training step, from sending the
  global model to holding the aggregate (``round_seconds[r].train``): plain FedAvg is
  one message exchange, SecAgg+ four (setup, share keys, masked vectors, unmask);
* ``aggregate_seconds``: decoding, screening and the strategy's aggregation;
* ``bytes_up_per_round`` / ``bytes_down_per_round``: what the training and evaluation
  messages of a round carried (``bytes_per_round``; for SecAgg+ this counts the
  masked-vector stage, not the small key-exchange messages);
* ``final_dice_mean``: the global model's mean validation Dice after the last round;
* ``secaggplus_stage_seconds``: per round, the seconds of each SecAgg+ stage's message
  exchange and of the whole protocol (from the ServerApp's log).

The first round of each run includes the sites' one-time data checks and caching, so
``train_seconds_after_first`` is the steadier comparison. Timings depend on what else
runs on the machine; the JSON records the load average before and after.

Output: one JSON document on stdout (the ``flwr run`` logs go to stderr).

Run (from the repository root; about 3-5 minutes on 2 idle CPU cores)::

    .venv/bin/python scripts/bench_secure_aggregation.py --experiment demo --rounds 3

Options: ``--experiment hippocampus``, more Hydra overrides as positional arguments,
``--port-base 39191`` (the local SuperLink's ports: base and base + 2, away from
Flower's defaults so other local runs are not disturbed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "plain": ["strategy.screen_norm_factor=null", "strategy.cross_site_epochs=0"],
    "secaggplus": ["secure_aggregation=secaggplus"],
}


def _run(experiment: str, overrides: list[str], outputs: Path) -> dict[str, Any]:
    from fl_imaging.outputs.reporting import read_summary
    from fl_imaging.tools.launch import run_simulation

    started = time.monotonic()
    log = _Tee()
    with contextlib.redirect_stdout(log):  # flwr's log stream to stderr; stdout is the JSON
        outcome = run_simulation(
            experiment, [*overrides, f"paths.outputs={outputs}"], project_root=REPO_ROOT
        )
    wall = time.monotonic() - started
    if not outcome.ok or outcome.run_dir is None:
        raise SystemExit(f"run failed ({outcome.status}): {overrides}")
    summary = read_summary(outcome.run_dir)
    rounds = {int(r): v for r, v in summary["round_seconds"].items() if int(r) > 0}
    train = [rounds[r]["train"] for r in sorted(rounds)]
    return {
        "run_dir": str(outcome.run_dir),
        "wall_seconds": round(wall, 1),
        "train_seconds": [round(t, 2) for t in train],
        "train_seconds_after_first": round(statistics.mean(train[1:]), 2) if train[1:] else None,
        "aggregate_seconds": [round(rounds[r]["aggregate"], 3) for r in sorted(rounds)],
        "evaluate_seconds": [round(rounds[r]["evaluate"], 2) for r in sorted(rounds)],
        "bytes_up_per_round": {r: v["up"] for r, v in summary["bytes_per_round"].items()},
        "bytes_down_per_round": {r: v["down"] for r, v in summary["bytes_per_round"].items()},
        "final_dice_mean": summary["final_dice_mean"],
        # SecAgg+ only: the ServerApp's log line per round (each stage's exchange, total)
        "secaggplus_stage_seconds": {
            int(r): {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)", stages)}
            for r, stages in re.findall(r"round (\d+): SecAgg\+ seconds: ([^\n]*)", log.text)
        },
    }


class _Tee(io.TextIOBase):
    """Writes through to stderr and keeps the text."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return sys.stderr.write(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port-base", type=int, default=39191)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for both runs")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-secagg-"))
    # a SuperLink of this benchmark's own (FLWR_HOME, ports): other local runs are untouched
    os.environ["FLWR_HOME"] = str(work / ".flwr")
    os.environ["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(args.port_base)
    os.environ["FLWR_LOCAL_CONTROL_API_PORT"] = str(args.port_base + 2)
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    common = [f"rounds={args.rounds}", *args.overrides]
    load_before = os.getloadavg()
    results = {
        mode: _run(args.experiment, [*common, *extra], work / mode) for mode, extra in MODES.items()
    }
    plain, secure = results["plain"]["train_seconds"], results["secaggplus"]["train_seconds"]
    report = {
        "experiment": args.experiment,
        "overrides": common,
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "runs": results,
        "train_seconds_ratio": round(statistics.mean(secure) / statistics.mean(plain), 2),
    }
    if results["plain"]["train_seconds_after_first"]:
        report["train_seconds_ratio_after_first"] = round(
            results["secaggplus"]["train_seconds_after_first"]
            / results["plain"]["train_seconds_after_first"],
            2,
        )
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
