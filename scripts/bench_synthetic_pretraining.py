"""Warm start from synthetic hospitals: pre-train on generated scans, fine-tune privately.

The product's own generator (``fl-imaging synth``) writes seeded synthetic scans with
blob-shaped lesions: no patient is involved, so a model trained on them costs no privacy
and can be shared with every site. This script measures what starting private training
from such a model buys on the hippocampus pseudo-sites:

1. **Synthetic hospitals**: ``generate_federation`` (3 sites, ``--cases`` in all,
   ``--skew``, ``--fov-mm``, ``--seed``), written to the scratch folder.
2. **Pre-training** on them without DP (``--pretrain-experiment``, by default the demo
   with the private recipe's model). Its checkpoint (``best.pt``) is picked on the
   synthetic validation cases, so no private case chooses it.
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

from bench_privacy_utility import emit, run_setting
from bench_public_pretraining import pretrain

from fl_imaging.data.synthetic import generate_federation

SITES = 3
# the demo with the private recipe's model: a checkpoint hippocampus_private accepts
DEFAULT_PRETRAIN_EXPERIMENT = "demo"
DEFAULT_PRETRAIN = ["model=unet_dp", "rounds=12"]


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
    parser.add_argument("--experiment", default="hippocampus_private")
    parser.add_argument("--epsilons", nargs="+", default=["8", "1"])
    parser.add_argument("--from-scratch", action="store_true", help="also run without warm start")
    parser.add_argument("--cases", type=int, default=208, help="synthetic cases in all")
    parser.add_argument("--skew", type=float, default=0.5)
    parser.add_argument("--fov-mm", type=float, default=64.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pretrain-experiment", default=DEFAULT_PRETRAIN_EXPERIMENT)
    parser.add_argument(
        "--pretrain",
        nargs="*",
        default=DEFAULT_PRETRAIN,
        help="Hydra overrides of the pre-training run",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="skip generating and pre-training: a checkpoint an earlier run of this script made",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep scratch files here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of every fine-tuning run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    epsilons = [None if e == "none" else float(e) for e in args.epsilons]
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
        elif not args.checkpoint.is_file():
            raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")
        else:
            pre = {"checkpoint": str(args.checkpoint.resolve()), "reused": True}
        print(json.dumps({"pretrain": pre}), file=sys.stderr)
        starts = [("synthetic pre-training", [f"model.init_checkpoint={pre['checkpoint']}"])]
        if args.from_scratch:
            starts.append(("from scratch", []))
        runs = []
        for epsilon in epsilons:
            for start, extra in starts:
                tag = "warm" if extra else "scratch"
                overrides = [*args.overrides, *extra]
                result = run_setting(args.experiment, overrides, epsilon, scratch / tag)
                result["start"] = start
                print(json.dumps(result), file=sys.stderr)
                runs.append(result)
    report = {
        "experiment": args.experiment,
        "generator": generator,
        "pretrain": pre,
        "overrides": args.overrides,
        "runs": runs,
    }
    return emit(report)


if __name__ == "__main__":
    sys.exit(main())
