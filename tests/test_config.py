"""Composition of the shipped config and its validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fl_imaging.config import ConfigError, compose, conf_dir, plan_to_dict

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


def test_demo_and_hippocampus_experiments_exist() -> None:
    assert {"demo", "hippocampus"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_shipped_experiment_composes(experiment: str) -> None:
    plan = compose(experiment)
    assert plan.name == experiment
    assert len(plan.federation.sites) >= 2
    assert plan_to_dict(plan)["rounds"] == plan.rounds


def test_overrides_string_and_list_agree() -> None:
    a = compose("demo", "rounds=3 train.lr=0.01")
    b = compose("demo", ["rounds=3", "train.lr=0.01"])
    assert (a.rounds, a.train.lr) == (b.rounds, b.train.lr) == (3, 0.01)


def test_misspelt_key_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        compose("demo", "train.lrr=0.1")


def test_unknown_experiment_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no_such_experiment"):
        compose("no_such_experiment")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("rounds=0", "rounds"),
        ("model.name=segresnet", "model.name"),
        ("model.strides=[2,2,2]", "model.channels"),
        ("data.patch_size=[30,32,32]", "data.patch_size"),
        ("data.intensity_percentiles=[99,1]", "data.intensity_percentiles"),
        ("data.flip_axes=[3]", "data.flip_axes"),
        ("train.lr=0", "train.lr"),
        ("strategy.name=fedmagic", "strategy.name"),
        ("strategy.min_sites=4", "strategy.min_sites"),
        ("federation.sites.1.name=hospital_a", "hospital_a"),
    ],
)
def test_semantic_problems_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose("demo", override)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        compose("demo", "rounds=0 train.lr=-1")
    assert "rounds" in str(err.value) and "train.lr" in str(err.value)


def test_relative_paths_resolve_against_root(tmp_path: Path) -> None:
    plan = compose("demo", f"paths.root={tmp_path}")
    site = plan.federation.sites[0]
    assert plan.resolve_path(site.manifest) == tmp_path / site.manifest
    assert plan.site_state_dir(site) == tmp_path / "state" / site.name
    assert plan.resolve_path("/abs/x.json") == Path("/abs/x.json")


def test_hippocampus_data_root_is_a_setting(tmp_path: Path) -> None:
    plan = compose("hippocampus", f"federation.data_root={tmp_path}")
    assert plan.site_data_root(plan.federation.sites[0]) == tmp_path


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "federation.sites.0.privacy.epsilon=0",
            r"federation\.sites\[hospital_a\]\.privacy\.epsilon",
        ),
        (
            "federation.sites.2.privacy.epsilon=-3",
            r"federation\.sites\[hospital_c\]\.privacy\.epsilon",
        ),
        (
            "federation.sites.1.privacy.epsilon=1 federation.sites.1.privacy.delta=1.5",
            r"federation\.sites\[hospital_b\]\.privacy\.delta",
        ),
        ("federation.simulation.num_supernodes=2", r"num_supernodes=2 .* 3 sites"),
        ("federation.sites.0.local_epochs=0", r"federation\.sites\[hospital_a\]\.local_epochs"),
        ("privacy.accountant=moments", r"privacy\.accountant"),
        ("privacy.lr=0", r"privacy\.lr must be > 0 \(or null: train\.lr\)"),
        ("strategy=fedprox strategy.proximal_mu=0", r"strategy\.proximal_mu"),
    ],
)
def test_site_and_privacy_problems_name_the_key_and_site(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose("demo", override)


def test_private_experiments_give_each_site_its_own_budget() -> None:
    plan = compose("hippocampus_private")
    assert [s.privacy.epsilon for s in plan.federation.sites] == [8.0, 8.0, 1.0]
    assert all(s.privacy.delta == 1e-5 for s in plan.federation.sites)
    assert plan.train.class_weights == [0.1, 1.0, 1.0]  # the recipe: out of the collapse
    # the step lr x max_grad_norm of 0.03, with every patient clipped to 0.1
    assert (plan.train.optimizer, plan.privacy.lr, plan.privacy.max_grad_norm) == ("sgd", 0.3, 0.1)
    assert plan.train.lr == 0.03  # a site without DP: the same step, unclipped
    assert plan.data.augment is False  # augmentation only adds to each patient's noise
    assert compose("hippocampus").federation.sites[0].privacy.epsilon is None


def test_flwr_run_config_example_composes_fedprox() -> None:
    # flwr run . --run-config "experiment='hippocampus' overrides='strategy=fedprox'"
    plan = compose("hippocampus", "strategy=fedprox")
    assert plan.strategy.name == "fedprox" and plan.strategy.proximal_mu > 0


def test_the_schemas_name_lists_are_the_factories_names() -> None:
    """config.py keeps its name lists light (no Flower, torch, Opacus); they must agree."""
    from opacus.accountants import create_accountant

    from fl_imaging import config
    from fl_imaging.ml import models, training
    from fl_imaging.server.strategies import STRATEGIES

    assert set(config.KNOWN_STRATEGIES) == set(STRATEGIES)
    assert set(config.KNOWN_NORMS) == set(models.NORMS)
    assert set(config.KNOWN_ACTS) == set(models.ACTIVATIONS)
    assert set(config.KNOWN_OPTIMIZERS) == set(training.OPTIMIZERS)
    for name in config.KNOWN_ACCOUNTANTS:  # Opacus knows every accountant we offer
        assert create_accountant(mechanism=name).mechanism() == name


def test_every_shipped_config_file_names_something_the_factories_know() -> None:
    from fl_imaging import config

    conf = config.conf_dir()
    known = {"strategy": config.KNOWN_STRATEGIES, "model": config.KNOWN_MODELS}
    for group, names in known.items():
        for path in sorted((conf / group).glob("*.yaml")):
            name = OmegaConf.load(path).get("name")
            assert name in names, f"{path}: name {name!r} is not one of {names}"
