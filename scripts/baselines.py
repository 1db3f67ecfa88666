"""Non-federated baselines at the same compute as a federated run: local-only and centralised.

For the configured experiment (default ``hippocampus``) this trains, with exactly the
model, preprocessing, loss and optimiser the sites use (``fl_imaging.ml.training``):

* one local-only model per site on that site's training cases, and
* one centralised model on the pooled training cases of all sites,

each for ``rounds x local_epochs`` epochs (the number of passes a federated run makes
over every site's data), then evaluates every model on every site's validation cases.
Prints one JSON document (Dice matrix, minutes per model) to stdout.

    .venv/bin/python scripts/baselines.py --experiment hippocampus > /tmp/baselines.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from fl_imaging.config import compose
from fl_imaging.data.loading import eval_loader, train_loader
from fl_imaging.data.manifest import TRAIN, VAL
from fl_imaging.logs import setup_logging
from fl_imaging.ml.models import new_model
from fl_imaging.ml.training import LocalRecipe, evaluate, train_local
from fl_imaging.site.resolve import configured_sites, load_site_manifest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="hippocampus")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: rounds x train.local_epochs of the experiment",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args()
    setup_logging()
    plan = compose(args.experiment, [f"paths.root={PROJECT_ROOT}", *args.overrides])
    torch.set_num_threads(2)
    epochs = args.epochs or plan.rounds * plan.train.local_epochs
    sites = configured_sites(plan)
    manifests = {s.name: load_site_manifest(s, plan) for s in sites}
    val = {name: eval_loader(m.split(VAL), plan.data) for name, m in manifests.items()}
    num_classes = len(plan.data.labels)  # training classes (label values remapped)

    trainings = {f"local {name}": m.split(TRAIN) for name, m in manifests.items()}
    trainings["centralised"] = [c for m in manifests.values() for c in m.split(TRAIN)]
    results: dict[str, dict[str, float]] = {}
    minutes: dict[str, float] = {}
    for label, cases in trainings.items():
        start = time.perf_counter()
        model = new_model(plan)
        loader = train_loader(cases, plan.data, batch_size=plan.train.batch_size, seed=plan.seed)
        recipe = LocalRecipe.from_config(plan.train, epochs=epochs, log_prefix=f"[{label}] ")
        train_local(model, loader, recipe)
        minutes[label] = (time.perf_counter() - start) / 60
        results[label] = {
            site: evaluate(
                model, loader_, num_classes=num_classes, roi_size=plan.data.patch_size
            ).dice_mean
            for site, loader_ in val.items()
        }
        logging.getLogger("fl_imaging").info(
            "%s: %d cases x %d epochs, %.1f min, Dice %s",
            label,
            len(cases),
            epochs,
            minutes[label],
            {k: round(v, 3) for k, v in results[label].items()},
        )
    json.dump(
        {"experiment": args.experiment, "epochs": epochs, "dice": results, "minutes": minutes},
        sys.stdout,
        indent=2,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
