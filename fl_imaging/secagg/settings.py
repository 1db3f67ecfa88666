"""SecAgg+ settings: the protocol's sizes per round, and what cannot work with it.

Light on purpose (no Flower): :mod:`fl_imaging.config` validates a plan with it, and
:mod:`fl_imaging.secagg.server` sizes each round's protocol with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config imports this module: types only, no cycle
    from fl_imaging.config import RunPlan, SecureAggregationConfig

# Flower's SecAgg+ modulus (2**32): a round's sum of quantised updates must stay below it
MODULUS_RANGE = 2**32
# strategies that need every site's own update (median, trimming, Krum distances)
NEEDS_SINGLE_UPDATES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def protocol_sizes(cfg: SecureAggregationConfig, num_sampled: int) -> tuple[int, int]:
    """``(num_shares, reconstruction_threshold)`` for a round that samples ``num_sampled`` sites.

    ``num_shares`` null: every sampled site; ``reconstruction_threshold`` null: a
    majority of ``num_shares``.
    """
    shares = cfg.num_shares if cfg.num_shares is not None else num_sampled
    threshold = cfg.reconstruction_threshold
    return shares, threshold if threshold is not None else shares // 2 + 1


def sites_per_round(plan: RunPlan) -> int:
    """How many sites Flower's strategies sample for a training round (all connected)."""
    num_sites = len(plan.federation.sites)
    return max(int(num_sites * plan.strategy.fraction_train), plan.strategy.min_sites)


def secure_aggregation_problems(plan: RunPlan) -> list[str]:
    """What in ``plan`` cannot work with ``secure_aggregation`` (empty when fine or off)."""
    cfg = plan.secure_aggregation
    if cfg.name == "none":
        return []
    if cfg.name != "secaggplus":
        return [f"secure_aggregation.name {cfg.name!r} is unknown; choose none or secaggplus"]
    return _protocol_problems(plan) + [
        f"{name} with secure_aggregation=secaggplus: {reason}"
        for name, reason in _incompatible_settings(plan).items()
    ]


def _protocol_problems(plan: RunPlan) -> list[str]:
    """Sites per round, shares, threshold, quantisation: what SecAgg+ itself needs."""
    cfg = plan.secure_aggregation
    key, problems = "secure_aggregation", []
    sampled = sites_per_round(plan)
    shares, threshold = protocol_sizes(cfg, sampled)
    if sampled < 3:
        problems.append(
            f"{key}=secaggplus needs at least 3 sites per round (Flower's SecAgg+ shares "
            f"each key among at least 3 sites), this plan trains {sampled}"
        )
    elif not 3 <= shares <= sampled:
        problems.append(
            f"{key}.num_shares={shares} must be between 3 and the {sampled} sites trained "
            f"per round (null: all of them)"
        )
    elif shares < sampled and shares % 2 == 0:
        problems.append(
            f"{key}.num_shares={shares} must be odd when below the {sampled} sites per round "
            f"(each site shares with num_shares // 2 neighbours on either side)"
        )
    elif not 2 <= threshold < shares:
        problems.append(
            f"{key}.reconstruction_threshold={threshold} must be >= 2 and below "
            f"num_shares={shares} (null: a majority of num_shares)"
        )
    if plan.strategy.min_sites < 2:
        problems.append(
            f"strategy.min_sites={plan.strategy.min_sites} with {key}=secaggplus: a sum of "
            f"one site's update is that site's update; at least 2 sites must contribute"
        )
    if cfg.clipping_range <= 0:
        problems.append(f"{key}.clipping_range must be > 0, got {cfg.clipping_range}")
    if cfg.max_weight <= 0:
        problems.append(f"{key}.max_weight must be > 0, got {cfg.max_weight}")
    if cfg.quantization_bits < 8 or sampled * 2**cfg.quantization_bits >= MODULUS_RANGE:
        problems.append(
            f"{key}.quantization_bits={cfg.quantization_bits} must be >= 8 and keep "
            f"{sampled} sites x 2**bits below the modulus 2**32 (at most "
            f"{((MODULUS_RANGE - 1) // max(sampled, 1)).bit_length() - 1} bits here)"
        )
    return problems


def _incompatible_settings(plan: RunPlan) -> dict[str, str]:
    """Settings that need what secure aggregation hides (single updates): name -> why."""
    why_not = {
        "strategy.name": (
            plan.strategy.name in NEEDS_SINGLE_UPDATES,
            f"{plan.strategy.name} needs every site's own update; secure aggregation gives "
            f"the server only their weighted mean: use fedavg, fedprox, fedavgm, fedadam or "
            f"fedyogi",
        ),
        "strategy.screen_norm_factor": (
            plan.strategy.screen_norm_factor is not None,
            "screening compares single updates, which the server never sees: set it to null "
            "(each site checks its own update for NaN/Inf before masking it)",
        ),
        "strategy.cross_site_epochs": (
            plan.strategy.cross_site_epochs > 0,
            "cross-site evaluation sends each site's fine-tuned model to the server in the "
            "clear: set it to 0",
        ),
        "privacy.central.noise_multiplier": (
            plan.privacy.central.noise_multiplier is not None,
            "server-side clipping needs each site's update; use DP-SGD at the sites "
            "(federation.sites[*].privacy.epsilon), whose noise is added before masking",
        ),
        "strategy.evaluate_in_train": (
            plan.strategy.evaluate_in_train,
            "the SecAgg+ train step carries only the masked update and its metrics: set it "
            "to false",
        ),
        "compression.codec": (
            plan.compression.codec != "none",
            "SecAgg+ quantises and masks the update itself and the server cannot decode a "
            "single site's compressed update: use compression=none",
        ),
    }
    return {name: reason for name, (bad, reason) in why_not.items() if bad}
