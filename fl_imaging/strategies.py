"""Strategy factory: Flower's Message-API strategies, chosen and sized by the run plan."""

from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
    Strategy,
)

from fl_imaging.config import RunPlan


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
    common = {
        "fraction_train": plan.strategy.fraction_train,
        "fraction_evaluate": plan.strategy.fraction_evaluate,
        "min_train_nodes": plan.strategy.min_sites,
        "min_evaluate_nodes": plan.strategy.min_sites,
        "min_available_nodes": len(plan.federation.sites),
    }
    if plan.strategy.name == "fedavg":
        return FedAvg(**common)
    if plan.strategy.name == "fedprox":
        return FedProx(proximal_mu=plan.strategy.proximal_mu, **common)
    raise ValueError(f"strategy.name {plan.strategy.name!r} is unknown")
