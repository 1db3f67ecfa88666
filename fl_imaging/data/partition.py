"""Split one pooled MSD-style dataset into per-site manifests.

Two ways to decide which site a case belongs to:

- :func:`partition_by_column`: a column of a metadata CSV (one row per case), e.g.
  the ``pseudo_site`` column of the shipped hippocampus ``cases.csv``;
- :func:`partition_random`: a seeded random split into ``num_sites`` sites, equal
  in size or size-skewed (Dirichlet shares).

Each site gets one manifest ``<site>.json`` (the format of
:mod:`fl_imaging.data.manifest`) whose cases carry an explicit ``"split"``: a seeded
:func:`~fl_imaging.data.manifest.hold_out` of each site's cases is ``"val"``.

Paths in the written manifests are absolute, or, when ``data_root`` is given,
relative to it. ``data_root`` is stored in the manifest exactly as given and
:func:`~fl_imaging.data.manifest.load_manifest` reads it relative to the
manifest's folder, so give it relative to ``out_dir`` (or absolute). Pointing it at
the dataset's folder makes entries like ``"imagesTr/case_001.nii.gz"``, which also
work for a copy of the dataset elsewhere (``load_manifest(path, data_root=...)``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl_imaging.data.manifest import (
    TRAIN,
    VAL,
    Case,
    Manifest,
    hold_out,
    load_manifest,
    write_manifest,
)

logger = logging.getLogger(__name__)

_MIN_CASES_PER_RANDOM_SITE = 2  # one to train on, one to validate on
_PATH_COLUMNS = ("image", "label")
_PROVENANCE_KEYS = ("reference", "licence", "license", "release")
_MAX_NAMED = 10  # how many offending case ids an error message lists


@dataclass(frozen=True)
class _Member:
    """One case assigned to a site, with its CSV metadata."""

    case: Case
    meta: Mapping[str, Any]


def partition_by_column(
    dataset_json: str | Path,
    metadata_csv: str | Path,
    column: str,
    *,
    out_dir: str | Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    data_root: str | None = None,
    case_column: str = "case",
) -> list[Path]:
    """Write one manifest per distinct value of a metadata column.

    CSV rows are matched to the dataset's cases by ``case_column`` (the case id: the
    entry's ``case`` or its image file name without ``.nii.gz``), else by the CSV's
    ``image`` column (a path relative to the folder of ``dataset_json``). Every case
    must have a row; rows without a case are ignored (with a warning). The other
    columns of the row, as strings, become the case's ``meta``.

    Args:
        dataset_json: MSD ``dataset.json`` (or a manifest) listing all cases.
        metadata_csv: CSV with one row per case.
        column: CSV column whose value names the site, e.g. ``"pseudo_site"``;
            values must be usable as file names.
        out_dir: folder for the ``<site>.json`` manifests (created if missing).
        val_fraction: fraction of each site's cases marked ``"val"``, in [0, 1); a
            site with two or more cases gets at least one. With 0 no case is marked
            and :func:`~fl_imaging.data.manifest.load_manifest` holds out its own.
        seed: seed of the per-site validation hold-out.
        data_root: stored in each manifest and resolved, like ``load_manifest``
            does, relative to ``out_dir``; entry paths are written relative to it.
            ``None`` writes absolute paths.
        case_column: CSV column holding the case id.

    Returns:
        Manifest paths, one per site, in sorted site-name order.

    Raises:
        ValueError: a column is missing, a case has no row or an empty site value,
            a site value is not a valid file name, or ``data_root`` does not
            contain the dataset's files.
        ManifestError: ``dataset_json`` is missing or malformed.

    """
    _check_val_fraction(val_fraction)
    source = load_manifest(dataset_json, val_fraction=0.0)
    metadata_csv = Path(metadata_csv)
    header, rows = _read_csv(metadata_csv)
    if column not in header:
        raise ValueError(
            f"{metadata_csv}: column={column!r} is not in its header; "
            f"available columns: {', '.join(header)}"
        )
    matched = _match_rows(source, Path(dataset_json), metadata_csv, header, rows, case_column)

    sites = _column_sites(source, matched, column, case_column, metadata_csv, dataset_json)
    partition = {"method": "column", "column": column, "val_fraction": val_fraction, "seed": seed}
    return _write_sites(source, dataset_json, sites, Path(out_dir), data_root, partition)


def _column_sites(
    source: Manifest,
    matched: Mapping[str, Mapping[str, Any]],
    column: str,
    case_column: str,
    metadata_csv: Path,
    dataset_json: str | Path,
) -> dict[str, list[_Member]]:
    """Group ``source``'s cases by their CSV row's ``column`` value, sites in sorted order.

    Raises:
        ValueError: a case's value is empty or not a valid site (file) name.
    """
    groups: dict[str, list[_Member]] = {}
    blank: list[str] = []
    for case in source.cases:
        row = matched[case.case_id]
        site = (row.get(column) or "").strip()
        if not site:
            blank.append(case.case_id)
            continue
        _check_site_name(site, f"{metadata_csv}: column {column!r} value")
        meta = {
            k: v for k, v in row.items() if k is not None and k not in (case_column, *_PATH_COLUMNS)
        }
        groups.setdefault(site, []).append(_Member(case, meta))
    if blank:
        raise ValueError(
            f"{metadata_csv}: {len(blank)} case(s) have an empty {column!r} value, so no "
            f"site: {_some(blank)}; fill it in or drop those cases from {dataset_json}"
        )
    return {site: groups[site] for site in sorted(groups)}


def partition_random(
    dataset_json: str | Path,
    num_sites: int,
    *,
    out_dir: str | Path,
    skew: float = 0.0,
    val_fraction: float = 0.2,
    seed: int = 0,
    data_root: str | None = None,
    site_prefix: str = "site",
) -> list[Path]:
    """Write ``num_sites`` manifests from a seeded random split of the dataset's cases.

    Site sizes are near-equal (differing by at most one) for ``skew == 0``. For
    ``skew > 0`` the shares of the cases beyond two per site are drawn from a
    symmetric Dirichlet with concentration ``1 / skew``: ``skew=1`` draws shares
    uniformly over all share vectors, larger values make sizes more unequal.
    Every site gets at least two cases. The same arguments give the same split.

    Args:
        dataset_json: MSD ``dataset.json`` (or a manifest) listing all cases.
        num_sites: number of sites, at least 1 and at most half the number of cases.
        out_dir: folder for the manifests (created if missing).
        skew: size skew, >= 0 (see above).
        val_fraction: fraction of each site's cases marked ``"val"``, in [0, 1);
            see :func:`partition_by_column`.
        seed: seed of the assignment and of the per-site validation hold-out.
        data_root: stored in each manifest, relative to ``out_dir``; see
            :func:`partition_by_column`.
        site_prefix: sites are named ``<site_prefix>_0`` .. ``<site_prefix>_<num_sites-1>``.

    Returns:
        Manifest paths in site order (``_0`` first).

    Raises:
        ValueError: an argument is out of range, or ``data_root`` does not contain
            the dataset's files.
        ManifestError: ``dataset_json`` is missing or malformed.

    """
    _check_val_fraction(val_fraction)
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
        raise ValueError(f"num_sites must be a positive integer, got {num_sites!r}")
    if not (isinstance(skew, int | float) and math.isfinite(skew) and skew >= 0):
        raise ValueError(f"skew must be a finite number >= 0, got {skew!r}")
    _check_site_name(f"{site_prefix}_0", "site_prefix")
    source = load_manifest(dataset_json, val_fraction=0.0)
    num_cases = len(source.cases)
    if num_cases < _MIN_CASES_PER_RANDOM_SITE * num_sites:
        raise ValueError(
            f"num_sites={num_sites} needs at least {_MIN_CASES_PER_RANDOM_SITE * num_sites} "
            f"cases ({_MIN_CASES_PER_RANDOM_SITE} per site) but {dataset_json} has {num_cases}"
        )
    sites = _random_sites(source, num_sites, skew, seed, site_prefix)
    partition = {"method": "random", "num_sites": num_sites, "skew": skew}
    partition |= {"val_fraction": val_fraction, "seed": seed}
    return _write_sites(source, dataset_json, sites, Path(out_dir), data_root, partition)


def _random_sites(
    source: Manifest, num_sites: int, skew: float, seed: int, site_prefix: str
) -> dict[str, list[_Member]]:
    """The seeded random assignment of ``source``'s cases to sites (see partition_random)."""
    num_cases = len(source.cases)
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_cases)
    sizes = _site_sizes(num_cases, num_sites, skew, rng)
    sites: dict[str, list[_Member]] = {}
    start = 0
    for i, size in enumerate(sizes):
        # Keep the dataset's case order inside a site: diffs stay readable.
        picked = sorted(int(j) for j in order[start : start + size])
        sites[f"{site_prefix}_{i}"] = [_Member(source.cases[j], {}) for j in picked]
        start += size
    return sites


