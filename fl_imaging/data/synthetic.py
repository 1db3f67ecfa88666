"""Synthetic "virtual hospitals": deterministic BraTS-like NIfTI cases with per-site scanners.

Each site gets a scanner (:class:`ScannerProfile`: voxel spacing, intensity scale and
offset, noise, bias field, on-disk dtype) and a skewed number of cases. Every case is a
head-like ellipsoid (scalp, skull, textured brain) with one tumour: an irregular oedema
blob (label 1) around an irregular core (label 2) that never touches the background.
Anatomy is defined in millimetres, so a site with finer voxels sees the same heads at a
higher resolution. The layout written per site is the MSD one::

    out_dir/hospital_a/imagesTr/hospital_a_000.nii.gz   # 3D, or 4D with channels last
    out_dir/hospital_a/labelsTr/hospital_a_000.nii.gz   # uint8, values {0, 1, 2}
    out_dir/hospital_a/dataset.json                     # manifest, paths relative to it

With ``modality_layout="files"`` each modality is one 3D file in
``imagesTr/<modality>/`` and the manifest's ``"image"`` is a list.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from fl_imaging.data.manifest import TRAIN, VAL, write_manifest

logger = logging.getLogger(__name__)

SITE_PREFIX = "hospital_"
LABELS: dict[int, str] = {0: "background", 1: "oedema", 2: "core"}
# label conventions (fl_imaging.data.regions.SCHEMES): the manifest's labels, and the value of
# each tumour compartment: oedema (outside the core), the core's necrotic inside, and
# its enhancing rim (one voxel thick, bright in T1c)
SCHEME_LABELS: dict[str, tuple[dict[int, str], dict[str, int]]] = {
    "exclusive": (LABELS, {"oedema": 1, "necrosis": 2, "rim": 2}),
    "brats2021": (
        {0: "background", 1: "necrosis", 2: "oedema", 4: "enhancing"},
        {"oedema": 2, "necrosis": 1, "rim": 4},
    ),
    "brats2023": (
        {0: "background", 1: "necrosis", 2: "oedema", 3: "enhancing"},
        {"oedema": 2, "necrosis": 1, "rim": 3},
    ),
    "msd_task01": (
        {0: "background", 1: "oedema", 2: "non_enhancing", 3: "enhancing"},
        {"oedema": 1, "necrosis": 2, "rim": 3},
    ),
}
MIN_CASES_PER_SITE = 4
MANIFEST_NAME = "dataset.json"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
MODALITY_LAYOUTS = ("4d", "files")
DTYPES = ("uint8", "int16", "float32")

# Clean intensities per tissue, before the scanner is applied. Single-modality "T1"
# separates all classes by itself; "T1c" (enhancing rim) and "FLAIR"/"T2" (bright
# oedema) are meant to be combined, as in BraTS.
_TISSUES = ("background", "scalp", "skull", "brain", "oedema", "core", "rim")
_CONTRASTS: dict[str, tuple[float, ...]] = {
    "t1": (0.0, 0.35, 0.08, 0.5, 0.8, 0.25, 0.25),
    "t1c": (0.0, 0.35, 0.08, 0.5, 0.45, 0.25, 0.95),
    "t2": (0.0, 0.3, 0.05, 0.45, 0.85, 0.95, 0.7),
    "flair": (0.0, 0.3, 0.05, 0.4, 0.85, 0.6, 0.6),
}
_CONTRAST_ALIASES = {"t1gd": "t1c", "t1ce": "t1c", "t1-gd": "t1c", "t1w": "t1", "t2w": "t2"}
# Oedema-minus-brain difference of "T1": the unit of ScannerProfile.noise_std.
_TISSUE_CONTRAST = 0.3
_MIN_CORE_VOXELS = 6
_MIN_OEDEMA_VOXELS = 12
_MAX_TUMOUR_ATTEMPTS = 50
# Seed-stream tags keep the case, split and profile random streams independent.
_STREAM_CASE, _STREAM_SPLIT, _STREAM_PROFILE, _STREAM_COUNTS = 1, 2, 3, 4
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def site_name(index: int) -> str:
    """Name of site ``index`` (0-based): ``hospital_a`` ... ``hospital_z``, ``hospital_aa``, ...

    Raises:
        ValueError: ``index`` is negative.

    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    letters = ""
    n = index + 1
    while n:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return SITE_PREFIX + letters


