"""Benchmark: one site's training and evaluation at BraTS size (memory and time on CPU).

Writes one synthetic BraTS-size case (two modalities of 240 x 240 x 155 at 1 mm, labels
0/1/2/4), then, each in a fresh process so that peak RSS means something:

* ``train``: local training on 128^3 patches (``RandCropByPosNegLabeld``, the site's
  training transforms), ``--steps`` steps of batch 1;
* ``evaluate``: sliding-window inference over the whole volume with 128^3 windows
  (the site's validation), Dice per label and WT/TC/ET region Dice and HD95.

Prints JSON: seconds per step / per case and the process's peak RSS in MB.

    python scripts/bench_full_size.py                      # model=unet_small, 128^3
    python scripts/bench_full_size.py --patch 160 --overrides model=unet
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plan(args: argparse.Namespace):  # noqa: ANN202
    from fl_imaging.config import compose

    return compose(
        "tumour_synthetic",
        [
            "data.spacing=null",
            f"data.patch_size=[{args.patch},{args.patch},{args.patch}]",
            "data.memory_cache_mb=0",
            "train.threads=2",
            *args.overrides,
        ],
    )


def _child(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from fl_imaging.data.loading import eval_loader, train_loader
    from fl_imaging.data.manifest import Case
    from fl_imaging.data.regions import regions_as_classes, regions_of
    from fl_imaging.ml.models import new_model
    from fl_imaging.ml.training import LocalRecipe, evaluate, train_local

    torch.set_num_threads(2)
    folder = Path(args.case_dir)
    case = Case(
        "case",
        (folder / "t1c.nii.gz", folder / "flair.nii.gz"),
        folder / "seg.nii.gz",
        split="train",
    )
    plan = _plan(args)
    model = new_model(plan)
    before = _peak_rss_mb()
    if args.child == "train":
        loader = train_loader([case] * args.steps, plan.data, batch_size=1, seed=0)
        start = time.perf_counter()
        result = train_local(model, loader, LocalRecipe(epochs=1, lr=plan.train.lr))
        seconds = (time.perf_counter() - start) / result.steps
        return {
            "seconds_per_step": round(seconds, 2),
            "steps": result.steps,
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "rss_before_mb": round(before, 1),
        }
    start = time.perf_counter()
    out = evaluate(
        model,
        eval_loader([case], plan.data),
        num_classes=len(plan.data.labels),
        roi_size=plan.data.patch_size,
        regions=regions_as_classes(regions_of(plan.data.label_scheme), plan.data.labels),
    )
    return {
        "seconds_per_case": round(time.perf_counter() - start, 2),
        "regions_untrained": {k: [round(v, 3) for v in d] for k, d in out.regions.items()},
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_before_mb": round(before, 1),
    }


def _write_case(folder: Path) -> None:
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (240, 240, 155)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for name in ("t1c", "flair"):
        nib.save(
            nib.Nifti1Image(rng.random(shape, dtype=np.float32) * 1000, affine),
            str(folder / f"{name}.nii.gz"),
        )
    label = np.zeros(shape, dtype=np.uint8)
    label[100:150, 90:150, 60:100] = 2
    label[115:135, 105:135, 70:90] = 4
    label[120:130, 112:128, 75:85] = 1
    nib.save(nib.Nifti1Image(label, affine), str(folder / "seg.nii.gz"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--child", choices=["train", "evaluate"], help=argparse.SUPPRESS)
    parser.add_argument("--case-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    results = {
        "shape": [240, 240, 155],
        "modalities": 2,
        "patch": args.patch,
        "overrides": args.overrides,
    }
    with tempfile.TemporaryDirectory() as tmp:
        _write_case(Path(tmp))
        for child in ("train", "evaluate"):
            cmd = [
                sys.executable,
                str(Path(__file__)),
                "--child",
                child,
                "--case-dir",
                tmp,
                "--patch",
                str(args.patch),
                "--steps",
                str(args.steps),
                "--overrides",
                *args.overrides,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            results[child] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{child}: {results[child]}", file=sys.stderr)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