def _check_val_fraction(val_fraction: float) -> None:
    if not (isinstance(val_fraction, int | float) and 0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")


def _check_site_name(name: str, what: str) -> None:
    bad = not name or name in (".", "..") or any(sep in name for sep in ("/", "\\", os.sep))
    if bad or name != name.strip():
        raise ValueError(f"{what} {name!r} cannot name a site file '<site>.json'")


def _some(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_MAX_NAMED])
    return shown if len(ids) <= _MAX_NAMED else f"{shown}, ... ({len(ids) - _MAX_NAMED} more)"


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    # utf-8-sig: spreadsheets often save CSV with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = [h for h in reader.fieldnames or [] if h]
    if not header:
        raise ValueError(f"{path}: CSV has no header row")
    return header, rows


def _match_rows(
    source: Manifest,
    dataset_json: Path,
    metadata_csv: Path,
    header: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    case_column: str,
) -> dict[str, Mapping[str, Any]]:
    """Map each case id of ``source`` to its CSV row; raise naming the unmatched cases."""
    if case_column not in header and "image" not in header:
        raise ValueError(
            f"{metadata_csv}: case_column={case_column!r} is not in its header, nor is an "
            f"'image' column to match cases by; available columns: {', '.join(header)}"
        )
    by_case: dict[str, Mapping[str, Any]] = {}
    by_image: dict[str, Mapping[str, Any]] = {}
    dataset_dir = dataset_json.parent
    for row in rows:
        case_id = (row.get(case_column) or "").strip()
        if case_id:
            if case_id in by_case:
                raise ValueError(f"{metadata_csv}: case {case_id!r} has more than one row")
            by_case[case_id] = row
        image = (row.get("image") or "").strip()
        if image:
            by_image[os.path.abspath(dataset_dir / image)] = row

    matched: dict[str, Mapping[str, Any]] = {}
    missing: list[str] = []
    for case in source.cases:
        row = by_case.get(case.case_id) or by_image.get(os.path.abspath(case.images[0]))
        if row is None:
            missing.append(case.case_id)
        else:
            matched[case.case_id] = row
    if missing:
        raise ValueError(
            f"{metadata_csv}: {len(missing)} case(s) of {dataset_json} have no row (matched "
            f"by {case_column!r} or 'image'): {_some(missing)}"
        )
    used = {id(row) for row in matched.values()}
    unused = sum(1 for row in rows if id(row) not in used)
    if unused:
        logger.warning(
            "%s: %d row(s) match no case of %s and are ignored", metadata_csv, unused, dataset_json
        )
    return matched


