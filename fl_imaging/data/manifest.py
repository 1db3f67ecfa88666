"""Data manifests: which cases a site has, where their files are, what the labels mean.

The format is the Medical Segmentation Decathlon ``dataset.json`` layout with two
optional additions, so an MSD download works as it is::

    {
      "name": "hospital_a",
      "modality": {"0": "T1", "1": "FLAIR"},      # one entry per input channel
      "labels": {"0": "background", "1": "oedema", "2": "core"},
      "data_root": "..",                          # optional, relative to this file
      "training": [
        {"image": "imagesTr/a_000.nii.gz",        # 3D, or 4D with channels last
         "label": "labelsTr/a_000.nii.gz",
         "case": "a_000",                         # optional, default: file stem
         "split": "train",                        # optional: "train" or "val"
         "meta": {"scanner": "A"}},               # optional per-case metadata
        {"image": ["t1/a_001.nii.gz", "flair/a_001.nii.gz"],  # one 3D file per modality
         "label": "labelsTr/a_001.nii.gz"}
      ],
      "validation": [...]                         # optional, same entries, split "val"
    }

Relative paths are resolved against, in order: an explicit ``data_root`` argument
(a hospital decides where its data lives), the manifest's ``data_root`` field, the
manifest's own folder. When no case is marked for validation, a seeded fraction of
the cases is held out, so MSD files without a split still get a validation set.

Loading a manifest checks its structure; :func:`check_case` reads the NIfTI files
(with nibabel) and checks their content. Every error names the manifest, the case
and the file.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

TRAIN = "train"
VAL = "val"
_SPLIT_ALIASES = {"train": TRAIN, "training": TRAIN, "val": VAL, "validation": VAL}
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


class ManifestError(ValueError):
    """A manifest or one of its cases is invalid; the message names the file."""


@dataclass(frozen=True)
class Case:
    """One imaging case of a site.

    Attributes:
        case_id: unique name of the case within its manifest.
        images: one path (a 3D file, or a 4D file with channels last) or one 3D path
            per modality, in the manifest's modality order.
        label: path of the integer label map (3D, same spatial shape as the image).
        split: ``"train"`` or ``"val"``.
        meta: free-form per-case metadata from the manifest.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path
    split: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    def as_monai_dict(self) -> dict[str, Any]:
        """Return the ``{"image", "label", "case"}`` dict that MONAI dict transforms load."""
        image: str | list[str] = (
            str(self.images[0]) if len(self.images) == 1 else [str(p) for p in self.images]
        )
        return {"image": image, "label": str(self.label), "case": self.case_id}


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: the cases of one site plus the label and modality tables."""

    path: Path
    name: str
    modalities: tuple[str, ...]
    labels: Mapping[int, str]
    cases: tuple[Case, ...]

    @property
    def num_channels(self) -> int:
        """Number of input channels (one per modality)."""
        return len(self.modalities)

    @property
    def num_classes(self) -> int:
        """Number of output classes, background included."""
        return max(self.labels) + 1

    def split(self, name: str) -> list[Case]:
        """Cases of one split (``"train"`` or ``"val"``), in manifest order."""
        if name not in (TRAIN, VAL):
            raise ValueError(f"split must be '{TRAIN}' or '{VAL}', got {name!r}")
        return [c for c in self.cases if c.split == name]


def _case_id_from(path: str) -> str:
    name = Path(path).name
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _parse_table(raw: Any, key: str, where: str) -> dict[int, str]:
    if not isinstance(raw, Mapping) or not raw:
        raise ManifestError(f"{where}: '{key}' must be a non-empty mapping like {{\"0\": ...}}")
    table: dict[int, str] = {}
    for k, v in raw.items():
        try:
            table[int(k)] = str(v)
        except (TypeError, ValueError):
            raise ManifestError(f"{where}: '{key}' key {k!r} is not an integer") from None
    return table


def _resolve(base: Path, entry: str) -> Path:
    path = Path(entry).expanduser()
    return path if path.is_absolute() else (base / path)


def _parse_entry(
    entry: Any, index: int, default_split: str, base: Path, num_channels: int, where: str
) -> Case:
    if not isinstance(entry, Mapping) or "image" not in entry or "label" not in entry:
        raise ManifestError(f"{where}: entry {index} must be an object with 'image' and 'label'")
    raw_images = entry["image"]
    if isinstance(raw_images, str):
        images = (_resolve(base, raw_images),)
    elif (
        isinstance(raw_images, list) and raw_images and all(isinstance(p, str) for p in raw_images)
    ):
        images = tuple(_resolve(base, p) for p in raw_images)
        if len(images) != num_channels:
            raise ManifestError(
                f"{where}: entry {index} lists {len(images)} image files but 'modality' "
                f"declares {num_channels} channels"
            )
    else:
        raise ManifestError(
            f"{where}: entry {index} 'image' must be a path or a list of paths, got {raw_images!r}"
        )
    if not isinstance(entry["label"], str):
        raise ManifestError(f"{where}: entry {index} 'label' must be a path")
    first = raw_images if isinstance(raw_images, str) else raw_images[0]
    case_id = str(entry.get("case") or _case_id_from(first))
    raw_split = str(entry.get("split", default_split)).lower()
    if raw_split not in _SPLIT_ALIASES:
        raise ManifestError(
            f"{where}: case '{case_id}' has split {raw_split!r}; use 'train' or 'val'"
        )
    meta = entry.get("meta", {})
    if not isinstance(meta, Mapping):
        raise ManifestError(f"{where}: case '{case_id}' 'meta' must be an object")
    return Case(case_id, images, _resolve(base, entry["label"]), _SPLIT_ALIASES[raw_split], meta)


def hold_out(case_ids: Iterable[str], val_fraction: float, seed: int) -> set[str]:
    """Pick a seeded validation subset of ``case_ids`` (at least one when there are two or more).

    At least one case is always left for training. The choice depends only on the
    sorted ids, the fraction and the seed, so every process (server, client, CLI)
    derives the same split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(case_ids)
    if len(ids) < 2 or val_fraction == 0.0:
        return set()
    count = min(len(ids) - 1, max(1, round(len(ids) * val_fraction)))
    return set(random.Random(seed).sample(ids, count))


