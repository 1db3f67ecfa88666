"""Manifest loading and case checking, on tiny NIfTI files written per test."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from fl_imaging.data.manifest import (
    TRAIN,
    VAL,
    ManifestError,
    check_manifest,
    hold_out,
    load_manifest,
    require_valid,
)

SHAPE = (8, 8, 8)
LABELS = {"0": "background", "1": "lesion"}

# A file's content: an array (saved as NIfTI), raw bytes (written as they are) or
# None (no file at all).
Content = np.ndarray | bytes | None


def volume(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def label_map(shape: tuple[int, ...] = SHAPE, value: int = 1) -> np.ndarray:
    data = np.zeros(shape, dtype=np.uint8)
    data[2:5, 2:5, 2:5] = value
    return data


def write_file(path: Path, content: Content, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> Path:
    if content is None:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        nib.save(nib.Nifti1Image(content, np.diag([*spacing, 1.0])), str(path))
    return path


def write_doc(path: Path, entries: list[dict[str, Any]], **fields: Any) -> Path:
    doc = {"name": "site", "modality": {"0": "T1"}, "labels": LABELS, **fields}
    doc["training"] = entries
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def one_case(
    root: Path,
    image: Content | list[Content],
    label: Content,
    modality: tuple[str, ...] = ("T1",),
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
) -> Path:
    """Write case ``c0`` under ``root`` and a manifest ``root/dataset.json`` listing it."""
    if isinstance(image, list):
        entry_image: str | list[str] = [f"imagesTr/c0_{i:04d}.nii.gz" for i in range(len(image))]
        for name, content in zip(entry_image, image, strict=True):
            write_file(root / name, content, spacing)
    else:
        entry_image = "imagesTr/c0.nii.gz"
        write_file(root / entry_image, image, spacing)
    write_file(root / "labelsTr/c0.nii.gz", label, spacing)
    return write_doc(
        root / "dataset.json",
        [{"image": entry_image, "label": "labelsTr/c0.nii.gz"}],
        modality={str(i): m for i, m in enumerate(modality)},
    )


def only_problem(manifest_path: Path) -> str:
    (report,) = check_manifest(load_manifest(manifest_path))
    assert not report.ok
    (problem,) = report.problems
    assert str(manifest_path) in problem
    return problem


def gzip_truncated() -> bytes:
    full = gzip.compress(nib.Nifti1Image(volume(), np.eye(4)).to_bytes())
    return full[: len(full) // 2]


# --- bad inputs: each problem names the offending file (and the manifest) -------------


def test_missing_image_file_is_named(tmp_path: Path) -> None:
    problem = only_problem(one_case(tmp_path, None, label_map()))
    assert f"image file not found: {tmp_path / 'imagesTr/c0.nii.gz'}" in problem


def test_missing_label_file_is_named(tmp_path: Path) -> None:
    problem = only_problem(one_case(tmp_path, volume(), None))
    assert f"label file not found: {tmp_path / 'labelsTr/c0.nii.gz'}" in problem


@pytest.mark.parametrize(
    "corrupt", [gzip_truncated(), b"not a nifti file" * 8], ids=["truncated-gzip", "garbage"]
)
@pytest.mark.parametrize("role", ["image", "label"])
def test_corrupt_nifti_is_named(tmp_path: Path, corrupt: bytes, role: str) -> None:
    image, label = (corrupt, label_map()) if role == "image" else (volume(), corrupt)
    problem = only_problem(one_case(tmp_path, image, label))
    bad = tmp_path / ("imagesTr/c0.nii.gz" if role == "image" else "labelsTr/c0.nii.gz")
    assert f"{role} file {bad} is not a readable NIfTI" in problem


def test_image_label_shape_mismatch_names_both_files(tmp_path: Path) -> None:
    problem = only_problem(one_case(tmp_path, volume(), label_map((8, 8, 6))))
    assert str(tmp_path / "labelsTr/c0.nii.gz") in problem
    assert str(tmp_path / "imagesTr/c0.nii.gz") in problem
    assert "(8, 8, 6)" in problem


def test_modalities_of_different_shape_are_named(tmp_path: Path) -> None:
    image = [volume(), volume((8, 8, 7))]
    problem = only_problem(one_case(tmp_path, image, label_map(), modality=("T1", "FLAIR")))
    assert "modalities differ in shape" in problem
    assert str(tmp_path / "imagesTr/c0_0000.nii.gz") in problem
    assert str(tmp_path / "imagesTr/c0_0001.nii.gz") in problem


def test_undeclared_label_value_is_named(tmp_path: Path) -> None:
    problem = only_problem(one_case(tmp_path, volume(), label_map(value=3)))
    assert f"label {tmp_path / 'labelsTr/c0.nii.gz'} contains values [3]" in problem


def test_nan_intensities_are_named(tmp_path: Path) -> None:
    image = volume()
    image[0, 0, 0] = np.nan
    problem = only_problem(one_case(tmp_path, image, label_map()))
    assert f"image {tmp_path / 'imagesTr/c0.nii.gz'} contains non-finite" in problem


def test_4d_channel_count_differing_from_modality_is_named(tmp_path: Path) -> None:
    problem = only_problem(one_case(tmp_path, volume((*SHAPE, 3)), label_map(), ("T1", "T2")))
    assert f"image {tmp_path / 'imagesTr/c0.nii.gz'} has 3 channels" in problem
    assert "declares 2" in problem


def test_empty_manifest_is_rejected_naming_it(tmp_path: Path) -> None:
    path = write_doc(tmp_path / "dataset.json", [])
    with pytest.raises(ManifestError, match="lists no cases") as info:
        load_manifest(path)
    assert str(path) in str(info.value)


def test_invalid_json_is_rejected_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "dataset.json"
    path.write_text('{"name": "site", "training": [')
    with pytest.raises(ManifestError, match="not valid JSON") as info:
        load_manifest(path)
    assert str(path) in str(info.value)


def test_file_list_not_matching_modality_count_is_rejected(tmp_path: Path) -> None:
    entry = {"image": ["t1/a.nii.gz", "t2/a.nii.gz"], "label": "labelsTr/a.nii.gz"}
    path = write_doc(tmp_path / "dataset.json", [entry])
    with pytest.raises(ManifestError, match="lists 2 image files but 'modality' declares 1"):
        load_manifest(path)


@pytest.mark.parametrize(
    "entries",
    [
        [{"image": "a/x.nii.gz", "label": "l/1.nii.gz"}, {"image": "b/x.nii.gz", "label": "l/2"}],
        [
            {"image": "a.nii.gz", "label": "l/1.nii.gz", "case": "x"},
            {"image": "b.nii.gz", "label": "l/2.nii.gz", "case": "x"},
        ],
    ],
    ids=["same-file-stem", "same-case-field"],
)
def test_duplicate_case_ids_are_rejected(tmp_path: Path, entries: list[dict[str, Any]]) -> None:
    path = write_doc(tmp_path / "dataset.json", entries)
    with pytest.raises(ManifestError, match="case id 'x' appears more than once") as info:
        load_manifest(path)
    assert str(path) in str(info.value)


def test_require_valid_lists_every_problem(tmp_path: Path) -> None:
    write_file(tmp_path / "labelsTr/a.nii.gz", label_map())
    write_file(tmp_path / "imagesTr/b.nii.gz", volume())
    path = write_doc(
        tmp_path / "dataset.json",
        [
            {"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"},
            {"image": "imagesTr/b.nii.gz", "label": "labelsTr/b.nii.gz"},
        ],
    )
    manifest = load_manifest(path)
    with pytest.raises(ManifestError) as info:
        require_valid(manifest, manifest.cases)
    assert str(tmp_path / "imagesTr/a.nii.gz") in str(info.value)
    assert str(tmp_path / "labelsTr/b.nii.gz") in str(info.value)


# --- valid inputs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "modality"),
    [
        (volume(), ("T1",)),
        (volume((*SHAPE, 2)), ("T1", "FLAIR")),
        ([volume(), volume(seed=1)], ("T1", "FLAIR")),
    ],
    ids=["3d-single-file", "4d-channels-last", "file-per-modality"],
)
def test_valid_layouts_pass(
    tmp_path: Path, image: np.ndarray | list[np.ndarray], modality: tuple[str, ...]
) -> None:
    manifest = load_manifest(one_case(tmp_path, image, label_map(), modality, (1.0, 1.0, 2.5)))
    (report,) = check_manifest(manifest)
    assert report.ok, report.problems
    assert report.shape == SHAPE
    assert report.spacing == (1.0, 1.0, 2.5)
    assert manifest.num_channels == len(modality)
    assert manifest.num_classes == 2


def test_data_root_argument_overrides_the_manifest_folder(tmp_path: Path) -> None:
    data = tmp_path / "hospital_disk"
    one_case(data, volume(), label_map())
    manifest_path = tmp_path / "elsewhere" / "site.json"
    manifest_path.parent.mkdir()
    manifest_path.write_text((data / "dataset.json").read_text())

    manifest = load_manifest(manifest_path, data_root=data)

    (case,) = manifest.cases
    assert case.images == (data / "imagesTr/c0.nii.gz",)
    assert case.label == data / "labelsTr/c0.nii.gz"
    assert check_manifest(manifest)[0].ok


def test_stored_data_root_is_relative_to_the_manifest_folder(tmp_path: Path) -> None:
    one_case(tmp_path / "data", volume(), label_map())
    doc = json.loads((tmp_path / "data" / "dataset.json").read_text())
    doc["data_root"] = "../data"
    manifest_path = tmp_path / "manifests" / "site.json"
    manifest_path.parent.mkdir()
    manifest_path.write_text(json.dumps(doc))

    manifest = load_manifest(manifest_path)

    assert manifest.cases[0].images[0].resolve() == tmp_path / "data/imagesTr/c0.nii.gz"
    assert check_manifest(manifest)[0].ok


def ten_cases(**extra: Any) -> list[dict[str, Any]]:
    return [
        {"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz", **extra}
        for i in range(10)
    ]


def test_hold_out_is_deterministic_per_seed(tmp_path: Path) -> None:
    path = write_doc(tmp_path / "dataset.json", ten_cases())

    first = {c.case_id for c in load_manifest(path, seed=3).split(VAL)}
    again = {c.case_id for c in load_manifest(path, seed=3).split(VAL)}

    assert first == again
    assert len(first) == 2
    ids = [f"c{i}" for i in range(10)]
    assert hold_out(ids, 0.2, 3) == hold_out(reversed(ids), 0.2, 3) == first


def test_explicit_split_is_respected(tmp_path: Path) -> None:
    entries = ten_cases(split="train")
    entries[4]["split"] = "val"
    path = write_doc(tmp_path / "dataset.json", entries)

    manifest = load_manifest(path, val_fraction=0.5)

    assert [c.case_id for c in manifest.split(VAL)] == ["c4"]
    assert len(manifest.split(TRAIN)) == 9


def test_validation_list_marks_its_cases_val(tmp_path: Path) -> None:
    path = write_doc(
        tmp_path / "dataset.json",
        ten_cases(),
        validation=[{"image": "imagesTr/v.nii.gz", "label": "labelsTr/v.nii.gz"}],
    )
    assert [c.case_id for c in load_manifest(path).split(VAL)] == ["v"]


@pytest.mark.parametrize("num_cases", [2, 3, 10])
def test_hold_out_leaves_a_training_case(num_cases: int) -> None:
    ids = [f"c{i}" for i in range(num_cases)]
    held = hold_out(ids, 0.95, seed=0)
    assert 1 <= len(held) < num_cases


# --- geometry: image, label and modalities on one voxel grid ---------------------------

LPS_1MM = np.array([[-1.0, 0, 0, 120.0], [0, -1.0, 0, 120.0], [0, 0, 1.0, -70.0], [0, 0, 0, 1]])


def rewrite_affine(path: Path, affine: np.ndarray) -> None:
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine), str(path))


def test_a_label_with_another_orientation_than_its_image_is_named(tmp_path: Path) -> None:
    # BraTS-style: image saved LPS, label saved with an identity (RAS) affine. The same
    # voxel array, yet after reorientation the two would not overlap at all.
    manifest = one_case(tmp_path, volume(), label_map())
    rewrite_affine(tmp_path / "imagesTr/c0.nii.gz", LPS_1MM)
    problem = only_problem(manifest)
    assert "not on one voxel grid" in problem and "orientation LPS vs RAS" in problem
    assert str(tmp_path / "labelsTr/c0.nii.gz") in problem
    assert str(tmp_path / "imagesTr/c0.nii.gz") in problem


def test_a_label_shifted_from_its_image_says_how_far(tmp_path: Path) -> None:
    manifest = one_case(tmp_path, volume(), label_map())
    shifted = np.eye(4)
    shifted[:3, 3] = [3.0, 4.0, 0.0]
    rewrite_affine(tmp_path / "labelsTr/c0.nii.gz", shifted)
    assert "origins 5 mm apart" in only_problem(manifest)


def test_modalities_on_different_grids_are_named(tmp_path: Path) -> None:
    manifest = one_case(tmp_path, [volume(), volume()], label_map(), modality=("T1", "FLAIR"))
    rewrite_affine(tmp_path / "imagesTr/c0_0001.nii.gz", np.diag([1.0, 1.0, 2.0, 1.0]))
    problem = only_problem(manifest)
    assert "modalities are not on one voxel grid" in problem
    assert "spacing (1.0, 1.0, 1.0) vs (1.0, 1.0, 2.0) mm" in problem


def test_affines_equal_up_to_float32_rounding_pass(tmp_path: Path) -> None:
    manifest = one_case(tmp_path, volume(), label_map())
    nudged = np.eye(4)
    nudged[:3, 3] = 1e-4
    rewrite_affine(tmp_path / "labelsTr/c0.nii.gz", nudged)
    (report,) = check_manifest(load_manifest(manifest))
    assert report.ok, report.problems
