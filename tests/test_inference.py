"""NIfTI inference with a run's checkpoint: round trip, Dice, clear errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fl_imaging.config import RunPlan, plan_to_dict
from fl_imaging.data.manifest import load_manifest
from fl_imaging.ml.models import new_model
from fl_imaging.outputs.reporting import RunFolder
from fl_imaging.tools.cli import main
from fl_imaging.tools.inference import (
    CheckpointError,
    dice_per_label,
    load_predictor,
    predict_file,
)


def save_checkpoint(plan: RunPlan, tmp_path: Path, **changes: object) -> Path:
    run = RunFolder(tmp_path / "run")
    meta = {
        "config": plan_to_dict(plan),
        "labels": dict(plan.data.labels),
        "modalities": list(plan.data.modalities),
        "round": 1,
    }
    meta.update(changes)
    state = meta.pop("state_dict", new_model(plan).state_dict())
    return run.save_checkpoint("best", state, **meta)


def test_prediction_keeps_the_scan_grid_affine_and_label_set(
    tiny_plan: RunPlan, tiny_sites: list[Path], tmp_path: Path
) -> None:
    # hospital_b scans at 1.75 mm; the model works at 2 mm: the output must come back
    scan = load_manifest(tiny_sites[1]).cases[0].images[0]
    predictor = load_predictor(save_checkpoint(tiny_plan, tmp_path))
    out = tmp_path / "seg.nii.gz"
    labels = predict_file(predictor, scan, out)

    written, original = nib.load(str(out)), nib.load(str(scan))
    assert written.shape == original.shape == labels.shape
    assert np.allclose(written.affine, original.affine)
    assert written.header.get_zooms() == original.header.get_zooms()
    assert written.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2}


def test_dice_of_a_known_overlap() -> None:
    pred = np.zeros((6, 6, 6), dtype=np.int64)
    label = np.zeros_like(pred)
    pred[0:2, 0:2, 0:2] = 1  # 8 voxels
    label[1:3, 0:2, 0:2] = 1  # 8 voxels, 4 shared -> Dice 2*4/16
    pred[4:6, 4:6, 4:6] = 2
    label[4:6, 4:6, 4:6] = 2  # identical -> 1
    dice = dice_per_label(pred, label, {0: "background", 1: "oedema", 2: "core"})
    assert dice == {"oedema": pytest.approx(0.5), "core": pytest.approx(1.0)}


def test_wrong_channel_count_names_the_scan(
    tiny_plan: RunPlan, tiny_sites: list[Path], tmp_path: Path
) -> None:
    tiny_plan.data.modalities = ["T1c", "FLAIR"]
    predictor = load_predictor(save_checkpoint(tiny_plan, tmp_path))
    scan = load_manifest(tiny_sites[0]).cases[0].images[0]
    with pytest.raises(ValueError, match=rf"{scan.name}.*1 channel.*expects 2"):
        predict_file(predictor, scan, tmp_path / "x.nii.gz")


def test_checkpoint_that_does_not_fit_its_config_is_refused(
    tiny_plan: RunPlan, tmp_path: Path
) -> None:
    other = RunPlan(**{**tiny_plan.__dict__})
    other.model = type(tiny_plan.model)(channels=[8, 16, 32], strides=[2, 2])
    path = save_checkpoint(tiny_plan, tmp_path, state_dict=new_model(other).state_dict())
    with pytest.raises(CheckpointError, match="do not match"):
        load_predictor(path)


def test_predict_command_reports_dice_per_scan(
    tiny_plan: RunPlan,
    tiny_sites: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site_dir = tiny_sites[2].parent
    checkpoint = save_checkpoint(tiny_plan, tmp_path)
    out = tmp_path / "preds"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(checkpoint),
                "--input",
                str(site_dir / "imagesTr"),
                "--output",
                str(out),
                "--label",
                str(site_dir / "labelsTr"),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    scans = sorted((site_dir / "imagesTr").glob("*.nii.gz"))
    assert len(lines) == len(scans) and all("Dice oedema" in line for line in lines)
    assert sorted(p.name for p in out.iterdir()) == [s.name for s in scans]


def test_a_round_0_checkpoint_is_refused_unless_asked_for(
    tiny_plan: RunPlan, tmp_path: Path
) -> None:
    # the initial model of a run that stopped before training would predict nonsense
    checkpoint = save_checkpoint(tiny_plan, tmp_path, round=0)
    with pytest.raises(CheckpointError, match=r"round-0 model: it was never trained"):
        load_predictor(checkpoint)
    assert load_predictor(checkpoint, allow_untrained=True).labels


def test_a_checkpoint_of_a_failed_run_is_refused(tiny_plan: RunPlan, tmp_path: Path) -> None:
    checkpoint = save_checkpoint(tiny_plan, tmp_path)
    RunFolder(tmp_path / "run").write_summary({"status": "finished_with_failures"})
    with pytest.raises(CheckpointError, match=r"status 'finished_with_failures'"):
        load_predictor(checkpoint)


def test_predict_takes_one_file_per_modality(
    tiny_plan: RunPlan, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # BraTS-style: t1c.nii.gz and flair.nii.gz, not one 4D file
    from fl_imaging.data.synthetic import generate_federation

    [manifest, *_] = generate_federation(
        tmp_path / "mm",
        num_sites=3,
        total_cases=12,
        fov_mm=32.0,
        modalities=("T1c", "FLAIR"),
        modality_layout="files",
        seed=1,
    )
    tiny_plan.data.modalities = ["T1c", "FLAIR"]
    case = load_manifest(manifest).cases[0]
    checkpoint = save_checkpoint(tiny_plan, tmp_path)
    out = tmp_path / "seg.nii.gz"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(checkpoint),
                "--input",
                *map(str, case.images),
                "--output",
                str(out),
                "--label",
                str(case.label),
            ]
        )
        == 0
    )
    assert "Dice oedema" in capsys.readouterr().out
    first = nib.load(str(case.images[0]))
    written = nib.load(str(out))
    assert written.shape == first.shape and np.allclose(written.affine, first.affine)
    predictor = load_predictor(checkpoint)
    with pytest.raises(ValueError, match=r"3 files given but the model expects 2 modalities"):
        predict_file(predictor, [*case.images, case.images[0]], out)
    moved = tmp_path / "flair_moved.nii.gz"
    img = nib.load(str(case.images[1]))
    shifted = img.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), shifted), str(moved))
    with pytest.raises(ValueError, match=r"not on one voxel grid \(origins 5 mm apart\)"):
        predict_file(predictor, [case.images[0], moved], out)