def _site_sizes(num_cases: int, num_sites: int, skew: float, rng: np.random.Generator) -> list[int]:
    """Site sizes summing to ``num_cases``, each >= 2 (see :func:`partition_random`)."""
    spare = num_cases - _MIN_CASES_PER_RANDOM_SITE * num_sites
    if skew == 0:
        shares = np.full(num_sites, 1.0 / num_sites)
    else:
        shares = rng.dirichlet(np.full(num_sites, 1.0 / skew))
    raw = shares * spare
    sizes = np.floor(raw).astype(int)
    # Largest remainders get the leftover cases; ties go to the lower site index.
    leftover = spare - int(sizes.sum())
    sizes[np.argsort(-(raw - sizes), kind="stable")[:leftover]] += 1
    return [int(s) + _MIN_CASES_PER_RANDOM_SITE for s in sizes]


def _entry_path(
    path: Path, root: Path | None, data_root: str | None, out_dir: Path, dataset_dir: Path
) -> str:
    absolute = os.path.abspath(path)
    if root is None:
        return Path(absolute).as_posix()
    relative = os.path.relpath(absolute, root)
    if Path(relative).parts[:1] == ("..",):
        suggestion = os.path.relpath(os.path.abspath(dataset_dir), os.path.abspath(out_dir))
        raise ValueError(
            f"data_root={data_root!r} is read relative to out_dir {out_dir} (load_manifest "
            f"reads it relative to the manifest's folder), giving {root}, which does not "
            f"contain {absolute}; for the dataset's folder pass data_root={suggestion!r}"
        )
    return Path(relative).as_posix()


