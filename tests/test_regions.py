"""Tumour regions (WT/TC/ET) from label conventions: Dice and HD95 against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from fl_imaging.config import ConfigError, compose
from fl_imaging.data.regions import SCHEMES, region_metrics, regions_of, scheme_problems
from fl_imaging.ml.training import evaluate
from tests.test_dice import Oracle

BRATS21 = SCHEMES["brats2021"]


def volume() -> torch.Tensor:
    return torch.zeros(12, 12, 12, dtype=torch.long)


def test_region_dice_unions_the_labels_of_the_region() -> None:
    truth, pred = volume(), volume()
    truth[2:6, 2:6, 2:6] = 2  # oedema, 64 voxels...
    truth[3:5, 3:5, 3:5] = 4  # ...around 8 voxels of enhancing tumour
    pred[2:6, 2:6, 2:6] = 2
    pred[3:5, 3:5, 3:5] = 1  # the core called necrosis instead of enhancing
    found = region_metrics(pred, truth, BRATS21)
    assert found["WT"] == (1.0, 0.0)  # every tumour voxel found
    assert found["TC"] == (1.0, 0.0)  # {1, 4} in both: the same 8 voxels
    assert found["ET"] == (0.0, pytest.approx(math.sqrt(3) * 12))  # missed: diagonal


def test_region_hd95_is_in_millimetres_of_the_given_spacing() -> None:
    truth, pred = volume(), volume()
    truth[2:6, 2:6, 2:6] = 4
    pred[4:8, 2:6, 2:6] = 4  # shifted by 2 voxels along the first axis
    dice, hd95 = region_metrics(pred, truth, {"ET": (4,)}, spacing=(2.0, 1.0, 1.0))["ET"]
    assert dice == pytest.approx(2 * 32 / 128)  # half of each overlaps
    assert hd95 == pytest.approx(4.0)  # 2 voxels x 2 mm


def test_empty_truth_and_empty_prediction_score_as_brats_does() -> None:
    empty = volume()
    assert region_metrics(empty, empty, BRATS21)["ET"] == (1.0, 0.0)
    something = volume()
    something[1, 1, 1] = 4
    assert region_metrics(something, empty, BRATS21)["ET"][0] == 0.0


def test_evaluate_reports_regions_averaged_over_every_case() -> None:
    cases = []
    for with_et in (True, False):  # the second case has no enhancing tumour at all
        label = torch.zeros(1, 1, 8, 8, 8)
        label[0, 0, 2:6, 2:6, 2:6] = 2
        if with_et:
            label[0, 0, 3:5, 3:5, 3:5] = 4
        cases.append({"image": label.clone(), "label": label})
    result = evaluate(
        Oracle(5), cases, num_classes=5, roi_size=[8, 8, 8], foreground=[1, 2, 4], regions=BRATS21
    )
    # a perfect model: 1.0 everywhere, the case without ET included (nothing predicted)
    assert result.regions == {"WT": (1.0, 0.0), "TC": (1.0, 0.0), "ET": (1.0, 0.0)}
    assert math.isnan(result.dice_per_class[1])  # no necrosis anywhere: left out


def test_schemes_are_checked_against_the_labels() -> None:
    assert regions_of("exclusive") == {}
    with pytest.raises(ValueError, match="unknown label scheme 'brats2099'"):
        regions_of("brats2099")
    assert scheme_problems("brats2021", {0: "bg", 1: "ncr", 2: "ed"}) == [
        "data.label_scheme=brats2021 needs label values [1, 2, 4]; data.labels lacks [4]"
    ]
    [clash] = scheme_problems("brats2023", {0: "bg", 1: "NCR", 2: "ED", 3: "ET"})
    assert "['ET'] clash" in clash


def test_a_label_scheme_is_validated_at_composition() -> None:
    with pytest.raises(ConfigError, match=r"data\.label_scheme=brats2021 needs label values"):
        compose("demo", "data.label_scheme=brats2021")  # demo labels are {0, 1, 2}
    labels = "+data.labels={0: background, 1: oedema, 2: core, 4: enhancing}"
    plan = compose("demo", ["data.label_scheme=brats2021", labels])
    assert plan.data.label_scheme == "brats2021"


def test_region_metrics_travel_from_site_to_the_run_folder_rows() -> None:
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from fl_imaging.apps.client_app import _eval_metrics
    from fl_imaging.ml.training import EvalResult
    from fl_imaging.server.replies import site_rows
    from tests.local_grid import make_message

    result = EvalResult(
        loss=0.5,
        dice_per_class={1: 0.7, 2: 0.8, 4: float("nan")},
        num_cases=2,
        regions={"WT": (0.9, 3.5), "TC": (0.8, 4.0), "ET": (1.0, 0.0)},
    )
    content = RecordDict(
        {
            "metrics": MetricRecord(_eval_metrics(result)),
            "site": ConfigRecord({"name": "hospital_a"}),
        }
    )
    request = make_message(RecordDict(), MessageType.EVALUATE, dst=1)
    reply = Message(content, reply_to=request)
    labels = {0: "bg", 1: "ncr", 2: "ed", 4: "et"}
    [row], _ = site_rows([reply], 1, "val", labels, {}, regions=["WT", "TC", "ET"])
    assert (row["dice_WT"], row["hd95_WT"], row["dice_ET"]) == (0.9, 3.5, 1.0)
    assert row["dice_mean"] == pytest.approx(0.75)  # exclusive labels; et absent: left out


@pytest.fixture(scope="module")
def brats_sites(tmp_path_factory: pytest.TempPathFactory) -> list:
    from fl_imaging.data.synthetic import generate_federation

    return generate_federation(
        tmp_path_factory.mktemp("brats"),
        num_sites=3,
        total_cases=12,
        fov_mm=40.0,
        modalities=("T1c", "FLAIR"),
        modality_layout="files",
        label_scheme="brats2021",
        seed=2,
    )


def test_the_tumour_experiment_trains_classes_0_to_3_and_reports_regions(
    brats_sites: list, tmp_path, task_identity: None
) -> None:
    # labels {0, 1, 2, 4}: four output channels (no dead channel 3), Dice per declared
    # label, region Dice and HD95 per site, predictions written back as label values
    import nibabel as nib
    import numpy as np

    from fl_imaging.config import plan_to_yaml
    from fl_imaging.data.manifest import load_manifest
    from fl_imaging.ml.models import new_model
    from fl_imaging.outputs.reporting import RunFolder, read_metrics
    from fl_imaging.server import rounds as server
    from fl_imaging.tools.inference import load_predictor, predict_file
    from tests.conftest import tiny_overrides
    from tests.local_grid import LocalGrid

    overrides = [*tiny_overrides(brats_sites, tmp_path), "rounds=1", "strategy.cross_site_epochs=0"]
    plan = compose("tumour_synthetic", overrides)
    assert new_model(plan)(torch.zeros(1, 2, 16, 16, 16)).shape[1] == 4
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))
    grid = LocalGrid(overrides)
    for context in grid.contexts.values():
        context.run_config["experiment"] = "tumour_synthetic"
    summary = server.run_federation(grid, plan, run, run_id=1)
    assert summary["status"] == "finished"
    val = [r for r in read_metrics(run.path) if r["split"] == "val" and r["round"] == 1]
    assert len(val) == 3
    for row in val:
        assert {"dice_necrosis", "dice_oedema", "dice_enhancing"} <= row.keys()
        for region in ("WT", "TC", "ET"):
            assert 0.0 <= row[f"dice_{region}"] <= 1.0 and row[f"hd95_{region}"] >= 0.0
    case = load_manifest(brats_sites[0]).cases[0]
    out = tmp_path / "seg.nii.gz"
    predict_file(load_predictor(run.path / "checkpoints" / "last.pt"), list(case.images), out)
    assert set(np.unique(np.asarray(nib.load(str(out)).dataobj)).tolist()) <= {0, 1, 2, 4}


def test_the_report_shows_region_dice_and_hd95_per_site(tmp_path) -> None:
    from fl_imaging.outputs.reporting import RunFolder, write_report

    run = RunFolder.create(tmp_path, "t", "a: 1\n")
    run.append_metrics(
        [
            {
                "round": r,
                "site": s,
                "split": "val",
                "loss": 0.5,
                "dice_mean": 0.5 + r / 10,
                "dice_WT": 0.8 + r / 100,
                "hd95_WT": 4.0 - r,
                "dice_ET": 0.6,
                "hd95_ET": 7.5,
            }
            for r in (0, 1)
            for s in ("hospital_a", "hospital_b")
        ]
    )
    run.close()
    write_report(run.path, {}, "", [])
    markdown = (run.path / "report.md").read_text()
    assert "## Tumour regions, round 1 model (validation)" in markdown
    assert "| hospital_a | 0.810 | 0.600 | 3.000 | 7.500 |" in markdown
    assert "HD95 WT (mm)" in (run.path / "report" / "index.html").read_text()


def test_label_values_with_gaps_round_trip_through_training_classes(tmp_path) -> None:
    import nibabel as nib
    import numpy as np

    from fl_imaging.data.loading import eval_transforms
    from fl_imaging.data.regions import class_values, needs_remap

    labels = {0: "background", 1: "necrosis", 2: "oedema", 4: "enhancing"}
    truth = np.zeros((8, 8, 8), dtype=np.uint8)
    truth[1:3], truth[3:5], truth[5:7] = 1, 2, 4
    for name, data in (("img", np.random.default_rng(0).random((8, 8, 8))), ("seg", truth)):
        nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(tmp_path / f"{name}.nii"))
    gaps = "+data.labels={0: background, 1: necrosis, 2: oedema, 4: enhancing}"
    plan = compose("demo", ["data.spacing=null", "data.label_scheme=brats2021", gaps])
    assert needs_remap(labels) and not needs_remap({0: "bg", 1: "a", 2: "b"})
    item = eval_transforms(plan.data)(
        {"image": str(tmp_path / "img.nii"), "label": str(tmp_path / "seg.nii")}
    )
    classes = item["label"][0].round().long().numpy()
    assert set(np.unique(classes).tolist()) == {0, 1, 2, 3}  # contiguous: no dead channel
    back = np.asarray(class_values(labels))[classes]
    assert np.array_equal(back, truth)  # and the way back is exact
