"""The site's side of SecAgg+: Flower's ``secaggplus_mod`` around the plain training.

See :mod:`fl_imaging.secagg.server` for the protocol and what the server learns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fl_imaging.config import RunPlan, SecureAggregationConfig
from fl_imaging.ml.models import new_model
from fl_imaging.protocol import MetricKey, RecordKey, SiteKey
from fl_imaging.secagg import SecureAggregationError
from fl_imaging.updates.compression import CompressionError, decode_update
from fl_imaging.updates.wire import read_update, to_record

logger = logging.getLogger(__name__)

# the ClientApp's plain train handler
TrainHandler = Callable[[Message, Context], Message]


def is_secure_message(msg: Message) -> bool:
    """True for a message of Flower's SecAgg+ protocol (it carries the stage configs)."""
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def secure_train(msg: Message, context: Context, plan: RunPlan, train: TrainHandler) -> Message:
    """Answer one SecAgg+ stage through Flower's ``secaggplus_mod``.

    In the masked-vector stage the mod calls ``train`` (the ClientApp's plain handler)
    with the global model and round config; the site's update ``local - global`` goes
    to the mod, which masks it. The reply keeps the site's metrics and name.
    """

    def call_next(fit: Message, ctx: Context) -> Message:
        return _train_for_mod(fit, ctx, plan, train)

    return secaggplus_mod(msg, context, call_next)


def _train_for_mod(fit: Message, context: Context, plan: RunPlan, train: TrainHandler) -> Message:
    """Legacy fit message in, legacy fit result (the site's update) out, via ``train``."""
    fitins = compat.recorddict_to_fitins(fit.content, keep_input=True)
    reference = _named(plan, parameters_to_ndarrays(fitins.parameters))
    # The plain handler's request is this message with Message-API content (a ClientApp
    # cannot create messages of its own; Flower's mods edit the message in place too).
    fit.content = RecordDict(
        {RecordKey.ARRAYS: to_record(reference), RecordKey.CONFIG: ConfigRecord(fitins.config)}
    )
    reply = train(fit, context)
    if reply.has_error():
        raise SecureAggregationError(reply.error.reason)
    content = reply.content
    site = str(content[RecordKey.SITE][SiteKey.NAME])
    metrics = content[RecordKey.METRICS]
    num_examples = int(metrics[MetricKey.NUM_EXAMPLES])
    if RecordKey.UPDATE in content:
        try:
            local = decode_update(read_update(content), reference)
        except CompressionError as exc:
            raise SecureAggregationError(f"site {site}: {exc}") from exc
        update = [
            local[k].astype(np.float64) - ref.astype(np.float64) for k, ref in reference.items()
        ]
    else:  # no update (privacy budget exhausted): a zero update of weight 0
        num_examples = 0
        update = [np.zeros(ref.shape) for ref in reference.values()]
    _check_update(site, reference, update, num_examples, plan.secure_aggregation)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), num_examples, {})
    out = compat.fitres_to_recorddict(fitres, keep_input=False)
    out[RecordKey.METRICS] = metrics
    out[RecordKey.SITE] = content[RecordKey.SITE]
    if RecordKey.REFUSAL in content:
        out[RecordKey.REFUSAL] = content[RecordKey.REFUSAL]
    return Message(out, reply_to=fit)


def _named(plan: RunPlan, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Name the global model's arrays (legacy ``Parameters`` keep only their order)."""
    names = new_model(plan).state_dict()
    if len(arrays) != len(names) or any(
        tuple(a.shape) != tuple(t.shape) for a, t in zip(arrays, names.values(), strict=False)
    ):
        raise SecureAggregationError(
            f"the global model received ({len(arrays)} arrays) does not match this site's "
            f"model.* config ({len(names)} tensors); server and sites must share one config"
        )
    return dict(zip(names, arrays, strict=True))


def _check_update(
    site: str,
    reference: dict[str, np.ndarray],
    update: list[np.ndarray],
    num_examples: int,
    cfg: SecureAggregationConfig,
) -> None:
    """Refuse a non-finite update; warn when quantisation will clip part of it.

    The server cannot screen a masked update, so the site checks its own: NaN or Inf
    would corrupt the sum of every site.
    """
    for name, delta in zip(reference, update, strict=True):
        if not np.all(np.isfinite(delta)):
            raise SecureAggregationError(
                f"site {site}: its update has non-finite values (NaN/Inf) in {name}; it is not sent"
            )
    weight = num_examples / cfg.max_weight
    largest = max((float(np.max(np.abs(d))) for d in update if d.size), default=0.0) * weight
    if largest > cfg.clipping_range:
        clipped = sum(int(np.sum(np.abs(d) * weight > cfg.clipping_range)) for d in update)
        logger.warning(
            "site %s: secure aggregation clips %d update entries to +-%g (largest weighted "
            "entry %.3g = %d/%g x update); raise secure_aggregation.clipping_range",
            site,
            clipped,
            cfg.clipping_range,
            largest,
            num_examples,
            cfg.max_weight,
        )
