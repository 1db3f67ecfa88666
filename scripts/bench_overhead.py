"""Benchmark: this app's federated training throughput against a plain centralised loop.

Same model, same training cases (the sites' training cases, pooled for the
centralised loop), same number of passes, same threads:

* centralised: one process, ``fl_imaging.ml.training.train_local`` over the pooled
  cases for ``epochs`` epochs, cases cached in memory;
* federated: ``flwr run`` on the local simulation with ``rounds = epochs`` and one
  local epoch per round; one simulation worker with all threads, so the sites train
  one after another like the centralised loop does.

Reports training cases per second for both: the centralised loop's first epoch
(reads and preprocesses every file) apart from its later epochs, and the federated
run's start-up (``flwr run`` to the first training message) and first round apart
from its steady-state rounds. A round's train phase is send + the sites' training +
receive; the federated run evaluates in messages of their own
(``strategy.evaluate_in_train=false``) so that the train phase holds training only, and
its evaluation time is reported separately. Prints JSON.

    .venv/bin/python scripts/bench_overhead.py --experiment hippocampus --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fl_imaging.config import compose
from fl_imaging.data.loading import train_loader
from fl_imaging.data.manifest import TRAIN
from fl_imaging.ml.models import new_model
from fl_imaging.ml.training import LocalRecipe, train_local
from fl_imaging.outputs.reporting import read_summary
from fl_imaging.site.resolve import configured_sites, load_site_manifest
from fl_imaging.tools.launch import run_simulation

ROOT = Path(__file__).resolve().parent.parent


def centralised(experiment: str, overrides: list[str], epochs: int) -> dict[str, float]:
    """Epoch times of the plain loop over the pooled training cases."""
    plan = compose(experiment, overrides)
    torch.set_num_threads(plan.train.threads)
    cases = [
        c for site in configured_sites(plan) for c in load_site_manifest(site, plan).split(TRAIN)
    ]
    model = new_model(plan)
    optimizer = torch.optim.Adam(model.parameters(), lr=plan.train.lr)
    started = time.perf_counter()
    loader = train_loader(cases, plan.data, batch_size=plan.train.batch_size, seed=plan.seed)
    cached = time.perf_counter()
    seconds = []
    for _ in range(epochs):
        t = time.perf_counter()
        train_local(model, loader, LocalRecipe(epochs=1), optimizer=optimizer)
        seconds.append(time.perf_counter() - t)
    steady = statistics.median(seconds[1:]) if epochs > 1 else seconds[0]
    return {
        "cases": len(cases),
        "load_and_cache_s": round(cached - started, 2),
        "epoch_s": [round(s, 2) for s in seconds],
        "first_epoch_with_caching_s": round(cached - started + seconds[0], 2),
        "steady_epoch_s": round(steady, 2),
        "steady_cases_per_s": round(len(cases) / steady, 2),
    }


def federated(experiment: str, overrides: list[str], rounds: int, work: Path) -> dict[str, float]:
    """Round phases of the same training through ``flwr run``."""
    launched = time.time()
    outcome = run_simulation(
        experiment,
        [
            *overrides,
            f"rounds={rounds}",
            "train.local_epochs=1",
            "strategy.cross_site_epochs=0",
            # evaluation as its own message: the train phase then holds training only
            "strategy.evaluate_in_train=false",
            f"paths.outputs={work / 'outputs'}",
            f"paths.state={work / 'state'}",
        ],
        project_root=ROOT,
    )
    if not outcome.ok or outcome.run_dir is None:
        raise SystemExit(f"federated run ended {outcome.status}")
    summary = read_summary(outcome.run_dir)
    phases = summary["round_seconds"]
    plan = compose(experiment, overrides)
    cases = sum(len(load_site_manifest(s, plan).split(TRAIN)) for s in configured_sites(plan))
    train = [phases[str(r)]["train"] for r in range(1, rounds + 1)]
    steady = statistics.median(train[1:]) if rounds > 1 else train[0]
    return {
        "cases": cases,
        "startup_s": round(float(summary["first_train_sent_at"]) - launched, 2),
        "train_s": [round(t, 2) for t in train],
        "aggregate_s": [round(phases[str(r)]["aggregate"], 2) for r in range(1, rounds + 1)],
        "round0_evaluate_s": round(phases["0"]["evaluate"], 2),
        "evaluate_s": [round(phases[str(r)]["evaluate"], 2) for r in range(1, rounds + 1)],
        "steady_train_s": round(steady, 2),
        "steady_cases_per_s": round(cases / steady, 2),
        "total_s": round(outcome.seconds, 2),
        "final_dice_mean": round(summary["final_dice_mean"], 3),
    }


def main() -> None:
    """Run both and print the JSON figures with their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="hippocampus")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    os.environ.setdefault("FLWR_HOME", str(work / ".flwr"))
    overrides = [
        f"paths.root={ROOT}",
        f"train.threads={args.threads}",
        f"federation.simulation.num_cpus_per_site={args.threads}",
        *args.overrides,
    ]
    central = centralised(args.experiment, overrides, args.epochs)
    print(json.dumps({"centralised": central}), flush=True)
    fed = federated(args.experiment, overrides, args.epochs, work)
    result = {
        "experiment": args.experiment,
        "epochs": args.epochs,
        "threads": args.threads,
        "centralised": central,
        "federated": fed,
        "steady_throughput_ratio": round(
            fed["steady_cases_per_s"] / central["steady_cases_per_s"], 3
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
