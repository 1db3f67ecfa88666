"""Benchmark: a site's round time with its preprocessed cases cached on disk vs in memory.

``data.cache=memory`` re-reads and re-preprocesses every NIfTI file in every round
(the loaders are rebuilt per round); ``data.cache=disk`` (the default) keeps MONAI
``PersistentDataset`` files in the site's state folder. Prints JSON: for each mode,
the time to load every training and validation case once (cold = first round,
warm = later rounds) and the full train + evaluate round times.

    python scripts/bench_data_cache.py                          # hippocampus site B_float
    python scripts/bench_data_cache.py --experiment demo --site hospital_c
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fl_imaging.config import RunPlan, compose
from fl_imaging.data.loading import eval_loader, train_dataset
from fl_imaging.data.manifest import TRAIN, VAL
from fl_imaging.ml.models import new_model
from fl_imaging.site.resolve import Site, load_site_manifest, resolve_site
from fl_imaging.site.rounds import evaluate_round, train_round
from fl_imaging.site.state import cache_dir

ROOT = Path(__file__).resolve().parent.parent


def _load_all(site: Site, plan: RunPlan, split: str) -> float:
    """Seconds to build the split's dataset and read every case once."""
    cases = load_site_manifest(site, plan).split(split)
    started = time.perf_counter()
    folder = cache_dir(site, plan, split)
    if split == TRAIN:
        dataset = train_dataset(cases, plan.data, seed=0, cache_dir=folder)
        for i in range(len(dataset)):
            dataset[i]
    else:
        for _ in eval_loader(cases, plan.data, cache_dir=folder):
            pass
    return time.perf_counter() - started


def main() -> None:
    """Measure and print the JSON figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="hippocampus")
    parser.add_argument("--site", default="B_float")
    parser.add_argument("--rounds", type=int, default=2, help="full rounds per mode")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    state = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    results: dict[str, object] = {"experiment": args.experiment, "site": args.site}
    try:
        for mode in ("memory", "disk"):
            plan = compose(
                args.experiment,
                [
                    f"paths.root={ROOT}",
                    f"paths.state={state / mode}",
                    f"data.cache={mode}",
                    f"train.threads={args.threads}",
                ],
            )
            site = resolve_site({"site": args.site}, plan)
            manifest = load_site_manifest(site, plan)
            row: dict[str, object] = {
                "train_cases": len(manifest.split(TRAIN)),
                "val_cases": len(manifest.split(VAL)),
                "load_train_cold_s": _load_all(site, plan, TRAIN),
                "load_train_warm_s": _load_all(site, plan, TRAIN),
                "load_val_cold_s": _load_all(site, plan, VAL),
                "load_val_warm_s": _load_all(site, plan, VAL),
            }
            weights = new_model(plan).state_dict()
            rounds = []
            for r in range(1, args.rounds + 1):
                started = time.perf_counter()
                outcome = train_round(site, plan, weights, server_round=r, validate_data=False)
                trained = time.perf_counter()
                evaluate_round(site, plan, weights, validate_data=False)
                done = time.perf_counter()
                compute = outcome.result.seconds if outcome.result else float("nan")
                rounds.append(
                    {
                        "round": r,
                        "train_s": trained - started,
                        "train_loop_s": compute,
                        "evaluate_s": done - trained,
                    }
                )
            row["rounds"] = rounds
            results[mode] = row
            print(json.dumps({mode: row}), flush=True)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
