"""MONAI dictionary transforms, datasets and loaders for one site's cases.

Preprocessing (identical at every site and at inference): load with nibabel,
channels first, RAS orientation, optional resampling to a common spacing,
per-image percentile clipping to [0, 1] (robust to uint8 and float encodings and
to extreme outliers). Training adds padding, a random patch, flips and mild
intensity jitter; validation keeps whole volumes (sliding-window inference).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapLabelValued,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import Dataset as TorchDataset

from fl_imaging.config import DataConfig
from fl_imaging.data.manifest import Case
from fl_imaging.data.regions import class_values, needs_remap

KEYS = ("image", "label")
# axis labels of nibabel's RAS+ world (what NIfTI affines map to)
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def preprocessing(
    data: DataConfig, keys: Sequence[str] = KEYS, *, track_meta: bool = False
) -> list[MapTransform]:
    """Deterministic transforms shared by training, validation and inference.

    Args:
        data: preprocessing settings.
        keys: ``("image", "label")`` for training/validation, ``("image",)`` for inference.
        track_meta: keep MONAI metadata (affine, applied operations) so that
            ``Invertd`` can map predictions back to the scan's own voxel grid.
    """
    low, high = data.intensity_percentiles
    keys = list(keys)
    steps: list[MapTransform] = [
        LoadImaged(keys=keys, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=_RAS_LABELS),
    ]
    if "label" in keys and needs_remap(data.labels):
        # label values with gaps (BraTS 2021: 0, 1, 2, 4) -> training classes 0 .. K-1
        values = class_values(data.labels)
        steps.append(
            MapLabelValued(keys="label", orig_labels=values, target_labels=range(len(values)))
        )
    if data.spacing is not None:
        modes = ["bilinear" if k == "image" else "nearest" for k in keys]
        steps.append(Spacingd(keys=keys, pixdim=tuple(data.spacing), mode=modes))
    steps += [
        ScaleIntensityRangePercentilesd(
            keys="image",
            lower=low,
            upper=high,
            b_min=0.0,
            b_max=1.0,
            clip=True,
            channel_wise=True,
        ),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=track_meta),
    ]
    return steps


class ToFloat32:
    """Cast cached ``image`` / ``label`` back to float32 (ends MONAI's cached part).

    Deliberately not a MONAI ``Transform``: Persistent/CacheDataset store the result
    of the transforms before the first random *or non-MONAI* one, so the cache keeps the
    compact dtypes and every use gets float32.
    """

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        """Return ``item`` with its image and label as float32 (metadata kept)."""
        return {k: (v.float() if k in KEYS and torch.is_tensor(v) else v) for k, v in item.items()}


def _compact(data: DataConfig) -> list[Any]:
    """What a site's cache stores (``data.cache_dtype``), then float32 for use.

    float16 keeps the [0, 1]-scaled intensities to about 5e-4 and the labels as uint8:
    a third of the float32 bytes for one image and its label.
    """
    if data.cache_dtype == "float32":
        return []
    label_dtype = torch.uint8 if max(data.labels, default=0) < 256 else torch.int16
    return [CastToTyped(keys=list(KEYS), dtype=[torch.float16, label_dtype]), ToFloat32()]


def train_transforms(data: DataConfig, views: int = 1) -> Compose:
    """Preprocessing plus padding to ``patch_size``, a random patch and light augmentation.

    Patches are centred on foreground twice as often as on background, which
    matters when lesions are small compared with the volume. ``views``: random
    patches (each with its own flips and intensity changes) drawn per case and access.
    ``data.augment`` false: the random patch only, no flips or intensity changes.
    """
    patch = tuple(data.patch_size)
    steps = [
        *preprocessing(data),
        SpatialPadd(keys=list(KEYS), spatial_size=patch),
        *_compact(data),
        RandCropByPosNegLabeld(
            keys=list(KEYS),
            label_key="label",
            spatial_size=patch,
            pos=2,
            neg=1,
            num_samples=views,
        ),
    ]
    if data.augment:
        steps += [
            *[RandFlipd(keys=list(KEYS), prob=0.5, spatial_axis=axis) for axis in data.flip_axes],
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    return Compose(steps)


def eval_transforms(data: DataConfig) -> Compose:
    """Preprocessing only: whole volumes for sliding-window evaluation."""
    return Compose([*preprocessing(data), *_compact(data)])


# bump when the preprocessing code changes meaning, so that old disk caches are not reused
_CACHE_VERSION = 2


def preprocessing_key(data: DataConfig, split: str) -> str:
    """Short hash of every setting that shapes the cached (deterministic) preprocessing.

    The disk cache of a split lives in a folder named after it, so changing the
    spacing, intensity percentiles, patch size or modalities never reuses stale volumes.
    """
    settings = {
        "version": _CACHE_VERSION,
        "split": split,
        "modalities": list(data.modalities),
        "spacing": None if data.spacing is None else list(data.spacing),
        "intensity_percentiles": list(data.intensity_percentiles),
        "patch_size": list(data.patch_size) if split == "train" else None,
        "cache_dtype": data.cache_dtype,
        "label_values": class_values(data.labels) if needs_remap(data.labels) else None,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _case_hash(item: Mapping[str, Any]) -> bytes:
    """Cache key of one case: its file paths plus their size and modification time.

    MONAI's default key hashes only the paths; a scan replaced in place would then be
    served from a stale cache.
    """
    files: list[Any] = [str(item.get("case", ""))]
    for key in KEYS:
        paths = item.get(key, [])
        for path in paths if isinstance(paths, list) else [paths]:
            stat = os.stat(path)
            files.append([key, str(path), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(files).encode()).hexdigest().encode()


class ProcessMemory:
    """Preprocessed cases kept in this process's memory, least recently used out first.

    One per process, shared by every site that this process trains (a simulation
    worker trains many sites, round after round), bounded in bytes.
    """

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Any | None:
        """The stored item for ``key`` (not a copy), or None."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            self._items.move_to_end(key)
            return entry[0]

    def put(self, key: str, item: Any, limit_bytes: int) -> None:
        """Keep ``item``, dropping the least recently used ones beyond ``limit_bytes``."""
        size = _nbytes(item)
        if size > limit_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (item, size)
            self.nbytes += size
            while self.nbytes > limit_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.nbytes -= dropped

    def clear(self) -> None:
        """Forget every item."""
        with self._lock:
            self._items.clear()
            self.nbytes = 0


PROCESS_MEMORY = ProcessMemory()


def _nbytes(item: Any) -> int:
    """Bytes held by the tensors and arrays of a preprocessed case."""
    if isinstance(item, Mapping):
        return sum(_nbytes(v) for v in item.values())
    if isinstance(item, list | tuple):
        return sum(_nbytes(v) for v in item)
    return int(getattr(item, "nbytes", 0))


class MemoryBackedPersistentDataset(PersistentDataset):
    """MONAI ``PersistentDataset`` whose loaded cases also stay in :data:`PROCESS_MEMORY`.

    A case is looked up in memory first, then in the disk cache, and only then read
    and preprocessed. Keys are MONAI's cache keys (the case's files with their size
    and modification time) plus the cache folder (named after the preprocessing), so
    a changed scan or setting is never served from memory. Random transforms work on
    a copy, as in MONAI's ``CacheDataset``.
    """

    def __init__(self, *args: Any, memory_limit_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.memory_limit_bytes = memory_limit_bytes

    def _cachecheck(self, item_transformed: Any) -> Any:
        key = f"{self.cache_dir}/{self.hash_func(item_transformed).decode()}{self.transform_hash}"
        kept = PROCESS_MEMORY.get(key)
        if kept is None:
            kept = super()._cachecheck(item_transformed)
            PROCESS_MEMORY.put(key, kept, self.memory_limit_bytes)
        return deepcopy(kept)


def _dataset(
    cases: Sequence[Case], transform: Compose, cache_dir: Path | None, memory_mb: int = 0
) -> Dataset:
    """Preprocessed cases: cached on disk in ``cache_dir`` when given, else in memory.

    The disk cache (MONAI ``PersistentDataset``) keeps the deterministic part of
    ``transform`` across rounds and runs, so a site reads and resamples its NIfTI files
    once; random augmentation is still drawn per access. It stays in the site's state
    folder, on the site's own disk. With ``memory_mb`` > 0 the cases read from it also
    stay in this process's memory (:class:`MemoryBackedPersistentDataset`).
    """
    items = [c.as_monai_dict() for c in cases]
    if cache_dir is None:
        return CacheDataset(
            items, transform=transform, cache_rate=1.0, num_workers=0, progress=False
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    if memory_mb > 0:
        return MemoryBackedPersistentDataset(
            items,
            transform=transform,
            cache_dir=cache_dir,
            hash_func=_case_hash,
            memory_limit_bytes=memory_mb * 2**20,
        )
    return PersistentDataset(items, transform=transform, cache_dir=cache_dir, hash_func=_case_hash)


def train_dataset(
    cases: Sequence[Case],
    data: DataConfig,
    *,
    seed: int,
    cache_dir: Path | None = None,
    views: int = 1,
) -> Dataset:
    """Training cases, preprocessing cached (disk or memory), ``views`` random patches each."""
    if not cases:
        raise ValueError("no training cases")
    transform = train_transforms(data, views)
    transform.set_random_state(seed=seed)
    return _dataset(cases, transform, cache_dir, data.memory_cache_mb)


def train_loader(
    cases: Sequence[Case],
    data: DataConfig,
    *,
    batch_size: int,
    seed: int,
    cache_dir: Path | None = None,
) -> DataLoader:
    """Shuffled loader of random training patches ``[B, C, *patch_size]``.

    The deterministic preprocessing is cached (in ``cache_dir`` across rounds, else in
    memory for the loader's lifetime), the random part is redrawn per epoch from ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        train_dataset(cases, data, seed=seed, cache_dir=cache_dir),
        batch_size=batch_size,
        shuffle=True,
        num_workers=0,
        generator=generator,
        drop_last=False,
    )


class ImageLabelPairs(TorchDataset):
    """``(image, label)`` tuples of a MONAI training dataset (what Opacus' loader handles).

    With ``views`` > 1 each item is one case's ``views`` augmented patches stacked,
    ``[views, C, *patch]``: they stay together in one row of a batch, so DP-SGD can
    treat them as one patient (augmentation multiplicity).
    """

    def __init__(self, dataset: Dataset, views: int = 1) -> None:
        self.dataset = dataset
        self.views = views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.dataset[index]
        patches = item if isinstance(item, list) else [item]  # patch samplers give lists
        if self.views == 1:
            return patches[0]["image"], patches[0]["label"]
        if len(patches) != self.views:
            raise ValueError(f"expected {self.views} views of case {index}, got {len(patches)}")
        return (
            torch.stack([torch.as_tensor(p["image"]) for p in patches]),
            torch.stack([torch.as_tensor(p["label"]) for p in patches]),
        )


def private_train_loader(
    cases: Sequence[Case],
    data: DataConfig,
    *,
    batch_size: int,
    seed: int,
    cache_dir: Path | None = None,
    views: int = 1,
) -> TorchDataLoader:
    """A plain loader of ``(image, label)`` patches for Opacus to turn into Poisson sampling.

    ``views`` > 1: each row holds that many augmented patches of one case
    (``[B, views, C, *patch]``, :class:`ImageLabelPairs`).

    ``len(loader)`` is the number of steps per epoch and ``1 / len(loader)`` the
    sampling rate Opacus will use; plan privacy with exactly these. ``seed`` seeds the
    augmentation only: which patients each step samples is drawn by DP-SGD from a
    secret generator (:func:`fl_imaging.privacy.dp_sgd.with_secret_sampling`).
    """
    return TorchDataLoader(
        ImageLabelPairs(
            train_dataset(cases, data, seed=seed, cache_dir=cache_dir, views=views), views
        ),
        batch_size=batch_size,
        shuffle=True,
        num_workers=0,
    )


def eval_loader(
    cases: Sequence[Case], data: DataConfig, *, cache_dir: Path | None = None
) -> DataLoader:
    """Loader of whole preprocessed volumes, one case per batch (shapes differ)."""
    if not cases:
        raise ValueError("no validation cases")
    dataset = _dataset(cases, eval_transforms(data), cache_dir, data.memory_cache_mb)
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)
