"""Strategy factory: Flower's Message-API strategies, chosen and sized by the run plan."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx

from fl_imaging.config import RunPlan


def build_strategy(plan: RunPlan) -> FedAvg:
    """The configured strategy; every site must be connected before a round starts.

    ``fedprox`` is Flower's ``FedProx``: it sends ``proximal-mu`` with each training
    round and the sites add the proximal term to their loss (``training.train_local``).
    """
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
