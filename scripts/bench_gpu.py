"""Benchmark: many virtual hospitals on one GPU box, against a plain single-process loop.

For each model size in ``--sizes`` and each federation size N in ``--sites``:

1. N synthetic hospitals (``fl-imaging synth``'s generator, ``--cases-per-site`` each,
   written once per size at the largest N; smaller federations use the first sites);
2. the real app (``fl-imaging run``'s simulation: every site trains ``--rounds`` rounds of
   one local epoch and evaluates) with ``federation.simulation.num_gpus_per_site`` from
   ``--gpus-per-site`` (default ``auto``: the planned share, printed by the run) while a
   thread samples ``nvidia-smi`` (utilisation, memory) every 0.5 s;
3. a plain loop in this process: the same pooled cases, network, batch and passes
   (``train_local`` on one loader), on the same device;
4. per size, the DP-SGD step (Opacus, the sites' hooks mode) against the plain step on
   random tensors of the size's patch and batch.

Figures per run: seconds per round, training cases per second (training cases x rounds
/ the rounds' training seconds; rounds after the first, which also starts the workers,
when there are two or more), the plain loop's cases per second and the ratio of
the two (the headline), the peak GPU memory each hospital reported
(``torch.cuda.max_memory_allocated``, ``gpu_peak_mb`` in metrics.jsonl), nvidia-smi's mean
utilisation and peak memory; per size the DP/plain step ratio. One JSON document on
stdout, progress on stderr.

    .venv/bin/python scripts/bench_gpu.py > gpu.json          # on a GPU machine
    .venv/bin/python scripts/bench_gpu.py --sizes tiny --sites 2 --rounds 1 \\
        --device cpu --gpus-per-site 0                         # the same code on a CPU

Sizes: ``tiny`` (unet_tiny, 16^3), ``hippocampus`` (unet, 48x64x48, the hippocampus
experiment's network), ``tumour`` (unet, 128^3 patches of 2 mm synthetic volumes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from bench_scale import run_sampled  # scripts/: a sibling when run as a script

from fl_imaging.config import RunPlan, compose
from fl_imaging.data.manifest import TRAIN
from fl_imaging.data.synthetic import generate_federation
from fl_imaging.outputs.reporting import read_metrics, read_summary
from fl_imaging.site.resolve import configured_sites, load_site_manifest

ROOT = Path(__file__).resolve().parent.parent


class Size(NamedTuple):
    """A model and patch size, and the synthetic field of view that fills the patch."""

    model: str
    patch: tuple[int, int, int]
    fov_mm: float  # the generator's volumes: about fov_mm / 2 voxels per edge


SIZES = {
    "tiny": Size("unet_tiny", (16, 16, 16), 32.0),
    "hippocampus": Size("unet", (48, 64, 48), 96.0),
    "tumour": Size("unet", (128, 128, 128), 256.0),
}


class GpuSampler(threading.Thread):
    """nvidia-smi's utilisation (%) and used memory (MiB) of GPU 0, every 0.5 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()
        self.available = shutil.which("nvidia-smi") is not None

    def run(self) -> None:
        query = [
            "nvidia-smi",
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
            "--id=0",
        ]
        while self.available and not self.done.wait(0.5):
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
            try:
                util, used = (float(v) for v in out.strip().split(","))
            except ValueError:
                continue
            self.samples.append((util, used))

    def figures(self) -> dict[str, float | None]:
        """Mean utilisation and peak memory over the samples (None without nvidia-smi)."""
        if not self.samples:
            return {"gpu_util_mean_pct": None, "gpu_memory_peak_mb": None}
        return {
            "gpu_util_mean_pct": round(statistics.mean(u for u, _ in self.samples), 1),
            "gpu_memory_peak_mb": max(m for _, m in self.samples),
        }


def overrides_for(
    size: Size, manifests: list[Path], args: argparse.Namespace, root: Path
) -> list[str]:
    """Hydra overrides of one benchmark federation (the demo experiment, resized)."""
    sites = ",".join(f"{{name:hospital_{i:03d},manifest:{m}}}" for i, m in enumerate(manifests))
    return [
        f"federation.sites=[{sites}]",
        f"model={size.model}",
        f"data.patch_size=[{','.join(map(str, size.patch))}]",
        f"rounds={args.rounds}",
        "train.local_epochs=1",
        f"train.batch_size={args.batch_size}",
        "train.progress=round",
        f"train.device={args.device}",
        f"train.amp={args.amp}",
        "strategy.cross_site_epochs=0",
        f"federation.simulation.num_gpus_per_site={args.gpus_per_site}",
        f"paths.root={root}",
        "name=bench-gpu",
    ]


