"""A site's side of a round, without Flower: resolve, train, evaluate, bad data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fl_imaging.config import ConfigError, RunPlan, compose
from fl_imaging.data.manifest import ManifestError, load_manifest
from fl_imaging.ml.models import new_model
from fl_imaging.site.resolve import resolve_site
from fl_imaging.site.rounds import evaluate_round, train_round
from tests.conftest import tiny_overrides


def test_partition_id_selects_the_site_in_order(tiny_plan: RunPlan) -> None:
    names = [resolve_site({"partition-id": i}, tiny_plan).name for i in range(3)]
    assert names == tiny_plan.site_names


def test_deployment_site_name_and_data_root_override(tiny_plan: RunPlan, tmp_path: Path) -> None:
    site = resolve_site(
        {"site": "hospital_b", "data-root": str(tmp_path / "d"), "state-dir": str(tmp_path / "s")},
        tiny_plan,
    )
    assert (site.name, site.index) == ("hospital_b", 1)
    assert site.data_root == tmp_path / "d"
    assert site.state_dir == tmp_path / "s"


def test_deployment_manifest_override_is_the_hospitals_own_file(
    tiny_plan: RunPlan, tiny_sites: list[Path]
) -> None:
    configured = resolve_site({"site": "hospital_a"}, tiny_plan)
    assert configured.manifest == tiny_sites[0]
    own = resolve_site({"site": "hospital_a", "manifest": str(tiny_sites[2])}, tiny_plan)
    assert own.manifest == tiny_sites[2]
    assert own.data_root == configured.data_root


def test_unknown_site_name_lists_the_known_ones(tiny_plan: RunPlan) -> None:
    with pytest.raises(ConfigError, match=r"unknown site 'hospital_x'.*hospital_a"):
        resolve_site({"site": "hospital_x"}, tiny_plan)


def test_more_nodes_than_sites_says_how_to_fix(tiny_plan: RunPlan) -> None:
    with pytest.raises(ConfigError, match="num-supernodes=3"):
        resolve_site({"partition-id": 3}, tiny_plan)


def test_train_round_changes_weights_and_reports_cases(tiny_plan: RunPlan) -> None:
    site = resolve_site({"partition-id": 0}, tiny_plan)
    weights = new_model(tiny_plan).state_dict()
    outcome = train_round(site, tiny_plan, weights, server_round=1)
    new_weights, result = outcome.weights, outcome.result
    assert new_weights is not None and result is not None and outcome.privacy is None
    assert new_weights.keys() == weights.keys()
    assert all(new_weights[k].shape == weights[k].shape for k in weights)
    assert any(not torch.equal(new_weights[k], weights[k]) for k in weights)
    train_cases = load_manifest(site.manifest).split("train")
    assert result.num_examples == len(train_cases)
    assert result.steps >= 1 and result.loss > 0


def test_evaluate_round_gives_dice_per_foreground_class(tiny_plan: RunPlan) -> None:
    site = resolve_site({"partition-id": 2}, tiny_plan)
    result = evaluate_round(site, tiny_plan, new_model(tiny_plan).state_dict())
    assert sorted(result.dice_per_class) == [1, 2]
    assert all(0.0 <= d <= 1.0 for d in result.dice_per_class.values())
    assert result.num_cases == len(load_manifest(site.manifest).split("val"))


def test_label_set_disagreeing_with_config_names_the_site(tiny_plan: RunPlan) -> None:
    tiny_plan.data.labels = {0: "background", 1: "tumour"}
    site = resolve_site({"partition-id": 1}, tiny_plan)
    with pytest.raises(ConfigError, match=r"site hospital_b.*labels"):
        evaluate_round(site, tiny_plan, new_model(tiny_plan).state_dict())


def test_corrupt_training_case_is_named_before_training(
    tiny_sites: list[Path], tmp_path: Path
) -> None:
    site_dir = tmp_path / "hospital_a"
    shutil.copytree(tiny_sites[0].parent, site_dir)
    manifest = load_manifest(site_dir / "dataset.json")
    victim = manifest.split("train")[0].images[0]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated gzip
    manifests = [site_dir / "dataset.json", *tiny_sites[1:]]
    plan = compose("demo", tiny_overrides(manifests, tmp_path))
    site = resolve_site({"partition-id": 0}, plan)
    with pytest.raises(ManifestError, match=victim.name):
        train_round(site, plan, new_model(plan).state_dict(), server_round=1)


def test_per_site_local_epochs_and_batch_size(tiny_plan: RunPlan) -> None:
    tiny_plan.federation.sites[0].local_epochs = 2
    tiny_plan.federation.sites[0].batch_size = 1
    site = resolve_site({"partition-id": 0}, tiny_plan)
    result = train_round(site, tiny_plan, new_model(tiny_plan).state_dict(), server_round=1).result
    assert result is not None
    assert result.steps == 2 * result.num_examples  # 2 epochs of single-case batches


def test_fedprox_term_keeps_weights_closer_to_the_global_model(tiny_plan: RunPlan) -> None:
    site = resolve_site({"partition-id": 2}, tiny_plan)
    start = new_model(tiny_plan).state_dict()

    def drift(mu: float) -> float:
        weights = train_round(site, tiny_plan, start, server_round=1, proximal_mu=mu).weights
        assert weights is not None
        return sum(float((weights[k].float() - start[k].float()).pow(2).sum()) for k in start)

    assert drift(100.0) < drift(0.0)


@pytest.mark.parametrize("layout", ["4d", "files"])
def test_multimodal_sites_train_and_evaluate(layout: str, tmp_path: Path) -> None:
    from fl_imaging.data.synthetic import generate_federation

    manifests = generate_federation(
        tmp_path / "mm",
        num_sites=3,
        total_cases=12,
        fov_mm=32.0,
        modalities=("T1c", "FLAIR"),
        modality_layout=layout,
        seed=1,
    )
    plan = compose("demo", [*tiny_overrides(manifests, tmp_path), "data.modalities=[T1c,FLAIR]"])
    site = resolve_site({"partition-id": 0}, plan)
    outcome = train_round(site, plan, new_model(plan).state_dict(), server_round=1)
    weights, result = outcome.weights, outcome.result
    assert weights is not None and result is not None
    first_conv = next(w for k, w in weights.items() if k.endswith("weight") and w.ndim == 5)
    assert first_conv.shape[1] == 2  # two input channels
    assert result.num_examples > 0
    assert sorted(evaluate_round(site, plan, weights).dice_per_class) == [1, 2]


def test_modality_count_disagreeing_with_config_names_the_site(tiny_plan: RunPlan) -> None:
    tiny_plan.data.modalities = ["T1c", "FLAIR"]
    site = resolve_site({"partition-id": 0}, tiny_plan)
    with pytest.raises(ConfigError, match=r"site hospital_a.*1 modalities"):
        evaluate_round(site, tiny_plan, new_model(tiny_plan).state_dict())


@pytest.mark.parametrize("local_norm", [True, False])
def test_fedbn_keeps_normalisation_layers_at_the_site(local_norm: bool, tiny_plan: RunPlan) -> None:
    from fl_imaging.site.state import LOCAL_NORM_FILE, norm_keys

    tiny_plan.model.norm = "batch"
    tiny_plan.strategy.local_norm = local_norm
    site = resolve_site({"partition-id": 0}, tiny_plan)
    first = train_round(site, tiny_plan, new_model(tiny_plan).state_dict(), server_round=1)
    assert first.weights is not None
    keys = norm_keys(new_model(tiny_plan))
    assert keys and (site.state_dir / LOCAL_NORM_FILE).is_file() == local_norm
    # a global model with absurd batch statistics: FedBN sites ignore them
    poisoned = {k: (v + 100 if k.endswith("running_mean") else v) for k, v in first.weights.items()}
    second = train_round(site, tiny_plan, poisoned, server_round=2).weights
    assert second is not None
    means = [float(second[k].abs().max()) for k in keys if k.endswith("running_mean")]
    assert (max(means) < 10) == local_norm
