"""Specification of the synthetic hospital generator (tiny volumes, real NIfTI files)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fl_imaging.data.manifest import TRAIN, VAL, check_manifest, load_manifest
from fl_imaging.data.synthetic import (
    LABELS,
    default_profiles,
    generate_federation,
    site_case_counts,
    site_name,
    site_shape,
)

TINY = {"num_sites": 3, "total_cases": 15, "skew": 0.5, "fov_mm": 32.0, "seed": 0}


def _arrays(manifest_path: Path) -> dict[str, np.ndarray]:
    manifest = load_manifest(manifest_path)
    arrays = {}
    for case in manifest.cases:
        for i, path in enumerate(case.images):
            arrays[f"{case.case_id}/image{i}"] = np.asarray(nib.load(path).dataobj)
        arrays[f"{case.case_id}/label"] = np.asarray(nib.load(case.label).dataobj)
    return arrays


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_federation(tmp_path_factory.mktemp("fed"), **TINY)


def test_site_names_are_letters() -> None:
    assert [site_name(i) for i in (0, 1, 25, 26)] == [
        "hospital_a",
        "hospital_b",
        "hospital_z",
        "hospital_aa",
    ]


def test_layout_and_manifest_paths_are_relative(federation: list[Path]) -> None:
    assert [p.parent.name for p in federation] == [site_name(i) for i in range(3)]
    for path in federation:
        doc = json.loads(path.read_text())
        for entry in doc["training"]:
            assert entry["image"] == f"imagesTr/{entry['case']}.nii.gz"
            assert entry["label"] == f"labelsTr/{entry['case']}.nii.gz"
            assert entry["case"].startswith(path.parent.name + "_")


def test_same_seed_gives_identical_data_and_manifests(federation: list[Path], tmp_path: Path):
    again = generate_federation(tmp_path, **TINY)
    for first, second in zip(federation, again, strict=True):
        assert first.read_text() == second.read_text()
        a, b = _arrays(first), _arrays(second)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_different_seed_gives_different_data(federation: list[Path], tmp_path: Path) -> None:
    other = generate_federation(tmp_path, **{**TINY, "seed": 1})
    a, b = _arrays(federation[0]), _arrays(other[0])
    key = next(k for k in a if k in b and k.endswith("image0"))
    assert not np.array_equal(a[key], b[key])


def test_every_label_has_both_classes_with_core_inside_oedema(federation: list[Path]) -> None:
    cube = np.ones((3, 3, 3), dtype=bool)
    for path in federation:
        for case in load_manifest(path).cases:
            label_img = nib.load(case.label)
            label = np.asarray(label_img.dataobj)
            assert label_img.get_data_dtype() == np.uint8
            assert set(np.unique(label).tolist()) == set(LABELS)
            core = label == 2
            assert core.sum() >= 6 and (label == 1).sum() >= 12, case.case_id
            # every neighbour (26-connectivity) of a core voxel is tumour: core never touches
            # background
            assert np.all(label[ndimage.binary_dilation(core, structure=cube)] > 0), case.case_id


def test_manifests_pass_checks_with_profile_spacing_and_shape(federation: list[Path]) -> None:
    profiles = default_profiles(TINY["num_sites"], TINY["seed"])
    for path, profile in zip(federation, profiles, strict=True):
        manifest = load_manifest(path)
        assert manifest.num_channels == 1 and manifest.labels == LABELS
        reports = check_manifest(manifest)
        assert [r.problems for r in reports if not r.ok] == []
        expected_shape = tuple(round(TINY["fov_mm"] / s) for s in profile.spacing_mm)
        assert site_shape(TINY["fov_mm"], profile.spacing_mm) == expected_shape
        for report, case in zip(reports, manifest.cases, strict=True):
            assert report.shape == expected_shape
            img = nib.load(case.images[0])
            assert img.ndim == 3
            np.testing.assert_allclose(img.header.get_zooms(), profile.spacing_mm)
            np.testing.assert_allclose(np.diag(img.affine)[:3], profile.spacing_mm)
            assert img.header.get_xyzt_units()[0] == "mm"
            assert img.get_data_dtype() == np.dtype(profile.dtype)
            assert case.meta["spacing_mm"] == list(profile.spacing_mm)


def test_every_site_has_train_and_val_cases(federation: list[Path]) -> None:
    for path in federation:
        manifest = load_manifest(path)
        assert len(manifest.split(VAL)) >= 1 and len(manifest.split(TRAIN)) >= 2


def test_sites_differ_in_spacing_intensities_and_size(federation: list[Path]) -> None:
    profiles = default_profiles(3, seed=0)
    assert len({p.spacing_mm for p in profiles}) == 3
    assert len({p.dtype for p in profiles}) == 3
    oedema_medians = []
    for path in federation:
        arrays = _arrays(path)
        oedema = [
            np.median(arrays[k][(arrays[k.replace("image0", "label")] == 1)])
            for k in arrays
            if k.endswith("image0")
        ]
        oedema_medians.append(float(np.median(oedema)))
    # oedema intensities follow each site's scale and offset, far apart between sites
    assert (
        min(abs(a - b) for i, a in enumerate(oedema_medians) for b in oedema_medians[i + 1 :]) > 50
    )

    counts = [len(load_manifest(p).cases) for p in federation]
    assert counts == site_case_counts(3, TINY["total_cases"], TINY["skew"], TINY["seed"])
    assert len(set(counts)) > 1


@pytest.mark.parametrize(("num_sites", "total", "skew"), [(3, 36, 0.5), (5, 20, 0.9), (4, 50, 0.3)])
def test_case_counts_sum_to_total_with_minimum_four(num_sites: int, total: int, skew: float):
    counts = site_case_counts(num_sites, total, skew, seed=3)
    assert sum(counts) == total and min(counts) >= 4 and len(counts) == num_sites
    assert counts == site_case_counts(num_sites, total, skew, seed=3)


def test_zero_skew_gives_equal_sites() -> None:
    assert site_case_counts(3, 36, 0.0, seed=0) == [12, 12, 12]


def test_more_sites_get_derived_distinct_profiles() -> None:
    profiles = default_profiles(6, seed=0)
    assert profiles[:3] == default_profiles(3, seed=0)
    assert profiles == default_profiles(6, seed=0)
    assert len(set(profiles)) == 6


def test_two_modalities_4d_layout(tmp_path: Path) -> None:
    paths = generate_federation(
        tmp_path, num_sites=2, total_cases=8, fov_mm=32.0, modalities=("T1c", "FLAIR")
    )
    for path in paths:
        manifest = load_manifest(path)
        assert manifest.num_channels == 2 and manifest.modalities == ("T1c", "FLAIR")
        assert all(r.ok for r in check_manifest(manifest))
        case = manifest.cases[0]
        image = np.asarray(nib.load(case.images[0]).dataobj).astype(np.float64)
        label = np.asarray(nib.load(case.label).dataobj)
        assert image.ndim == 4 and image.shape[-1] == 2 and image.shape[:3] == label.shape
        # FLAIR: oedema brighter than the rest of the brain-sized label-0 tissue
        flair_oedema = np.median(image[..., 1][label == 1])
        assert flair_oedema > np.percentile(image[..., 1][label == 0], 90)


def test_two_modalities_files_layout(tmp_path: Path) -> None:
    paths = generate_federation(
        tmp_path,
        num_sites=2,
        total_cases=8,
        fov_mm=32.0,
        modalities=("T1c", "FLAIR"),
        modality_layout="files",
    )
    for path in paths:
        doc = json.loads(path.read_text())
        assert all(isinstance(e["image"], list) and len(e["image"]) == 2 for e in doc["training"])
        manifest = load_manifest(path)
        assert all(r.ok for r in check_manifest(manifest))
        assert [p.parent.name for p in manifest.cases[0].images] == ["T1c", "FLAIR"]
        assert nib.load(manifest.cases[0].images[0]).ndim == 3


def test_refuses_non_empty_site_folder_unless_overwrite(tmp_path: Path) -> None:
    args = {"num_sites": 2, "total_cases": 8, "fov_mm": 32.0}
    generate_federation(tmp_path, **args)
    with pytest.raises(FileExistsError, match="hospital_a"):
        generate_federation(tmp_path, **args)
    paths = generate_federation(tmp_path, **args, seed=1, overwrite=True)
    assert all(all(r.ok for r in check_manifest(load_manifest(p))) for p in paths)
    assert not list(tmp_path.rglob(".tmp-*"))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"skew": 1.0}, "skew"),
        ({"total_cases": 7}, "total_cases"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"modalities": ("PET",)}, "modalities"),
        ({"modality_layout": "5d"}, "modality_layout"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate_federation(tmp_path, **{"num_sites": 2, "fov_mm": 32.0, **kwargs})
    assert not any(tmp_path.iterdir())


def test_a_tumour_label_scheme_relabels_the_same_images(tmp_path: Path) -> None:
    kwargs = {"num_sites": 3, "total_cases": 12, "fov_mm": 40.0, "seed": 3}
    plain = generate_federation(tmp_path / "plain", **kwargs)
    brats = generate_federation(tmp_path / "brats", label_scheme="brats2021", **kwargs)
    doc = json.loads(brats[0].read_text())
    assert doc["labels"] == {"0": "background", "1": "necrosis", "2": "oedema", "4": "enhancing"}
    entry = doc["training"][0]
    a_img = np.asarray(nib.load(str(plain[0].parent / entry["image"])).dataobj)
    b_img = np.asarray(nib.load(str(brats[0].parent / entry["image"])).dataobj)
    assert np.array_equal(a_img, b_img)  # only the labels change
    old = np.asarray(nib.load(str(plain[0].parent / entry["label"])).dataobj)
    new = np.asarray(nib.load(str(brats[0].parent / entry["label"])).dataobj)
    assert set(np.unique(new).tolist()) == {0, 1, 2, 4}
    assert np.array_equal(new == 2, old == 1)  # oedema outside the core
    assert np.array_equal(np.isin(new, [1, 4]), old == 2)  # core = necrosis + enhancing rim