SITE_NAMES: tuple[str, ...] = tuple(site_name(i) for i in range(26))


@dataclass(frozen=True)
class ScannerProfile:
    """Acquisition differences of one hospital's scanner.

    Attributes:
        spacing_mm: voxel size (x, y, z) in mm; may be anisotropic.
        intensity_scale: multiplies the clean intensities (brain ~0.5, oedema ~0.8).
        intensity_offset: added after scaling, in on-disk units.
        noise_std: standard deviation of the (Rician) noise, relative to the
            oedema/brain contrast of 0.3 clean units.
        bias_field_strength: amplitude in [0, 1) of a smooth multiplicative field
            ``1 + strength * f``, ``f`` in [-1, 1].
        dtype: on-disk encoding, ``"uint8"``, ``"int16"`` or ``"float32"``; integer
            encodings are rounded and clipped to the dtype's range (0..255 for uint8).

    """

    spacing_mm: tuple[float, float, float]
    intensity_scale: float
    intensity_offset: float
    noise_std: float
    bias_field_strength: float
    dtype: str

    def __post_init__(self) -> None:
        if len(self.spacing_mm) != 3 or any(not s > 0 for s in self.spacing_mm):
            raise ValueError(f"spacing_mm must be three positive mm values, got {self.spacing_mm}")
        if not self.intensity_scale > 0:
            raise ValueError(f"intensity_scale must be > 0, got {self.intensity_scale}")
        if not self.noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if not 0 <= self.bias_field_strength < 1:
            raise ValueError(
                f"bias_field_strength must be in [0, 1), got {self.bias_field_strength}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    def as_meta(self) -> dict[str, Any]:
        """Profile values as JSON-ready manifest metadata."""
        meta = asdict(self)
        meta["spacing_mm"] = [float(s) for s in self.spacing_mm]
        return meta


# Reference scanners of the first three sites: a clean 8-bit export, a float scanner
# with a large scale, and a noisy anisotropic int16 one.
_REFERENCE_PROFILES = (
    ScannerProfile((2.0, 2.0, 2.0), 200.0, 0.0, 0.1, 0.05, "uint8"),
    ScannerProfile((1.75, 1.75, 1.75), 800.0, 150.0, 0.25, 0.15, "float32"),
    ScannerProfile((2.0, 2.0, 2.5), 1000.0, -100.0, 0.4, 0.3, "int16"),
)


def default_profiles(num_sites: int, seed: int) -> list[ScannerProfile]:
    """Scanner profiles for ``num_sites`` sites, in site order.

    The first three are fixed reference scanners (see module constants); further sites
    are drawn from ``seed`` (spacing 1.5-2.5 mm, sometimes anisotropic in z, dtype
    cycling through uint8/float32/int16).

    Raises:
        ValueError: ``num_sites`` < 1 or ``seed`` < 0.

    """
    _check_count("num_sites", num_sites, 1)
    _check_seed(seed)
    profiles = list(_REFERENCE_PROFILES[:num_sites])
    for index in range(len(profiles), num_sites):
        rng = np.random.default_rng([seed, _STREAM_PROFILE, index])
        iso = float(rng.choice([1.5, 1.75, 2.0, 2.25, 2.5]))
        z = iso * 1.25 if rng.random() < 0.3 else iso
        dtype = ("uint8", "float32", "int16")[index % 3]
        if dtype == "uint8":
            scale, offset = rng.uniform(150, 220), rng.uniform(0, 20)
        elif dtype == "float32":
            scale, offset = float(np.exp(rng.uniform(0, np.log(2000)))), rng.uniform(-100, 300)
        else:
            scale, offset = rng.uniform(300, 3000), rng.uniform(-500, 500)
        profiles.append(
            ScannerProfile(
                spacing_mm=(iso, iso, z),
                intensity_scale=round(float(scale), 3),
                intensity_offset=round(float(offset), 3),
                noise_std=round(float(rng.uniform(0.05, 0.4)), 3),
                bias_field_strength=round(float(rng.uniform(0.0, 0.35)), 3),
                dtype=dtype,
            )
        )
    return profiles


def site_case_counts(num_sites: int, total_cases: int, skew: float, seed: int) -> list[int]:
    """Return the number of cases per site: at least 4 each, summing to ``total_cases``.

    The cases beyond the minimum are shared with geometric weights ``(1 - skew)**rank``;
    ``seed`` decides which site gets which rank. ``skew=0`` gives (near-)equal sites.

    Raises:
        ValueError: ``num_sites`` < 1, ``total_cases`` < 4 * ``num_sites``, ``skew``
            outside [0, 1) or ``seed`` < 0.

    """
    _check_count("num_sites", num_sites, 1)
    _check_seed(seed)
    if total_cases < MIN_CASES_PER_SITE * num_sites:
        raise ValueError(
            f"total_cases must be >= {MIN_CASES_PER_SITE} * num_sites = "
            f"{MIN_CASES_PER_SITE * num_sites}, got {total_cases}"
        )
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1), got {skew}")
    ranks = np.random.default_rng([seed, _STREAM_COUNTS]).permutation(num_sites)
    weights = (1.0 - skew) ** ranks.astype(np.float64)
    extra = total_cases - MIN_CASES_PER_SITE * num_sites
    shares = extra * weights / weights.sum()
    counts = np.floor(shares).astype(np.int64)
    # Largest remainders first; ties go to the better-ranked site, so the result is stable.
    order = sorted(range(num_sites), key=lambda i: (-(shares[i] - counts[i]), ranks[i]))
    for i in order[: extra - int(counts.sum())]:
        counts[i] += 1
    return [MIN_CASES_PER_SITE + int(c) for c in counts]


