"""Warm start from public data of the same anatomy: pre-train without DP, fine-tune privately.

A hospital federation rarely has to start from random weights: public data of the same
anatomy (here MSD Task04 itself is public) costs the hospitals no privacy. This script
measures what such a start buys on the hippocampus pseudo-sites:

1. **A public split.** ``--public-cases`` of ``--public-site``'s training cases (seeded
   draw) play the public dataset. They leave that site: its private manifest keeps the
   rest of its training cases and all of its validation cases, so no case is both
   pre-trained on and protected, and every site is scored on the same validation
   cases as in the other benchmarks. 20 % of the public cases are held out to pick the
   pre-trained checkpoint (``best.pt``), so no private case chooses it.
2. **Pre-training**: one ``fl-imaging run`` of a one-site federation on the public
   cases, without DP (``--pretrain-experiment``, the private recipe's model).
3. **Private fine-tuning**: per epsilon in ``--epsilons`` (``none``: without DP-SGD), a
   run of ``--experiment`` on the reduced federation from the pre-trained checkpoint
   (``model.init_checkpoint``), and with ``--from-scratch`` the same run from random
   weights, each with a fresh state folder (a fresh privacy ledger).

Prints one JSON object (the split, the pre-training run, each fine-tuning run as
``bench_privacy_utility.py`` reports it). Round 0 of a warm-started run is the
pre-trained model on the private sites' validation cases.

    .venv/bin/python scripts/bench_public_pretraining.py --epsilons 8 1 --from-scratch \\
        > docs/public_pretraining.json

Tuning the fine-tuning recipe on these figures would spend the privacy of the patients
whose validation cases score them; the script runs the shipped recipe unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_privacy_utility import emit, run_setting

from fl_imaging.config import compose
from fl_imaging.outputs.reporting import read_summary
from fl_imaging.tools.launch import run_simulation

ROOT = Path(__file__).resolve().parents[1]


def split_public(
    manifest: Path, public_cases: int, seed: int, out: Path
) -> tuple[Path, Path, list[str]]:
    """Write ``out/public.json`` (drawn training cases) and ``out/private.json`` (the rest).

    Entry paths stay as they are (relative to the federation's ``data_root``); the public
    manifest marks no case ``val``, so loading it holds out a seeded 20 %.

    Raises:
        SystemExit: fewer than 2 public cases asked for (one to train on, one to pick the
            checkpoint), or the site has fewer training cases than asked for.
    """
    if public_cases < 2:
        raise SystemExit(
            f"--public-cases {public_cases}: at least 2 are needed (pre-training trains on "
            "some and picks its checkpoint on the others)"
        )
    raw = json.loads(manifest.read_text())
    train = [e for e in raw["training"] if e.get("split", "train") == "train"]
    if public_cases >= len(train):
        raise SystemExit(
            f"{manifest}: {len(train)} training cases, cannot make {public_cases} of them public"
        )
    drawn = sorted(random.Random(seed).sample(range(len(train)), public_cases))
    public_ids = {train[i]["case"] for i in drawn}
    public = [
        {k: v for k, v in e.items() if k != "split"}
        for e in raw["training"]
        if e["case"] in public_ids
    ]
    private = [e for e in raw["training"] if e["case"] not in public_ids]
    out.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in raw.items() if k not in ("training", "numTraining", "data_root")}
    public_path, private_path = out / "public.json", out / "private.json"
    public_path.write_text(
        json.dumps({**base, "name": f"public_{raw['name']}", "training": public}, indent=1)
    )
    private_path.write_text(json.dumps({**base, "training": private}, indent=1))
    return public_path, private_path, sorted(public_ids)


def pretrain(
    experiment: str,
    sites: list[str],
    overrides: list[str],
    scratch: Path,
    name: str = "public-pretrain",
) -> dict[str, Any]:
    """Train a federation on data that costs no privacy, without DP; its run and checkpoint.

    Args:
        experiment: the pre-training experiment.
        sites: Hydra overrides naming its sites (here the public cases' one site).
        overrides: further overrides of the pre-training run.
        scratch: its state folder goes here.
        name: the run's name.

    Raises:
        SystemExit: the run did not finish cleanly or left no ``best.pt``.
    """
    items = [
        *sites,
        f"paths.state={scratch / 'state-pretrain'}",
        f"name={name}",
        "strategy.cross_site_epochs=0",
        *overrides,
    ]
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Flower's log stream; stdout is the JSON
        outcome = run_simulation(experiment, items, project_root=ROOT)
    minutes = (time.perf_counter() - start) / 60
    if outcome.run_dir is None:
        raise SystemExit(f"pre-training did not finish: {outcome.status}")
    summary = read_summary(outcome.run_dir)
    checkpoint = outcome.run_dir / "checkpoints" / "best.pt"
    if summary.get("status") != "finished" or not checkpoint.is_file():
        raise SystemExit(f"pre-training did not finish cleanly: {outcome.run_dir}")
    return {
        "overrides": items,
        "final_dice_mean": summary.get("final_dice_mean"),
        "dice_mean_per_round": summary.get("dice_mean_per_round"),
        "minutes": round(minutes, 2),
        "checkpoint": str(checkpoint),
    }


def add_warm_start_arguments(
    parser: argparse.ArgumentParser, pretrain_experiment: str, pretrain_overrides: list[str]
) -> None:
    """The arguments both warm-start benchmarks take (the fine-tuning and its start)."""
    parser.add_argument("--experiment", default="hippocampus_private")
    parser.add_argument("--epsilons", nargs="+", default=["8", "1"])
    parser.add_argument("--from-scratch", action="store_true", help="also run without warm start")
    parser.add_argument("--pretrain-experiment", default=pretrain_experiment)
    parser.add_argument(
        "--pretrain",
        nargs="*",
        default=pretrain_overrides,
        help="Hydra overrides of the pre-training run",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="skip pre-training: a checkpoint an earlier run of this script made",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep scratch files here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of every fine-tuning run")


def reused_checkpoint(path: Path) -> dict[str, Any]:
    """``--checkpoint``: the pre-training record of a checkpoint made earlier.

    Raises:
        SystemExit: no such file.
    """
    if not path.is_file():
        raise SystemExit(f"--checkpoint {path}: no such file")
    return {"checkpoint": str(path.resolve()), "reused": True}


def fine_tune(
    args: argparse.Namespace, overrides: list[str], start: str, checkpoint: str, scratch: Path
) -> list[dict[str, Any]]:
    """One run of ``args.experiment`` per epsilon from ``checkpoint`` (and from scratch)."""
    starts = [(start, [f"model.init_checkpoint={checkpoint}"])]
    if args.from_scratch:
        starts.append(("from scratch", []))
    epsilons = [None if e == "none" else float(e) for e in args.epsilons]
    runs = []
    for epsilon in epsilons:
        for name, extra in starts:
            tag = "warm" if extra else "scratch"
            result = run_setting(args.experiment, [*overrides, *extra], epsilon, scratch / tag)
            result["start"] = name
            print(json.dumps(result), file=sys.stderr)
            runs.append(result)
    return runs


def warm_start_report(
    args: argparse.Namespace, pre: dict[str, Any], runs: list[dict[str, Any]], **fields: Any
) -> int:
    """Print the benchmark's JSON (``fields``, the pre-training, every run); 1 if one failed."""
    report = {"experiment": args.experiment, **fields, "pretrain": pre}
    return emit({**report, "overrides": args.overrides, "runs": runs})


def main(argv: list[str] | None = None) -> int:
    """Split, pre-train, fine-tune per epsilon; print the JSON; exit 1 when a run failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_warm_start_arguments(parser, "hippocampus", ["model=unet_dp", "rounds=20"])
    parser.add_argument("--public-site", default="B_float")
    parser.add_argument("--public-cases", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    plan = compose(args.experiment, list(args.overrides))
    names = [s.name for s in plan.federation.sites]
    if args.public_site not in names:
        raise SystemExit(f"--public-site {args.public_site}: not a site of {args.experiment}")
    index = names.index(args.public_site)
    with contextlib.ExitStack() as stack:
        scratch = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pp-")))
        scratch.mkdir(parents=True, exist_ok=True)
        site_manifest = plan.resolve_path(plan.federation.sites[index].manifest)
        public, private, public_ids = split_public(
            site_manifest, args.public_cases, args.seed, scratch / "split"
        )
        if args.checkpoint is None:
            sites = [
                f"federation.sites=[{{name:public,manifest:{public}}}]",
                "strategy.min_sites=1",
            ]
            pre = pretrain(args.pretrain_experiment, sites, list(args.pretrain), scratch)
        else:
            pre = reused_checkpoint(args.checkpoint)
        print(json.dumps({"pretrain": pre}), file=sys.stderr)
        common = [*args.overrides, f"federation.sites.{index}.manifest={private}"]
        runs = fine_tune(args, common, "public pre-training", pre["checkpoint"], scratch)
    fields = {"public_site": args.public_site, "public_cases": public_ids, "seed": args.seed}
    return warm_start_report(args, pre, runs, **fields)


if __name__ == "__main__":
    sys.exit(main())