def _entry(member: _Member, rel: Callable[[Path], str], held: Container[str]) -> dict[str, Any]:
    """The manifest entry of one case, its paths written by ``rel``."""
    images = [rel(p) for p in member.case.images]
    return {
        "image": images[0] if len(images) == 1 else images,
        "label": rel(member.case.label),
        "case": member.case.case_id,
        "split": VAL if member.case.case_id in held else TRAIN,
        "meta": dict(member.meta),
    }


def _write_sites(
    source: Manifest,
    dataset_json: str | Path,
    sites: Mapping[str, Sequence[_Member]],
    out_dir: Path,
    data_root: str | None,
    partition: Mapping[str, Any],
) -> list[Path]:
    """Write one manifest per site; every entry is built before the first file is written.

    ``partition`` is recorded in each manifest; its ``val_fraction`` and ``seed`` choose
    each site's validation hold-out.
    """
    val_fraction, seed = float(partition["val_fraction"]), int(partition["seed"])
    root = None if data_root is None else Path(os.path.abspath(out_dir / data_root))
    raw = json.loads(Path(dataset_json).read_text())
    provenance = {k: raw[k] for k in _PROVENANCE_KEYS if k in raw}

    def rel(path: Path) -> str:
        return _entry_path(path, root, data_root, out_dir, Path(dataset_json).parent)

    documents: list[tuple[str, list[dict[str, Any]], int]] = []
    for site, members in sites.items():
        if not members:
            raise ValueError(f"site {site!r} has no cases")
        held = hold_out((m.case.case_id for m in members), val_fraction, seed)
        documents.append((site, [_entry(m, rel, held) for m in members], len(held)))

    paths = []
    for site, entries, num_val in documents:
        path = write_manifest(
            out_dir / f"{site}.json",
            name=site,
            modalities=source.modalities,
            labels=source.labels,
            entries=entries,
            data_root=data_root,
            description=f"site {site} of {source.name}",
            extra={"dataset": source.name, **provenance, "partition": dict(partition)},
        )
        logger.info(
            "site %s: %d cases (%d train / %d val) -> %s",
            site,
            len(entries),
            len(entries) - num_val,
            num_val,
            path,
        )
        if num_val == 0 and val_fraction > 0:
            logger.warning("site %s: %d case(s), too few for a validation case", site, len(entries))
        paths.append(path)
    return paths
