"""Secure aggregation (Flower's SecAgg+) driven from the Message-API apps.

:mod:`fl_imaging.secagg.server` runs the protocol's stages from the ServerApp;
:mod:`fl_imaging.secagg.client` wraps a site's plain training in Flower's
``secaggplus_mod``; :mod:`fl_imaging.secagg.settings` sizes the protocol and says
what cannot work with it (used by the config's validation).
"""


class SecureAggregationError(RuntimeError):
    """A round's secure aggregation could not finish (too few sites left in the protocol)."""
