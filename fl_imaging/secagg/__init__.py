"""Secure aggregation (Flower's SecAgg+) driven from the Message-API apps.

:mod:`fl_imaging.secagg.server` runs the protocol's stages from the ServerApp;
:mod:`fl_imaging.secagg.client` wraps a site's plain training in Flower's
``secaggplus_mod``. The configuration checks and protocol sizes are in
:mod:`fl_imaging.config`.
"""


class SecureAggregationError(RuntimeError):
    """A round's secure aggregation could not finish (too few sites left in the protocol)."""