def site_shape(fov_mm: float, spacing_mm: Sequence[float]) -> tuple[int, int, int]:
    """Voxel grid of a site: ``round(fov_mm / spacing)`` per axis."""
    shape = tuple(max(1, round(fov_mm / s)) for s in spacing_mm)
    return shape[0], shape[1], shape[2]


def site_affine(shape: Sequence[int], spacing_mm: Sequence[float]) -> np.ndarray:
    """RAS voxel-to-mm affine, (4, 4): diagonal spacing, volume centre at the origin."""
    affine = np.diag([*map(float, spacing_mm), 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing_mm, strict=True)]
    return affine


def generate_federation(
    out_dir: str | Path,
    *,
    num_sites: int = 3,
    total_cases: int = 36,
    skew: float = 0.5,
    fov_mm: float = 64.0,
    modalities: Sequence[str] = ("T1",),
    val_fraction: float = 0.25,
    seed: int = 0,
    overwrite: bool = False,
    modality_layout: str = "4d",
    label_scheme: str = "exclusive",
) -> list[Path]:
    """Write ``num_sites`` synthetic hospitals under ``out_dir``; return their manifests.

    The same arguments always give the same voxel arrays and manifests.

    Args:
        out_dir: parent folder; site ``i`` is written to ``out_dir/site_name(i)``.
        num_sites: number of hospitals.
        total_cases: cases over all sites, shared by :func:`site_case_counts`.
        skew: size skew in [0, 1) between sites (0: equal sizes).
        fov_mm: edge of the cubic field of view in mm (shape: ``round(fov_mm / spacing)``).
        modalities: input channels, from T1, T1c (T1Gd, T1CE), T2, FLAIR (any case).
        val_fraction: fraction of each site's cases marked ``"val"`` (at least 1 val
            and 2 train cases per site).
        seed: non-negative seed of everything random.
        overwrite: replace the generator's outputs in existing site folders instead of
            refusing to write into a non-empty site folder.
        modality_layout: ``"4d"`` (one image file per case, channels last) or ``"files"``
            (one 3D file per modality in ``imagesTr/<modality>/``).
        label_scheme: ``"exclusive"`` (1 oedema, 2 core) or a tumour convention of
            :data:`SCHEME_LABELS` (e.g. ``brats2021``); the images are the same either way.

    Returns:
        The manifest paths (``out_dir/<site>/dataset.json``), in site order.

    Raises:
        ValueError: an argument is out of range (the message names it).
        FileExistsError: a site folder is not empty and ``overwrite`` is False.
    """
    _check_arguments(total_cases, fov_mm, val_fraction, modality_layout, label_scheme)
    contrasts = _contrasts_for(modalities)
    counts = site_case_counts(num_sites, total_cases, skew, seed)
    profiles = default_profiles(num_sites, seed)

    out_dir = Path(out_dir)
    sites = [site_name(i) for i in range(num_sites)]
    if not overwrite:
        _check_empty(out_dir, sites)

    manifests = []
    for index, (site, profile, count) in enumerate(zip(sites, profiles, counts, strict=True)):
        manifests.append(
            _write_site(
                out_dir / site,
                site=site,
                site_index=index,
                profile=profile,
                num_cases=count,
                fov_mm=fov_mm,
                modalities=list(modalities),
                contrasts=contrasts,
                val_fraction=val_fraction,
                seed=seed,
                layout=modality_layout,
                label_scheme=label_scheme,
            )
        )
    return manifests


