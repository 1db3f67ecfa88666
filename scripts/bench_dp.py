"""Benchmark DP-SGD (Opacus) against plain training for the configured MONAI 3D UNet.

Measures, for each patch size (default 32^3 and 64^3) and batch size B (default 4):

* the non-private training step: forward, the experiment's loss (MONAI DiceCELoss,
  per volume when ``train.class_weights`` is set), backward, the experiment's optimiser
  step (``train.optimizer``: Adam for the default experiment, SGD for the private one);
* the DP-SGD step for each Opacus grad-sample mode (``hooks``, ``functorch``, ``ew``,
  ``ghost``): the same step through ``PrivacyEngine.make_private`` with
  ``noise_multiplier=1.0``, ``max_grad_norm=1.0`` (per-sample clipping + noise).
  ``hooks`` is what the sites run: Opacus' hooks mode with fl-imaging's convolution
  and PReLU samplers (``fl_imaging.privacy.grad_samplers``); ``hooks-opacus`` is
  Opacus' hooks mode with its own samplers (unfolded convolutions), for comparison.
  ``hooks`` draws its noise as the sites do: from a generator seeded by ``os.urandom``
  with Opacus' floating-point-safe sampling (four Gaussian draws per entry);
  ``hooks-global-rng`` is the same step with the global torch RNG and one draw per
  entry (before the secret randomness), so the two give the cost of the secrecy.

Step time is the median over ``--steps`` timed steps after one warm-up step. Peak
memory is the process's peak RSS (``ru_maxrss``): since it never goes down, every
configuration runs in a fresh subprocess (this script re-invoked with ``--one``), which
also reports its RSS just before the first step and the increment over it.

Input is synthetic: random images ``[B, 1, S, S, S]`` and random labels in {0, 1, 2}
shaped ``[B, 1, S, S, S]``, one fixed batch reused every step. The DP loader is
made with ``poisson_sampling=False`` (a fixed batch of B samples; real training uses
Poisson sampling, whose batch size varies around B): this is a timing benchmark, no
epsilon is reported. ``ghost`` clipping uses a per-sample DiceCE criterion (MONAI's
DiceCELoss cannot give a per-sample loss of shape [B]); it equals DiceCELoss in value.

Output: one JSON document on stdout (progress on stderr), with ``ratio`` = DP step
time / non-private step time; the target for the default mode is <= 1.6 at 64^3.

Run (from the repository root; about 1.5 minutes on 2 idle CPU cores, several times
that when other processes compete for them)::

    .venv/bin/python scripts/bench_dp.py > /tmp/bench_dp.json

Options: ``--experiment hippocampus`` plus Hydra overrides as positional arguments
(e.g. ``model=unet_small``), ``--sizes 32 64``, ``--batch-size 4``, ``--steps 5``,
``--modes hooks hooks-global-rng functorch hooks-opacus ew ghost``, ``--threads 2``. ``ratio``
compares medians,
``ratio_min`` the fastest steps (steadier when other processes share the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from typing import Any

DEFAULT_MODES = ("hooks", "hooks-global-rng", "functorch", "hooks-opacus", "ew", "ghost")
TARGET_RATIO = 1.6
WARMUP_STEPS = 1
CHILD_TIMEOUT_S = 600.0


def _rss_mb() -> float:
    """Current resident set size of this process in MB (from /proc/self/status)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far in MB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _per_sample_dice_ce() -> Any:
    """DiceCE loss with a ``reduction`` attribute; ``"none"`` gives one loss per sample [B].

    Equal in value to ``fl_imaging.ml.training.segmentation_loss()`` under ``"mean"``:
    DiceCELoss averages Dice over batch and classes and cross-entropy over all voxels,
    i.e. the mean over samples of each sample's own Dice + CE.
    """
    import torch
    from monai.losses import DiceLoss
    from torch import nn

    class PerSampleDiceCE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.reduction = "mean"
            self.dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")

        def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            dice = self.dice(logits, labels).flatten(1).mean(1)
            ce = nn.functional.cross_entropy(logits, labels[:, 0].long(), reduction="none")
            per_sample = dice + ce.flatten(1).mean(1)
            if self.reduction == "none":
                return per_sample
            return per_sample.sum() if self.reduction == "sum" else per_sample.mean()

    return PerSampleDiceCE()