def federated(
    size: Size, manifests: list[Path], args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """One simulated federation of ``len(manifests)`` hospitals; its figures."""
    root = work / f"run-{len(manifests)}"
    overrides = overrides_for(size, manifests, args, root)
    sampler = GpuSampler()
    outcome, run_dir, seconds = run_sampled(
        sampler, sampler.done, overrides, f"{len(manifests)} hospitals"
    )
    summary = read_summary(run_dir)
    per_round = {int(k): v for k, v in summary.get("round_seconds", {}).items() if int(k) > 0}
    # the first round also starts the workers (imports, CUDA contexts): timed only alone
    timed = sorted(per_round)[1:] or sorted(per_round)
    train_s = sum(per_round[r].get("train", 0.0) for r in timed)
    round_s = sum(sum(per_round[r].values()) for r in timed) / max(len(timed), 1)
    rows = read_metrics(run_dir)
    cases = sum(
        r.get("num_examples", 0)
        for r in rows
        if r.get("split") == "train" and r.get("round") in timed
    )
    peaks = [r["gpu_peak_mb"] for r in rows if r.get("gpu_peak_mb") is not None]
    return {
        "hospitals": len(manifests),
        "status": outcome.status,
        "total_s": round(seconds, 1),
        "rounds_timed": timed,
        "round_s": round(round_s, 2),
        "rounds_per_s": round(1 / round_s, 4) if round_s else None,
        "train_cases_per_s": round(cases / train_s, 2) if train_s else None,
        "hospital_gpu_peak_mb_max": round(max(peaks), 1) if peaks else None,
        "hospital_gpu_peak_mb_median": round(statistics.median(peaks), 1) if peaks else None,
        **sampler.figures(),
        "final_dice_mean": summary.get("final_dice_mean"),
        "plan": compose("demo", overrides),
    }


def plain_loop(plan: RunPlan) -> dict[str, float]:
    """The federation's training cases pooled, trained in this process: cases per second.

    As many passes as the federation's rounds (each site: one epoch per round), the same
    network, batch, optimiser and device; the first batch is a warm-up, not timed.
    """
    import torch
    from monai.data import DataLoader
    from torch.utils.data import Subset

    from fl_imaging.data.loading import train_loader
    from fl_imaging.ml.devices import place_model, select_device
    from fl_imaging.ml.models import new_model
    from fl_imaging.ml.training import LocalRecipe, train_local

    cases = [
        case for s in configured_sites(plan) for case in load_site_manifest(s, plan).split(TRAIN)
    ]
    device = select_device(plan.train.device)
    model = place_model(new_model(plan), device, channels_last=plan.train.channels_last)
    loader = train_loader(cases, plan.data, batch_size=plan.train.batch_size, seed=0)
    recipe = LocalRecipe.from_config(plan.train, epochs=1)
    first = Subset(loader.dataset, range(min(plan.train.batch_size, len(cases))))
    train_local(model, DataLoader(first, batch_size=plan.train.batch_size), recipe)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(plan.rounds):
        train_local(model, loader, recipe)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "plain_cases": len(cases) * plan.rounds,
        "plain_s": round(seconds, 2),
        "plain_cases_per_s": round(len(cases) * plan.rounds / seconds, 2),
    }


def dp_step_cost(plan: RunPlan, steps: int) -> dict[str, float]:
    """Seconds per step of DP-SGD (the sites' Opacus hooks mode) and of plain training.

    Random tensors of the plan's patch and batch; one warm-up round each, then ``steps``
    steps timed as one round (Poisson sampling at rate 1/steps: batches vary around B).
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fl_imaging.ml.devices import place_model, select_device
    from fl_imaging.ml.models import new_model
    from fl_imaging.ml.training import LocalRecipe, train_local
    from fl_imaging.privacy.dp_sgd import DpSgdSettings, train_private

    device = select_device(plan.train.device)
    batch = plan.train.batch_size
    g = torch.Generator().manual_seed(0)
    images = torch.rand(
        batch * steps, len(plan.data.modalities), *plan.data.patch_size, generator=g
    )
    labels = torch.randint(0, len(plan.data.labels), (batch * steps, 1, *plan.data.patch_size))
    loader = DataLoader(TensorDataset(images, labels.float()), batch_size=batch)
    recipe = LocalRecipe(optimizer="sgd", lr=0.01, amp=plan.train.amp)
    dp = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch=batch)
    timed: dict[str, float] = {}
    for name in ("plain", "dp"):
        for attempt in ("warm-up", "timed"):
            model = place_model(new_model(plan), device, channels_last=plan.train.channels_last)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            if name == "plain":
                result = train_local(model, loader, recipe)
            else:
                _, result, _ = train_private(model, loader, recipe, dp, history=[])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if attempt == "timed":
                timed[f"{name}_step_s"] = round((time.perf_counter() - started) / result.steps, 4)
    timed["dp_over_plain"] = round(timed["dp_step_s"] / timed["plain_step_s"], 2)
    return timed


def main(argv: list[str] | None = None) -> int:
    """Run every size and federation size; print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["hippocampus"])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 50, 100])
    parser.add_argument("--cases-per-site", type=int, default=4, help="3 train + 1 validation")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="auto", help="train.device of every site")
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    parser.add_argument("--gpus-per-site", default="auto", help="a share, or auto")
    parser.add_argument("--dp-steps", type=int, default=5)
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    args = parser.parse_args(argv)
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    os.environ.setdefault("FLWR_HOME", str(work / ".flwr"))
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "args": vars(args),
        "runs": [],
        "dp": [],
    }
    try:
        for name in args.sizes:
            size = SIZES[name]
            manifests = generate_federation(
                work / f"data-{name}",
                num_sites=max(args.sites),
                total_cases=args.cases_per_site * max(args.sites),
                skew=0.0,
                fov_mm=size.fov_mm,
                seed=0,
            )
            for n in sorted(args.sites):
                row = federated(size, manifests[:n], args, work)
                plan = row.pop("plan")
                if not args.no_plain:
                    row.update(plain_loop(plan))
                    row["federated_over_plain"] = round(
                        row["train_cases_per_s"] / row["plain_cases_per_s"], 3
                    )
                row["size"] = name
                print(json.dumps(row), file=sys.stderr, flush=True)
                report["runs"].append(row)
            report["dp"].append({"size": name, **dp_step_cost(plan, args.dp_steps)})
            print(json.dumps(report["dp"][-1]), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
