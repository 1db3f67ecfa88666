"""Diagnostic: a private recipe with its per-patient clipping and no noise.

How much of the gap between a DP-SGD run and training without DP is the noise, and how
much the clipping? This runs the experiment's federation in one process: every round,
each site trains the global model with the sites' own DP-SGD code (``train_private``:
Opacus, Poisson sampling, per-patient clipping at ``privacy.max_grad_norm``, the private
sites' learning rate ``privacy.lr``) with noise multiplier **0**, the server averages the
updates by training cases (FedAvg), and every site evaluates the global model on its
validation cases. Prints one JSON object: the mean Dice per round and the final Dice per
site.

**No privacy**: without noise nothing is protected. Nothing here is written to a site's
ledger or run folder; it is a measurement of the recipe, like a run without DP. (The
product cannot train a private site without noise: its noise comes from the site's
budget.)

    .venv/bin/python scripts/bench_clipping_only.py > clip.json    # hippocampus_private
    .venv/bin/python scripts/bench_clipping_only.py --experiment demo_private -- rounds=3
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

import torch

from fl_imaging.config import RunPlan, compose
from fl_imaging.data.loading import eval_loader, private_train_loader
from fl_imaging.data.manifest import TRAIN, VAL
from fl_imaging.ml.models import initial_weights, new_model
from fl_imaging.ml.training import LocalRecipe, evaluate
from fl_imaging.privacy.dp_sgd import DpSgdSettings, train_private
from fl_imaging.site.resolve import configured_sites, load_site_manifest, site_batch_size
from fl_imaging.site.rounds import private_train_config

logger = logging.getLogger("bench_clipping_only")


def run(plan: RunPlan) -> dict[str, Any]:
    """Every round: clipped, noiseless DP-SGD at each site, FedAvg, evaluation; the figures."""
    torch.set_num_threads(max(plan.train.threads, 1))
    sites = []
    for site in configured_sites(plan):
        manifest = load_site_manifest(site, plan)
        train = manifest.split(TRAIN)
        sites.append(
            {
                "name": site.name,
                "cases": len(train),
                "train": private_train_loader(
                    train,
                    plan.data,
                    batch_size=site_batch_size(site, plan, len(train)),
                    seed=plan.seed + site.index,
                    views=plan.privacy.augmentations,
                ),
                "val": eval_loader(manifest.split(VAL), plan.data),
            }
        )
    total = sum(s["cases"] for s in sites)
    weights = initial_weights(plan)
    dp = DpSgdSettings.from_config(
        plan.privacy,
        noise_multiplier=0.0,
        max_grad_norm=plan.privacy.max_grad_norm,
        accountant=plan.privacy.accountant,
    )
    per_round: dict[int, float] = {}
    final: dict[str, float] = {}
    started = time.perf_counter()
    for server_round in range(1, plan.rounds + 1):
        recipe = LocalRecipe.from_config(
            private_train_config(plan),
            epochs=plan.train.local_epochs,
            server_round=server_round,
            rounds=plan.rounds,
        )
        average: dict[str, torch.Tensor] = {}
        for site in sites:
            model = new_model(plan)
            model.load_state_dict(weights)
            update, _, _ = train_private(model, site["train"], recipe, dp, history=[])
            share = site["cases"] / total
            for key, value in update.items():
                average[key] = average.get(key, 0) + value.float() * share
        weights = {k: v.to(weights[k].dtype) for k, v in average.items()}
        for site in sites:
            model = new_model(plan)
            model.load_state_dict(weights)
            result = evaluate(
                model,
                site["val"],
                num_classes=len(plan.data.labels),
                roi_size=plan.data.patch_size,
            )
            final[site["name"]] = round(result.dice_mean, 4)
        per_round[server_round] = round(sum(final.values()) / len(final), 4)
        logger.info(
            "round %d mean Dice %.3f %s (%.0f s)",
            server_round,
            per_round[server_round],
            final,
            time.perf_counter() - started,
        )
    return {
        "final_dice_mean": per_round[plan.rounds],
        "final_dice_per_site": final,
        "dice_mean_per_round": per_round,
        "max_grad_norm": plan.privacy.max_grad_norm,
        "lr": private_train_config(plan).lr,
        "minutes": round((time.perf_counter() - started) / 60, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the experiment's recipe clipped and without noise; print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--experiment", default="hippocampus_private")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args(argv)
    # force: an imported library has already given the root logger a WARNING handler
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s", force=True)
    plan = compose(args.experiment, args.overrides)
    report = {"experiment": args.experiment, "overrides": args.overrides, **run(plan)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