def _check_arguments(
    total_cases: int, fov_mm: float, val_fraction: float, modality_layout: str, label_scheme: str
) -> None:
    """Raise ValueError naming the first of :func:`generate_federation`'s arguments out of range."""
    _check_count("total_cases", total_cases, 1)
    if not fov_mm > 0:
        raise ValueError(f"fov_mm must be > 0, got {fov_mm}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if modality_layout not in MODALITY_LAYOUTS:
        raise ValueError(
            f"modality_layout must be one of {MODALITY_LAYOUTS}, got {modality_layout!r}"
        )
    if label_scheme not in SCHEME_LABELS:
        raise ValueError(
            f"label_scheme must be one of {sorted(SCHEME_LABELS)}, got {label_scheme!r}"
        )


def _check_empty(out_dir: Path, sites: Sequence[str]) -> None:
    """Refuse to write into a site folder that holds anything (FileExistsError)."""
    for site in sites:
        folder = out_dir / site
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(
                f"site folder {folder} is not empty; pass overwrite=True or choose another out_dir"
            )


def _check_count(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _contrasts_for(modalities: Sequence[str]) -> list[tuple[float, ...]]:
    if isinstance(modalities, str) or not modalities:
        raise ValueError(f"modalities must be a non-empty sequence of names, got {modalities!r}")
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities must be unique, got {list(modalities)}")
    contrasts = []
    for name in modalities:
        key = str(name).lower()
        key = _CONTRAST_ALIASES.get(key, key)
        if key not in _CONTRASTS or not _SAFE_NAME.match(name):
            raise ValueError(
                f"modalities: unknown modality {name!r}; use T1, T1c, T2 or FLAIR "
                f"(aliases: {sorted(_CONTRAST_ALIASES)})"
            )
        contrasts.append(_CONTRASTS[key])
    return contrasts


def _write_site(
    folder: Path,
    *,
    site: str,
    site_index: int,
    profile: ScannerProfile,
    num_cases: int,
    fov_mm: float,
    modalities: list[str],
    contrasts: list[tuple[float, ...]],
    val_fraction: float,
    seed: int,
    layout: str,
    label_scheme: str = "exclusive",
) -> Path:
    """Write one hospital's cases and then its manifest into ``folder``."""
    # The manifest goes first and comes back last, so a crash never leaves a manifest
    # that lists files of another run.
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    for sub in (IMAGES_DIR, LABELS_DIR):
        shutil.rmtree(folder / sub, ignore_errors=True)
    shape = site_shape(fov_mm, profile.spacing_mm)
    affine = site_affine(shape, profile.spacing_mm)
    coords = [
        (np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, profile.spacing_mm, strict=True)
    ]
    val_cases = _validation_cases(num_cases, val_fraction, seed, site_index)
    entries = []
    for case_index in range(num_cases):
        case = f"{site}_{case_index:03d}"
        rng = np.random.default_rng([seed, _STREAM_CASE, site_index, case_index])
        channels, label = _simulate_case(
            rng, coords, fov_mm, profile, contrasts, SCHEME_LABELS[label_scheme][1]
        )
        file_name = f"{case}.nii.gz"
        entry = {
            "image": _save_channels(folder, file_name, channels, modalities, affine, layout),
            "label": f"{LABELS_DIR}/{file_name}",
            "case": case,
            "split": VAL if case_index in val_cases else TRAIN,
            "meta": {"site": site, **profile.as_meta()},
        }
        _save_nifti(folder / entry["label"], label, affine)
        entries.append(entry)
    generator = {"seed": seed, "fov_mm": fov_mm, "shape": list(shape), "label_scheme": label_scheme}
    path = write_manifest(
        folder / MANIFEST_NAME,
        name=site,
        modalities=modalities,
        labels=SCHEME_LABELS[label_scheme][0],
        entries=entries,
        description=f"synthetic BraTS-like hospital {site} (fl_imaging.data.synthetic)",
        extra={"generator": generator},
    )
    logger.info(
        "%s: wrote %d cases (%d train, %d val), shape %s, spacing %s mm, %s, modalities %s",
        *(site, num_cases, num_cases - len(val_cases), len(val_cases), shape),
        *(profile.spacing_mm, profile.dtype, modalities),
    )
    return path


def _validation_cases(num_cases: int, val_fraction: float, seed: int, site_index: int) -> set[int]:
    """The indices of a site's validation cases (at least 1, leaving at least 2 to train)."""
    num_val = min(max(1, round(num_cases * val_fraction)), num_cases - 2)
    split_rng = np.random.default_rng([seed, _STREAM_SPLIT, site_index])
    return set(split_rng.choice(num_cases, size=num_val, replace=False).tolist())


def _save_channels(
    folder: Path,
    file_name: str,
    channels: list[np.ndarray],
    modalities: list[str],
    affine: np.ndarray,
    layout: str,
) -> str | list[str]:
    """Save a case's image: one 3D/4D file (``4d``) or one file per modality (``files``).

    Returns the manifest's ``image`` entry (paths relative to ``folder``).
    """
    if layout == "files":
        paths = []
        for modality, channel in zip(modalities, channels, strict=True):
            rel = f"{IMAGES_DIR}/{modality}/{file_name}"
            _save_nifti(folder / rel, channel, affine)
            paths.append(rel)
        return paths
    rel = f"{IMAGES_DIR}/{file_name}"
    data = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
    _save_nifti(folder / rel, data, affine)
    return rel


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Save atomically: write a hidden temp file in the same folder, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    tmp = path.with_name(f".tmp-{path.name}")  # keeps the .nii.gz suffix nibabel needs
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _smooth_noise(
    rng: np.random.Generator, coords: Sequence[np.ndarray], fov_mm: float, grid: int
) -> np.ndarray:
    """Smooth random field on the voxel grid, (X, Y, Z), scaled to max |value| = 1.

    A ``grid**3`` lattice of Gaussian values spanning the field of view is trilinearly
    interpolated at the voxel centres (in mm), so the field is the same anatomy at any
    spacing.
    """
    lattice = rng.standard_normal((grid, grid, grid))
    weights = []
    for c in coords:
        pos = np.clip((c / fov_mm + 0.5) * (grid - 1), 0, grid - 1)
        low = np.minimum(np.floor(pos).astype(np.int64), grid - 2)
        frac = pos - low
        w = np.zeros((len(c), grid))
        w[np.arange(len(c)), low] = 1.0 - frac
        w[np.arange(len(c)), low + 1] = frac
        weights.append(w)
    field = np.einsum("ia,jb,kc,abc->ijk", *weights, lattice, optimize=True)
    return field / max(float(np.abs(field).max()), 1e-12)


def _ellipsoid_distance(
    coords: Sequence[np.ndarray], centre: np.ndarray, axes: np.ndarray
) -> np.ndarray:
    """Normalised distance ``|(x - centre) / axes|`` (1 on the ellipsoid surface), (X, Y, Z)."""
    x, y, z = ((c - m) / a for c, m, a in zip(coords, centre, axes, strict=True))
    return np.sqrt(x[:, None, None] ** 2 + y[None, :, None] ** 2 + z[None, None, :] ** 2)


def _simulate_case(
    rng: np.random.Generator,
    coords: Sequence[np.ndarray],
    fov_mm: float,
    profile: ScannerProfile,
    contrasts: list[tuple[float, ...]],
    values: dict[str, int] | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """One case: encoded channel arrays, each (X, Y, Z), and the uint8 label (X, Y, Z).

    ``values``: the label value of each compartment (``oedema``, ``necrosis``, ``rim``;
    default :data:`LABELS`' 1 oedema, 2 core).
    """
    values = values or SCHEME_LABELS["exclusive"][1]
    head_axes = fov_mm * np.array([0.42, 0.46, 0.40]) * rng.uniform(0.95, 1.03, 3)
    head_centre = rng.uniform(-0.03, 0.03, 3) * fov_mm
    head_d = _ellipsoid_distance(coords, head_centre, head_axes)
    head_d = head_d + 0.03 * _smooth_noise(rng, coords, fov_mm, 5)
    head = head_d < 1.0
    inner = _ellipsoid_distance(coords, head_centre, head_axes - 0.04 * fov_mm) < 1.0
    brain_axes = head_axes - 0.1 * fov_mm
    brain = (_ellipsoid_distance(coords, head_centre, brain_axes) < 1.0) & head

    oedema, core = _simulate_tumour(rng, coords, fov_mm, profile, head_centre, brain_axes, brain)
    rim = core & ~ndimage.binary_erosion(core)

    tissue = np.zeros(head.shape, dtype=np.int64)  # indices into _TISSUES
    tissue[head] = 1
    tissue[inner] = 2
    tissue[brain] = 3
    tissue[oedema] = 4
    tissue[core] = 5
    tissue[rim] = 6
    texture = 1.0 + 0.05 * _smooth_noise(rng, coords, fov_mm, 9)
    bias = 1.0 + profile.bias_field_strength * _smooth_noise(rng, coords, fov_mm, 3)
    sigma = profile.noise_std * _TISSUE_CONTRAST

    channels = []
    for contrast in contrasts:
        clean = np.asarray(contrast)[tissue] * texture
        clean = ndimage.gaussian_filter(clean, sigma=0.5)  # partial-volume blur
        signal = clean * bias
        # Rician magnitude noise: the background stays positive, as in MR magnitude images.
        noisy = np.hypot(
            signal + sigma * rng.standard_normal(signal.shape),
            sigma * rng.standard_normal(signal.shape),
        )
        channels.append(
            _encode(noisy * profile.intensity_scale + profile.intensity_offset, profile)
        )
    label = np.zeros(head.shape, dtype=np.uint8)
    label[oedema] = values["oedema"]
    label[core] = values["necrosis"]
    label[rim] = values["rim"]
    return channels, label


def _simulate_tumour(
    rng: np.random.Generator,
    coords: Sequence[np.ndarray],
    fov_mm: float,
    profile: ScannerProfile,
    head_centre: np.ndarray,
    brain_axes: np.ndarray,
    brain: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Masks (X, Y, Z) of the oedema (core included) and of the core.

    The core is cut by the oedema eroded with a full 3x3x3 cube, so every core voxel's
    26 neighbours are tumour. Redraws until both classes have enough voxels.
    """
    cube = np.ones((3, 3, 3), dtype=bool)
    min_core_mm = 1.5 * max(profile.spacing_mm)
    for _ in range(_MAX_TUMOUR_ATTEMPTS):
        r_oedema = rng.uniform(0.15, 0.25) * fov_mm
        r_core = max(rng.uniform(0.4, 0.6) * r_oedema, min_core_mm)
        r_oedema = max(r_oedema, r_core / 0.6)
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        centre = head_centre + direction * rng.uniform(0.0, 1.0) ** (1 / 3) * 0.45 * brain_axes
        oedema_d = _ellipsoid_distance(coords, centre, r_oedema * rng.uniform(0.8, 1.2, 3))
        oedema = (oedema_d < 1.0 + 0.3 * _smooth_noise(rng, coords, fov_mm, 6)) & brain
        oedema = ndimage.binary_fill_holes(oedema)

        shift = rng.uniform(-1.0, 1.0, 3) * 0.25 * (r_oedema - r_core)
        core_d = _ellipsoid_distance(coords, centre + shift, r_core * rng.uniform(0.85, 1.15, 3))
        core = core_d < 1.0 + 0.25 * _smooth_noise(rng, coords, fov_mm, 6)
        core &= ndimage.binary_erosion(oedema, structure=cube)
        if core.sum() >= _MIN_CORE_VOXELS and (oedema & ~core).sum() >= _MIN_OEDEMA_VOXELS:
            return oedema, core
    raise ValueError(
        f"fov_mm={fov_mm} is too small for spacing {profile.spacing_mm}: no tumour with "
        f">= {_MIN_CORE_VOXELS} core voxels fits; use a larger fov_mm"
    )


def _encode(values: np.ndarray, profile: ScannerProfile) -> np.ndarray:
    """Cast scanner-unit intensities to the on-disk dtype (integers rounded and clipped)."""
    if profile.dtype == "float32":
        return values.astype(np.float32)
    info = np.iinfo(profile.dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(profile.dtype)
