"""Strategy factory: Flower's Message-API strategies, chosen and sized by the run plan."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fl_imaging.config import ConfigError, RunPlan

# strategy.name -> Flower Message-API strategy (all aggregate what FedAvg's sampling sends)
STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,  # server-side optimisers: FedOpt family
    "fedyogi": FedYogi,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,  # robust aggregators
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
}


def build_strategy(plan: RunPlan) -> Strategy:
    """The configured strategy; every site must be connected before a round starts.

    ``fedprox`` is Flower's ``FedProx``: it sends ``proximal-mu`` with each training
    round and the sites add the proximal term to their loss (``training.train_local``).
    With ``privacy.central.noise_multiplier`` set, the strategy is wrapped in Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` (central, user-level DP at a trusted
    server; Flower's accountant for it needs equal site weights, so no epsilon is
    computed for this option here).
    """
    strategy = _base_strategy(plan)
    central = plan.privacy.central
    if central.noise_multiplier is None:
        return strategy
    return DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=central.noise_multiplier,
        clipping_norm=central.clipping_norm,
        num_sampled_clients=len(plan.federation.sites),
    )


def _base_strategy(plan: RunPlan) -> FedAvg:
    cls = STRATEGIES.get(plan.strategy.name)
    if cls is None:
        raise ConfigError(
            f"strategy.name {plan.strategy.name!r} is unknown; choose one of {sorted(STRATEGIES)}"
        )
    kwargs: dict[str, object] = {
        "fraction_train": plan.strategy.fraction_train,
        "fraction_evaluate": plan.strategy.fraction_evaluate,
        "min_train_nodes": plan.strategy.min_sites,
        "min_evaluate_nodes": plan.strategy.min_sites,
        # the ServerApp waits for every site (strategy.connect_timeout) before sampling and
        # hands the strategy the connected ones: at least min_sites of them
        "min_available_nodes": plan.strategy.min_sites,
        **plan.strategy.params,
    }
    if cls is FedProx:
        kwargs["proximal_mu"] = plan.strategy.proximal_mu
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"strategy.params {dict(plan.strategy.params)} do not fit {cls.__name__}: {exc}"
        ) from exc


def strategy_problems(plan: RunPlan) -> list[str]:
    """Problems building the configured strategy (e.g. ``strategy.params`` it does not take)."""
    try:
        build_strategy(plan)
    except (ConfigError, ValueError) as exc:
        return [str(exc)]
    return []


# Flower strategy attributes that carry server-optimiser state across rounds
_STATE_ATTRS = ("m_t", "v_t", "momentum_vector")


def _inner(strategy: Strategy) -> Strategy:
    # the central-DP wrapper keeps the aggregating strategy in `.strategy`
    return getattr(strategy, "strategy", strategy)


def _as_tensors(value: Any) -> Any:
    """NumPy arrays (nested in dicts/lists) as torch tensors: what ``weights_only`` loads."""
    import numpy as np
    import torch

    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {k: _as_tensors(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_tensors(v) for v in value]
    return value


def _as_arrays(value: Any) -> Any:
    """The inverse of :func:`_as_tensors` (Flower's strategies keep NumPy arrays)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _as_arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_arrays(v) for v in value]
    return value


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """Server-optimiser state worth checkpointing (FedOpt moments, FedAvgM momentum).

    Arrays are returned as torch tensors, so that a checkpoint holds only tensors and
    plain containers and loads with ``torch.load(weights_only=True)`` (no code runs).
    """
    inner = _inner(strategy)
    return {
        a: _as_tensors(getattr(inner, a))
        for a in _STATE_ATTRS
        if getattr(inner, a, None) is not None
    }


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put checkpointed server-optimiser state back into a freshly built strategy."""
    inner = _inner(strategy)
    for name, value in state.items():
        if name not in _STATE_ATTRS:
            raise ValueError(f"unknown strategy state {name!r} in checkpoint")
        setattr(inner, name, _as_arrays(value))
