"""Benchmark: disk bytes per cached case, and its read time, by ``data.cache_dtype``.

A site's disk cache (``data.cache=disk``) keeps each preprocessed case in its state
folder. At BraTS size (two modalities of 240 x 240 x 155 at 1 mm plus a label map)
float32 costs about 100 MB a case. This writes one synthetic case of that size (random
intensities in float32, labels 0-4), fills the training and validation caches with
``cache_dtype`` float32 and float16, and prints JSON: MB on disk per case and split,
and the median time to read a cached case back.

    python scripts/bench_cache_size.py                       # 240x240x155, 2 modalities
    python scripts/bench_cache_size.py --shape 128 128 128 --modalities 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from fl_imaging.config import compose
from fl_imaging.data.loading import eval_loader, train_dataset
from fl_imaging.data.manifest import Case


def _write_case(root: Path, shape: tuple[int, ...], modalities: int) -> Case:
    rng = np.random.default_rng(0)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS at 1 mm, as BraTS ships it
    images = []
    for m in range(modalities):
        path = root / f"case_{m:04d}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random(shape, dtype=np.float32) * 1000, affine), str(path))
        images.append(path)
    label = np.zeros(shape, dtype=np.uint8)
    c = [s // 2 for s in shape]
    label[c[0] - 20 : c[0] + 20, c[1] - 20 : c[1] + 20, c[2] - 15 : c[2] + 15] = 2
    label[c[0] - 8 : c[0] + 8, c[1] - 8 : c[1] + 8, c[2] - 6 : c[2] + 6] = 4
    label[c[0] - 3 : c[0] + 3, c[1] - 3 : c[1] + 3, c[2] - 2 : c[2] + 2] = 1
    label_path = root / "case_label.nii.gz"
    nib.save(nib.Nifti1Image(label, affine), str(label_path))
    return Case("case", tuple(images), label_path, split="train")


def _megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    parser.add_argument("--modalities", type=int, default=2)
    parser.add_argument("--reads", type=int, default=5)
    args = parser.parse_args()
    shape = tuple(args.shape)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        case = _write_case(Path(tmp), shape, args.modalities)
        modalities = ",".join(f"m{i}" for i in range(args.modalities))
        for dtype in ("float32", "float16"):
            plan = compose(
                "demo",
                [
                    f"data.modalities=[{modalities}]",
                    "data.spacing=null",
                    f"data.cache_dtype={dtype}",
                    "data.memory_cache_mb=0",
                    "+data.labels={0: bg, 1: ncr, 2: ed, 4: et}",
                ],
            )
            cache = Path(tmp) / f"cache-{dtype}"
            train = train_dataset([case], plan.data, seed=0, cache_dir=cache / "train")
            train[0]  # fills the cache
            reads = []
            for _ in range(args.reads):
                start = time.perf_counter()
                train[0]
                reads.append(time.perf_counter() - start)
            for _ in eval_loader([case], plan.data, cache_dir=cache / "val"):
                pass
            results[dtype] = {
                "train_mb_per_case": round(_megabytes(cache / "train"), 1),
                "val_mb_per_case": round(_megabytes(cache / "val"), 1),
                "train_read_s_median": round(statistics.median(reads), 3),
            }
    print(json.dumps({"shape": list(shape), "modalities": args.modalities, **results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
