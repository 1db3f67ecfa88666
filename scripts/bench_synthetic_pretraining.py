"""Warm start from synthetic hospitals: pre-train on generated scans, fine-tune privately.

The product's own generator (``fl-imaging synth``) writes seeded synthetic scans with
blob-shaped lesions: no patient is involved, so a model trained on them costs no privacy
and can be shared with every site. This script measures what starting private training
from such a model buys on the hippocampus pseudo-sites:

1. **Synthetic hospitals**: ``generate_federation`` (3 sites, ``--cases`` in all,
   ``--skew``, ``--fov-mm``, ``--seed``), written to the scratch folder.
2. **Pre-training** on them without DP (``--pretrain-experiment``, by default
   ``synthetic_start``: what ``make synthetic-start`` trains). Its checkpoint
   (``best.pt``) is picked on the synthetic validation cases, so no private case
   chooses it.
3. **Private fine-tuning**: per epsilon in ``--epsilons`` (``none``: without DP-SGD), a
   run of ``--experiment`` on all of its sites' cases from the pre-trained checkpoint
   (``model.init_checkpoint``), and with ``--from-scratch`` the same run from random
   weights, each with a fresh state folder (a fresh privacy ledger).

Prints one JSON object (the generator's arguments, the pre-training run, each
fine-tuning run as ``bench_privacy_utility.py`` reports it). Round 0 of a warm-started
run is the synthetic model on the private sites' validation cases.

    .venv/bin/python scripts/bench_synthetic_pretraining.py --epsilons 8 1 \\
        -- strategy.cross_site_epochs=0 > synthetic_pretraining.json

Tuning the fine-tuning recipe on these figures would spend the privacy of the patients
whose validation cases score them; the script runs the given recipe unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_public_pretraining import (
    add_warm_start_arguments,
    fine_tune,
    pretrain,
    reused_checkpoint,
    warm_start_report,
)

from fl_imaging.data.synthetic import generate_federation

SITES = 3
# conf/experiment/synthetic_start.yaml (the private recipe's model; what make
# synthetic-start trains), its sites replaced by the generated ones
DEFAULT_PRETRAIN_EXPERIMENT = "synthetic_start"
DEFAULT_PRETRAIN: list[str] = []


def synthetic_sites(out: Path, cases: int, skew: float, fov_mm: float, seed: int) -> list[str]:
    """Generate the synthetic hospitals under ``out``; the overrides naming their manifests.

    The same arguments give the same scans (the generator is seeded).
    """
    manifests = generate_federation(
        out, num_sites=SITES, total_cases=cases, skew=skew, fov_mm=fov_mm, seed=seed
    )
    return [f"federation.sites.{i}.manifest={m}" for i, m in enumerate(manifests)]


def main(argv: list[str] | None = None) -> int:
    """Generate, pre-train, fine-tune per epsilon; print the JSON; exit 1 when a run failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_warm_start_arguments(parser, DEFAULT_PRETRAIN_EXPERIMENT, DEFAULT_PRETRAIN)
    parser.add_argument("--cases", type=int, default=208, help="synthetic cases in all")
    parser.add_argument("--skew", type=float, default=0.5)
    parser.add_argument("--fov-mm", type=float, default=64.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    generator = {"cases": args.cases, "skew": args.skew, "fov_mm": args.fov_mm, "seed": args.seed}
    with contextlib.ExitStack() as stack:
        scratch = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sp-")))
        scratch.mkdir(parents=True, exist_ok=True)
        if args.checkpoint is None:
            sites = synthetic_sites(scratch / "synthetic", **generator)
            pre = pretrain(
                args.pretrain_experiment,
                sites,
                list(args.pretrain),
                scratch,
                name="synthetic-pretrain",
            )
        else:
            pre = reused_checkpoint(args.checkpoint)
        print(json.dumps({"pretrain": pre}), file=sys.stderr)
        runs = fine_tune(
            args, list(args.overrides), "synthetic pre-training", pre["checkpoint"], scratch
        )
    return warm_start_report(args, pre, runs, generator=generator)


if __name__ == "__main__":
    sys.exit(main())
