"""What a run asks of a site's privacy, whether the site refuses, and the pre-flight plan.

The site's budget resolved against the run's defaults (delta, clipping norm), the
hospital's own policy and its ledger; and the DP-SGD plan of every private site
(`fl-imaging privacy plan`).
"""

from __future__ import annotations

from fl_imaging.config import RunPlan
from fl_imaging.data.manifest import (
    TRAIN,
)
from fl_imaging.ml.models import new_model
from fl_imaging.privacy.accounting import default_delta
from fl_imaging.privacy.dp_sgd import is_trainable
from fl_imaging.privacy.ledger import (
    has_ledger,
    read_ledger,
)
from fl_imaging.privacy.planning import SitePrivacyPlan, plan_site
from fl_imaging.privacy.policy import (
    PrivacyRequest,
    SitePolicy,
    refusal,
)
from fl_imaging.site.resolve import Site, configured_sites, load_site_manifest, site_batch_size


def site_delta(site: Site, plan: RunPlan, num_train: int) -> float:
    """The site's delta: its own, else ``privacy.delta``, else ``min(1e-5, N^-1.1)``."""
    budget = site.config.privacy
    if budget.delta is not None:
        return budget.delta
    if plan.privacy.delta is not None:
        return plan.privacy.delta
    return default_delta(num_train)


def privacy_request(site: Site, plan: RunPlan, num_train: int, epochs: int) -> PrivacyRequest:
    """What the run asks of ``site``'s privacy, defaults resolved (epsilon None: no DP)."""
    budget = site.config.privacy
    private = budget.epsilon is not None
    return PrivacyRequest(
        epsilon=budget.epsilon,
        delta=site_delta(site, plan, num_train) if private else None,
        max_grad_norm=(budget.max_grad_norm or plan.privacy.max_grad_norm) if private else None,
        accountant=plan.privacy.accountant,
        rounds=plan.rounds,
        local_epochs=epochs,
    )


def privacy_refusal(site: Site, request: PrivacyRequest, policy: SitePolicy | None) -> str | None:
    """Why the site refuses to train in this run (None: it trains).

    The site's own policy (:mod:`fl_imaging.privacy.policy`) is checked against what
    the run asks; a site that has a privacy ledger never trains without DP-SGD (that
    would void the guarantee its ledger accounts for) until an audited reset.
    """
    if policy is not None:
        reason = refusal(policy, request)
        if reason:
            return reason
    if request.epsilon is None and has_ledger(site.state_dir):
        return (
            f"the run asks for training without DP-SGD, but this site has a privacy ledger "
            f"in {site.state_dir}: its patients are protected by DP, and a plain round would "
            f"void that. Give the site its budget, or reset the ledger for new patients "
            f"(`fl-imaging privacy reset`, audited)"
        )
    return None


def privacy_plans(plan: RunPlan) -> list[SitePrivacyPlan]:
    """The pre-flight DP-SGD plan of every private configured site (docs: privacy plan).

    The same figures the site computes at its first round of the run: its manifest's
    training cases, the run's batch size and epochs, its ledger's history if it has one.
    """
    plans = []
    model = new_model(plan)
    num_weights = sum(
        p.numel() for n, p in model.named_parameters() if is_trainable(n, plan.privacy.trainable)
    )
    for site in configured_sites(plan):
        if site.config.privacy.epsilon is None:
            continue
        num_train = len(load_site_manifest(site, plan).split(TRAIN))
        epochs = site.config.local_epochs or plan.train.local_epochs
        request = privacy_request(site, plan, num_train, epochs)  # what train_round asks
        ledger = read_ledger(site.state_dir)
        plans.append(
            plan_site(
                site=site.name,
                num_train=num_train,
                batch_size=site_batch_size(site, plan, num_train),
                epochs=epochs,
                rounds=plan.rounds,
                epsilon=float(request.epsilon),  # type: ignore[arg-type]
                delta=float(request.delta),
                accountant=request.accountant,  # type: ignore[arg-type]
                history=ledger.history if ledger is not None else (),
                num_weights=num_weights,
                optimizer=plan.train.optimizer,
            )
        )
    return plans