def load_manifest(
    path: str | Path,
    data_root: str | Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Manifest:
    """Read and structurally validate a manifest (no image is read here).

    Args:
        path: the manifest JSON file.
        data_root: folder that relative case paths are resolved against; overrides
            the manifest's own ``data_root``.
        val_fraction: fraction of cases held out for validation when the manifest
            marks none as ``"val"``.
        seed: seed of that hold-out.

    Raises:
        ManifestError: the file is missing, not JSON, or malformed; the message says which.
    """
    path = Path(path)
    where = str(path)
    raw = _read_json_object(path)
    modalities, labels = _parse_tables(raw, where)
    if data_root is not None:
        base = Path(data_root).expanduser()
    elif raw.get("data_root"):
        base = _resolve(path.parent, str(raw["data_root"]))
    else:
        base = path.parent

    entries = [(e, TRAIN) for e in raw.get("training") or []]
    entries += [(e, VAL) for e in raw.get("validation") or []]
    if not entries:
        raise ManifestError(f"{where}: manifest lists no cases ('training' is empty or missing)")
    cases = [
        _parse_entry(e, i, split, base, len(modalities), where)
        for i, (e, split) in enumerate(entries)
    ]
    seen: set[str] = set()
    for case in cases:
        if case.case_id in seen:
            raise ManifestError(f"{where}: case id '{case.case_id}' appears more than once")
        seen.add(case.case_id)

    if not any(c.split == VAL for c in cases):
        held = hold_out((c.case_id for c in cases), val_fraction, seed)
        cases = [
            Case(c.case_id, c.images, c.label, VAL if c.case_id in held else TRAIN, c.meta)
            for c in cases
        ]
    name = str(raw.get("name") or path.stem)
    return Manifest(path, name, modalities, labels, tuple(cases))


def _read_json_object(path: Path) -> Mapping[str, Any]:
    """The manifest file's top-level JSON object (ManifestError: missing, not JSON, not one)."""
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{path}: top level must be a JSON object")
    return raw


def _parse_tables(raw: Mapping[str, Any], where: str) -> tuple[tuple[str, ...], dict[int, str]]:
    """The manifest's modalities in channel order and its label table (value -> name)."""
    modalities_table = _parse_table(raw.get("modality"), "modality", where)
    if sorted(modalities_table) != list(range(len(modalities_table))):
        raise ManifestError(
            f"{where}: 'modality' keys must be 0..N-1, got {sorted(modalities_table)}"
        )
    labels = _parse_table(raw.get("labels"), "labels", where)
    if 0 not in labels or len(labels) < 2 or min(labels) < 0:
        raise ManifestError(
            f"{where}: 'labels' must declare 0 (background) and at least one foreground class"
        )
    return tuple(modalities_table[i] for i in range(len(modalities_table))), labels


@dataclass(frozen=True)
class CaseReport:
    """Outcome of reading one case: its spatial shape, spacing and any problems."""

    case_id: str
    shape: tuple[int, ...] | None
    spacing: tuple[float, ...] | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when the case has no problem."""
        return not self.problems


def _read(path: Path, role: str, case_id: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    if not path.is_file():
        raise ManifestError(f"case '{case_id}': {role} file not found: {path}")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise ManifestError(
            f"case '{case_id}': {role} file {path} is not a readable NIfTI "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return data, img


# Geometry tolerance: two files are on one voxel grid when their affines' linear parts
# (direction x spacing, in mm) and origins agree to within these (float32 headers)
AFFINE_TOLERANCE_MM = 1e-3
ORIGIN_TOLERANCE_MM = 1e-2


def geometry_mismatch(a: nib.Nifti1Image, b: nib.Nifti1Image) -> str | None:
    """How the voxel grids of two images differ (None: the same within tolerance).

    Compares the affines that map voxels to scanner millimetres: orientation codes,
    voxel spacing, direction and origin. Files saved by different tools with other
    orientations, spacings or origins would be resampled onto different grids.
    """
    fa, fb = np.asarray(a.affine, dtype=np.float64), np.asarray(b.affine, dtype=np.float64)
    linear = float(np.abs(fa[:3, :3] - fb[:3, :3]).max())
    origin = float(np.linalg.norm(fa[:3, 3] - fb[:3, 3]))
    if linear <= AFFINE_TOLERANCE_MM and origin <= ORIGIN_TOLERANCE_MM:
        return None
    parts = []
    codes = "".join(nib.aff2axcodes(fa)), "".join(nib.aff2axcodes(fb))
    if codes[0] != codes[1]:
        parts.append(f"orientation {codes[0]} vs {codes[1]}")
    zooms = np.sqrt((fa[:3, :3] ** 2).sum(axis=0)), np.sqrt((fb[:3, :3] ** 2).sum(axis=0))
    if float(np.abs(zooms[0] - zooms[1]).max()) > AFFINE_TOLERANCE_MM:
        parts.append(
            f"spacing {tuple(round(float(z), 4) for z in zooms[0])} vs "
            f"{tuple(round(float(z), 4) for z in zooms[1])} mm"
        )
    if origin > ORIGIN_TOLERANCE_MM:
        parts.append(f"origins {origin:.3g} mm apart")
    if not parts:
        parts.append(f"directions differ by up to {linear:.3g}")
    return ", ".join(parts)


def _image_shape(
    case: Case, num_channels: int
) -> tuple[tuple[int, ...], tuple[float, ...], nib.Nifti1Image]:
    """Read the image file(s) of ``case``; return spatial shape, spacing and the first image."""
    shapes = []
    images: list[tuple[Path, nib.Nifti1Image]] = []
    spacing: tuple[float, ...] = ()
    for path in case.images:
        data, img = _read(path, "image", case.case_id)
        if not np.issubdtype(data.dtype, np.number):
            raise ManifestError(f"case '{case.case_id}': image {path} has non-numeric voxels")
        if not np.all(np.isfinite(data)):
            raise ManifestError(
                f"case '{case.case_id}': image {path} contains non-finite intensities (NaN/Inf)"
            )
        if len(case.images) > 1 and data.ndim != 3:
            raise ManifestError(
                f"case '{case.case_id}': per-modality image {path} must be 3D, "
                f"has shape {data.shape}"
            )
        if len(case.images) == 1:
            expected = "3D" if num_channels == 1 else f"4D with {num_channels} channels last"
            if data.ndim == 3 and num_channels != 1:
                raise ManifestError(
                    f"case '{case.case_id}': image {path} is 3D but 'modality' declares "
                    f"{num_channels} channels (expected {expected})"
                )
            if data.ndim == 4 and data.shape[-1] != num_channels:
                raise ManifestError(
                    f"case '{case.case_id}': image {path} has {data.shape[-1]} channels "
                    f"(last axis of {data.shape}) but 'modality' declares {num_channels}"
                )
            if data.ndim not in (3, 4):
                raise ManifestError(
                    f"case '{case.case_id}': image {path} has shape {data.shape}; "
                    f"expected {expected}"
                )
        shapes.append((path, tuple(int(s) for s in data.shape[:3])))
        images.append((path, img))
        spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    first_path, first_shape = shapes[0]
    for path, shape in shapes[1:]:
        if shape != first_shape:
            raise ManifestError(
                f"case '{case.case_id}': modalities differ in shape: {first_path} is "
                f"{first_shape}, {path} is {shape}"
            )
    for path, img in images[1:]:
        mismatch = geometry_mismatch(images[0][1], img)
        if mismatch:
            raise ManifestError(
                f"case '{case.case_id}': modalities are not on one voxel grid: {first_path} "
                f"and {path} differ ({mismatch}); resample them onto one grid"
            )
    return first_shape, spacing, images[0][1]


def check_case(case: Case, manifest: Manifest) -> CaseReport:
    """Read a case's files and check them against the manifest.

    Checks: files exist and are readable NIfTI; the image has the declared number
    of channels; modalities and label share one spatial shape and one voxel grid
    (affine: orientation, spacing, origin; :func:`geometry_mismatch`); intensities
    are finite; label values are integers declared in ``labels``.
    """
    try:
        shape, spacing, image = _image_shape(case, manifest.num_channels)
        label, label_img = _read(case.label, "label", case.case_id)
        if label.ndim == 4 and label.shape[-1] == 1:
            label = label[..., 0]
        if tuple(label.shape) != shape:
            raise ManifestError(
                f"case '{case.case_id}': label {case.label} has shape {tuple(label.shape)} "
                f"but image {case.images[0]} has spatial shape {shape}"
            )
        mismatch = geometry_mismatch(image, label_img)
        if mismatch:
            raise ManifestError(
                f"case '{case.case_id}': label {case.label} and image {case.images[0]} are "
                f"not on one voxel grid ({mismatch}); after reorientation they would not "
                f"overlap. Save the label with the image's affine"
            )
        values = np.unique(label)
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise ManifestError(f"case '{case.case_id}': label {case.label} has non-integer values")
        undeclared = sorted(set(values.astype(np.int64).tolist()) - set(manifest.labels))
        if undeclared:
            raise ManifestError(
                f"case '{case.case_id}': label {case.label} contains values {undeclared} "
                f"not declared in 'labels' {sorted(manifest.labels)}"
            )
    except ManifestError as exc:
        return CaseReport(case.case_id, None, None, (f"{manifest.path}: {exc}",))
    return CaseReport(case.case_id, shape, spacing, ())


def check_manifest(manifest: Manifest) -> list[CaseReport]:
    """Check every case of ``manifest``; one report per case, problems included."""
    return [check_case(case, manifest) for case in manifest.cases]


def require_valid(manifest: Manifest, cases: Iterable[Case]) -> None:
    """Check ``cases`` and raise one :class:`ManifestError` listing every problem found."""
    problems = [p for case in cases for p in check_case(case, manifest).problems]
    if problems:
        raise ManifestError("\n".join(problems))


def write_manifest(
    path: str | Path,
    *,
    name: str,
    modalities: Iterable[str],
    labels: Mapping[int, str],
    entries: Iterable[Mapping[str, Any]],
    data_root: str | None = None,
    description: str = "",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a manifest in the documented format (atomically); return its path.

    ``entries`` are ``{"image", "label", "case", "split", "meta"}`` dicts with paths
    relative to ``data_root`` (or to the manifest's folder when it is ``None``).
    """
    path = Path(path)
    entries = list(entries)
    modalities = list(modalities)
    doc: dict[str, Any] = {
        "name": name,
        "description": description,
        "tensorImageSize": "4D" if len(modalities) > 1 else "3D",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "numTraining": len(entries),
    }
    if data_root is not None:
        doc["data_root"] = data_root
    doc.update(extra or {})
    doc["training"] = entries
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path
