"""Continuing a stopped run: its last completed round, model, strategy state and summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from fl_imaging.config import ConfigError, RunPlan, plan_to_dict, to_plan
from fl_imaging.outputs.reporting import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CheckpointReadError,
    RunFolder,
    load_checkpoint,
    read_summary,
)


@dataclass(frozen=True)
class ResumeState:
    """Where a stopped run left off (from its ``checkpoints/last.pt`` and ``summary.json``).

    ``state_dict`` is the delivered model (with ``strategy.global_ema_decay``, the moving
    average); ``training_state_dict`` the global model training goes on from (the same
    tensors when the run kept no average).
    """

    last_round: int
    state_dict: dict[str, Any]
    strategy_state: dict[str, Any]
    summary: dict[str, Any]
    training_state_dict: dict[str, Any]


def load_resume_state(run: RunFolder, plan: RunPlan) -> ResumeState:
    """Read a run folder's last completed round; refuse one trained under another setup.

    Raises:
        ConfigError: the folder's model, data or sites differ from ``plan``, it has no
            completed round to continue from, or ``plan.rounds`` leaves none to run.
    """
    stored = to_plan(OmegaConf.load(run.path / CONFIG_FILE), check=False)
    old, new = plan_to_dict(stored), plan_to_dict(plan)
    for key in ("model", "data"):
        if old[key] != new[key]:
            raise ConfigError(
                f"cannot resume {run.path}: its {key} config differs ({old[key]} vs {new[key]})"
            )
    if stored.site_names != plan.site_names:
        raise ConfigError(
            f"cannot resume {run.path}: it was run with sites {stored.site_names}, "
            f"not {plan.site_names}"
        )
    last = run.path / CHECKPOINT_DIR / "last.pt"
    if not last.is_file():
        raise ConfigError(f"cannot resume {run.path}: no completed round (no {last.name})")
    try:
        ckpt = load_checkpoint(last)
    except CheckpointReadError as exc:
        raise ConfigError(f"cannot resume {run.path}: {exc}") from exc
    last_round = int(ckpt["round"])
    if last_round >= plan.rounds:
        # else the final evaluation rows of its last round would be dropped and never redone
        raise ConfigError(
            f"cannot resume {run.path}: it has completed {last_round} rounds, and "
            f"rounds={plan.rounds} leaves nothing to run; set rounds above {last_round} to "
            f"train on (the run folder was not changed)"
        )
    summary = read_summary(run.path)
    return ResumeState(
        last_round,
        ckpt["state_dict"],
        ckpt.get("strategy_state", {}),
        summary,
        ckpt.get("training_state_dict", ckpt["state_dict"]),
    )
