"""Splitting one dataset into per-site manifests, and the shipped hippocampus manifests."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fl_imaging.data.manifest import TRAIN, VAL, check_case, load_manifest
from fl_imaging.data.partition import partition_by_column, partition_random

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = REPO_ROOT / "data_manifests" / "hippocampus"
HIPPOCAMPUS_DATA = REPO_ROOT.parent / "shared" / "data" / "msd_hippocampus"

# 10 cases: 6 at "north", 3 at "south", 1 at "east".
SITES = ["north"] * 6 + ["south"] * 3 + ["east"]


def make_dataset(root: Path, num_cases: int, *, with_files: bool = True) -> Path:
    """Write an MSD-style ``root/dataset.json`` (and tiny 4x4x4 cases when asked)."""
    training = []
    for i in range(num_cases):
        image, label = f"./imagesTr/case_{i:03d}.nii.gz", f"./labelsTr/case_{i:03d}.nii.gz"
        training.append({"image": image, "label": label})
        if with_files:
            label_map = np.zeros((4, 4, 4), np.uint8)
            label_map[1:3, 1:3, 1:3] = 1
            for name, data in [(image, np.full((4, 4, 4), i, np.float32)), (label, label_map)]:
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(data, np.eye(4)), root / name)
    doc = {
        "name": "Toy",
        "licence": "CC0",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "organ"},
        "numTraining": num_cases,
        "training": training,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


def make_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def site_rows(num_cases: int = len(SITES)) -> list[dict[str, str]]:
    return [
        {
            "case": f"case_{i:03d}",
            "image": f"imagesTr/case_{i:03d}.nii.gz",
            "scanner": f"S{i % 2}",
            "site": SITES[i],
        }
        for i in range(num_cases)
    ]


@pytest.fixture
def toy(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    return make_dataset(data, len(SITES)), make_csv(data / "cases.csv", site_rows())


# --- by column ------------------------------------------------------------------------


def test_by_column_writes_one_manifest_per_site_with_val_cases(
    tmp_path: Path, toy: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    dataset, cases_csv = toy
    with caplog.at_level(logging.INFO, logger="fl_imaging.data.partition"):
        paths = partition_by_column(dataset, cases_csv, "site", out_dir=tmp_path / "sites")

    assert paths == [tmp_path / "sites" / f"{s}.json" for s in ("east", "north", "south")]
    counts = {}
    for path in paths:
        manifest = load_manifest(path)
        counts[manifest.name] = (len(manifest.split(TRAIN)), len(manifest.split(VAL)))
        assert all(c.images[0].is_absolute() for c in manifest.cases)
        assert check_case(manifest.cases[0], manifest).ok
    assert counts == {"east": (1, 0), "north": (5, 1), "south": (2, 1)}
    assert "site north: 6 cases (5 train / 1 val)" in caplog.text


def test_by_column_keeps_the_other_csv_columns_as_meta(
    tmp_path: Path, toy: tuple[Path, Path]
) -> None:
    dataset, cases_csv = toy
    paths = partition_by_column(dataset, cases_csv, "site", out_dir=tmp_path / "sites")

    first = load_manifest(paths[1]).cases[0]  # north

    assert first.case_id == "case_000"
    assert dict(first.meta) == {"scanner": "S0", "site": "north"}


def test_by_column_is_deterministic_per_seed(tmp_path: Path, toy: tuple[Path, Path]) -> None:
    dataset, cases_csv = toy
    first = partition_by_column(dataset, cases_csv, "site", out_dir=tmp_path / "a", seed=4)
    again = partition_by_column(dataset, cases_csv, "site", out_dir=tmp_path / "b", seed=4)
    assert [p.read_text() for p in first] == [p.read_text() for p in again]


def test_data_root_makes_portable_manifests(tmp_path: Path, toy: tuple[Path, Path]) -> None:
    dataset, cases_csv = toy
    out = tmp_path / "repo" / "manifests"
    paths = partition_by_column(dataset, cases_csv, "site", out_dir=out, data_root="../../data")

    raw = json.loads(paths[0].read_text())
    assert raw["data_root"] == "../../data"
    assert raw["training"][0]["image"] == "imagesTr/case_009.nii.gz"
    manifest = load_manifest(paths[0])
    assert check_case(manifest.cases[0], manifest).ok

    copy = shutil.copytree(tmp_path / "data", tmp_path / "hospital_copy")
    moved = load_manifest(paths[0], data_root=copy)
    assert moved.cases[0].images == (copy / "imagesTr/case_009.nii.gz",)


def test_data_root_not_containing_the_dataset_is_refused(
    tmp_path: Path, toy: tuple[Path, Path]
) -> None:
    dataset, cases_csv = toy
    out = tmp_path / "repo" / "manifests"
    # Relative to the current directory rather than to out_dir: a likely mistake.
    wrong = os.path.relpath(tmp_path / "data", out.parent)
    with pytest.raises(ValueError, match="data_root=") as info:
        partition_by_column(dataset, cases_csv, "site", out_dir=out, data_root=wrong)
    assert "'../../data'" in str(info.value)  # the value that would work
    assert not out.exists()


def test_missing_column_error_names_it_and_lists_columns(
    tmp_path: Path, toy: tuple[Path, Path]
) -> None:
    dataset, cases_csv = toy
    with pytest.raises(ValueError, match="'hospital'") as info:
        partition_by_column(dataset, cases_csv, "hospital", out_dir=tmp_path / "sites")
    assert str(cases_csv) in str(info.value)
    assert "case, image, scanner, site" in str(info.value)


def test_cases_without_a_csv_row_are_named(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "data", len(SITES), with_files=False)
    cases_csv = make_csv(tmp_path / "cases.csv", site_rows()[:8])
    with pytest.raises(ValueError, match="2 case"):
        partition_by_column(dataset, cases_csv, "site", out_dir=tmp_path / "sites")
    with pytest.raises(ValueError, match="case_008, case_009"):
        partition_by_column(dataset, cases_csv, "site", out_dir=tmp_path / "sites")


def test_rows_match_by_image_path_without_a_case_column(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "data", len(SITES), with_files=False)
    rows = [{k: v for k, v in row.items() if k != "case"} for row in site_rows()]
    cases_csv = make_csv(tmp_path / "data" / "cases.csv", rows)

    paths = partition_by_column(dataset, cases_csv, "site", out_dir=tmp_path / "sites")

    assert [len(load_manifest(p).cases) for p in paths] == [1, 6, 3]


def test_case_with_empty_site_value_is_named(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "data", len(SITES), with_files=False)
    rows = site_rows()
    rows[3]["site"] = ""
    cases_csv = make_csv(tmp_path / "cases.csv", rows)
    with pytest.raises(ValueError, match=r"empty 'site' value.*case_003"):
        partition_by_column(dataset, cases_csv, "site", out_dir=tmp_path / "sites")


# --- random ---------------------------------------------------------------------------


def random_sites(dataset: Path, out: Path, **kwargs: float) -> dict[str, list[str]]:
    paths = partition_random(dataset, 4, out_dir=out, **kwargs)
    return {p.stem: [c.case_id for c in load_manifest(p).cases] for p in paths}


def test_random_partition_covers_every_case_once(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "data", 42, with_files=False)

    sites = random_sites(dataset, tmp_path / "sites")

    assert list(sites) == ["site_0", "site_1", "site_2", "site_3"]
    assigned = [case for cases in sites.values() for case in cases]
    assert sorted(assigned) == [f"case_{i:03d}" for i in range(42)]
    assert sorted(len(cases) for cases in sites.values()) == [10, 10, 11, 11]
    for path in (tmp_path / "sites").glob("*.json"):
        assert len(load_manifest(path).split(VAL)) == 2


def test_random_partition_is_deterministic_per_seed(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "data", 42, with_files=False)
    first = random_sites(dataset, tmp_path / "a", seed=1, skew=1.0)
    again = random_sites(dataset, tmp_path / "b", seed=1, skew=1.0)
    other = random_sites(dataset, tmp_path / "c", seed=2, skew=1.0)
    assert first == again
    assert first != other


def test_skew_makes_site_sizes_unequal(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "data", 40, with_files=False)

    sizes = [len(cases) for cases in random_sites(dataset, tmp_path / "s", skew=2.0).values()]

    assert sum(sizes) == 40
    assert min(sizes) >= 2
    assert max(sizes) - min(sizes) >= 10


def test_too_many_sites_for_the_cases_is_refused(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "data", 7, with_files=False)
    with pytest.raises(ValueError, match="num_sites=4 needs at least 8 cases"):
        partition_random(dataset, 4, out_dir=tmp_path / "sites")


# --- the shipped manifests ------------------------------------------------------------


def test_shipped_hippocampus_manifests() -> None:
    expected = {"A_uint8": (44, 9), "B_float": (149, 30), "C_float_origin0": (15, 3)}
    manifests = [load_manifest(SHIPPED / f"{site}.json") for site in expected]

    assert {m.name: (len(m.cases), len(m.split(VAL))) for m in manifests} == expected
    ids = {c.case_id for m in manifests for c in m.cases}
    assert len(ids) == 208
    for manifest in manifests:
        assert manifest.modalities == ("MRI",)
        assert dict(manifest.labels) == {0: "background", 1: "Anterior", 2: "Posterior"}
        raw = json.loads(manifest.path.read_text())
        assert raw["training"][0]["image"].startswith("imagesTr/")  # portable via data_root
        image = manifest.cases[0].images[0]
        assert Path(os.path.normpath(image)).parent.parent == HIPPOCAMPUS_DATA

    if not HIPPOCAMPUS_DATA.is_dir():
        pytest.skip(
            f"structure checked; image reading skipped: no shared data at {HIPPOCAMPUS_DATA}"
        )
    for manifest in manifests:
        report = check_case(manifest.cases[0], manifest)
        assert report.ok, report.problems