def run_one(args: argparse.Namespace, size: int, mode: str) -> dict[str, Any]:
    """Time one configuration (``mode`` "none" = non-private) in this process."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fl_imaging.config import compose
    from fl_imaging.ml.models import build_model
    from fl_imaging.ml.training import LocalRecipe, segmentation_loss

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    plan = compose(args.experiment, args.overrides)
    in_channels, out_channels = 1, 3
    batch = args.batch_size

    gen = torch.Generator().manual_seed(plan.seed)
    n = 4 * batch
    images = torch.rand(n, in_channels, size, size, size, generator=gen)
    labels = torch.randint(0, out_channels, (n, 1, size, size, size), generator=gen)

    torch.manual_seed(plan.seed)
    model = build_model(plan.model, in_channels=in_channels, out_channels=out_channels)
    model.train()
    # the experiment's own optimiser and loss (class weights: computed per volume)
    recipe = LocalRecipe.from_config(plan.train, epochs=1)
    optimizer = recipe.new_optimizer(model.parameters())
    criterion: Any = segmentation_loss(recipe.class_weights)
    x, y = images[:batch], labels[:batch]

    if mode != "none":
        from opacus import PrivacyEngine

        # "hooks" is what the sites run; "hooks-opacus" keeps Opacus' samplers;
        # "hooks-global-rng" is "hooks" before the secret randomness (the global torch RNG
        # and Opacus' single Gaussian draw per entry)
        if mode in ("hooks", "hooks-global-rng"):
            from fl_imaging.privacy import grad_samplers

            grad_samplers.register()
        if mode == "hooks":
            from fl_imaging.privacy.randomness import secret_generator

            kwargs_noise: dict[str, Any] = {"noise_generator": secret_generator()}
        else:
            kwargs_noise = {}

        loader = DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=False)
        engine = PrivacyEngine(accountant=plan.privacy.accountant)
        kwargs: dict[str, Any] = {}
        if mode == "ghost":
            criterion = _per_sample_dice_ce()
            kwargs["criterion"] = criterion
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode="hooks" if mode in ("hooks-opacus", "hooks-global-rng") else mode,
            **kwargs,
            **kwargs_noise,
        )
        if mode == "ghost":
            model, optimizer, criterion, loader = made
        else:
            model, optimizer, loader = made
        if mode == "hooks":  # as fl_imaging.privacy.dp_sgd.train_private does
            optimizer.secure_mode = True
        x, y = next(iter(loader))

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    rss_before = _rss_mb()
    for _ in range(WARMUP_STEPS):
        step()
    times = [step() for _ in range(args.steps)]
    peak = _peak_rss_mb()
    return {
        "step_s": round(statistics.median(times), 4),
        "step_min_s": round(min(times), 4),
        "peak_rss_mb": round(peak, 1),
        "rss_before_mb": round(rss_before, 1),
        "rss_increment_mb": round(peak - rss_before, 1),
    }


def _child(args: argparse.Namespace, size: int, mode: str) -> dict[str, Any]:
    """Run one configuration in a fresh subprocess; its last stdout line is the JSON result."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--one",
        str(size),
        mode,
        "--experiment",
        args.experiment,
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        *args.overrides,
    ]
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        result = {"error": f"subprocess exited {proc.returncode}: {tail[-300:]}"}
    print(
        f"  {size}^3 {mode:<9} {json.dumps(result)} ({time.perf_counter() - started:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=unet_small")
    parser.add_argument("--experiment", default="hippocampus")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 1 warm-up)")
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.one:
        size, mode = int(args.one[0]), args.one[1]
        try:
            result = run_one(args, size, mode)
        except Exception as exc:  # reported, not raised: one mode failing is a result
            result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(json.dumps(result), flush=True)
        return 0

    import opacus
    import torch

    from fl_imaging.config import compose

    plan = compose(args.experiment, args.overrides)
    default_mode = plan.privacy.grad_sample_mode
    print(
        f"bench_dp: {args.experiment} {args.overrides} sizes={args.sizes} "
        f"modes={args.modes} B={args.batch_size} threads={args.threads}",
        file=sys.stderr,
        flush=True,
    )
    load_before = [round(v, 2) for v in os.getloadavg()]
    results: list[dict[str, Any]] = []
    for size in args.sizes:
        non_private = _child(args, size, "none")
        dp: dict[str, dict[str, Any]] = {}
        for mode in args.modes:
            res = _child(args, size, mode)
            base = non_private.get("step_s")
            if "step_s" in res and base:
                res["ratio"] = round(res["step_s"] / base, 3)
                res["ratio_min"] = round(res["step_min_s"] / non_private["step_min_s"], 3)
            dp[mode] = res
        results.append({"size": size, "non_private": non_private, "dp": dp})

    default_ratio_64 = next(
        (r["dp"].get(default_mode, {}).get("ratio") for r in results if r["size"] == 64), None
    )
    doc = {
        "experiment": args.experiment,
        "overrides": args.overrides,
        "model": asdict(plan.model),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "steps": args.steps,
        "warmup_steps": WARMUP_STEPS,
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "poisson_sampling": False,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "load_avg_before": load_before,
        "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        "results": results,
        "default_mode": default_mode,
        "default_ratio_64": default_ratio_64,
        "target_ratio": TARGET_RATIO,
        "meets_target": None if default_ratio_64 is None else default_ratio_64 <= TARGET_RATIO,
    }
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
