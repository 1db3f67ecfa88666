"""The overrides of ``fl-imaging run`` reach the apps through Flower's ``--run-config`` intact."""

from __future__ import annotations

import pytest
from flwr.common.config import parse_config_args

from fl_imaging.config import ConfigError, compose, run_config_string, split_overrides
from fl_imaging.protocol import RunConfigKey

AWKWARD = [  # one kind of quote per run: the both-kinds case is refused (below)
    "rounds=3",
    'name="a b"',  # a double-quoted Hydra string with a space
    "train.class_weights=[0.1,1,1]",
    "federation.sites=[{name:public,manifest:/tmp/a b/p.json}]",
    "+extra=back\\slash $HOME `x` ;|&<>*?#~ (a) {b}",
]


def test_overrides_with_quotes_spaces_and_shell_characters_survive_the_run_config() -> None:
    run_config = parse_config_args([run_config_string("hippocampus_private", AWKWARD)])
    assert run_config[RunConfigKey.EXPERIMENT] == "hippocampus_private"
    assert split_overrides(str(run_config[RunConfigKey.OVERRIDES])) == AWKWARD


def test_a_quoted_hydra_value_composes_on_the_app_side() -> None:
    run_config = parse_config_args([run_config_string("demo", ['name="my run"'])])
    plan = compose(
        str(run_config[RunConfigKey.EXPERIMENT]), str(run_config[RunConfigKey.OVERRIDES])
    )
    assert plan.name == "my run"


def test_no_overrides_and_no_experiment_still_parse() -> None:
    run_config = parse_config_args([run_config_string("", [])])
    assert run_config == {RunConfigKey.EXPERIMENT: "", RunConfigKey.OVERRIDES: ""}


@pytest.mark.parametrize("item", ["name=a\nb", "name=a\tb"])
def test_a_control_character_is_refused_by_name(item: str) -> None:
    with pytest.raises(ConfigError, match="control character"):
        run_config_string("demo", [item])


def test_both_quote_characters_are_refused_with_the_overrides_named() -> None:
    with pytest.raises(ConfigError, match=r"both ' and \" quotes.*name='a b'"):
        run_config_string("demo", ["name='a b'", 'train.lr="0.1"'])


@pytest.mark.parametrize("quoted", ['name="a b"', "name='a b'"])
def test_a_single_kind_of_quote_in_any_override_is_carried(quoted: str) -> None:
    items = [quoted, "rounds=2", "note=back\\slash"]
    run_config = parse_config_args([run_config_string("demo", items)])
    assert split_overrides(str(run_config[RunConfigKey.OVERRIDES])) == items
