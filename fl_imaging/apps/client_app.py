"""Flower ClientApp: thin wiring between Flower messages and :mod:`fl_imaging.site`.

A reply carries only the model update (encoded relative to the received global
model, :mod:`fl_imaging.updates.compression`), a few numbers (loss, Dice, case counts) and
the site's name: never voxel or label data.

This module imports neither torch nor MONAI: the handlers import the site code
(:mod:`fl_imaging.site`, :mod:`fl_imaging.secagg.server`) when the first message,
the server's "which site are you" query, arrives. Flower's simulation loads the
ClientApp in its driver process, under the same lock as the ServerApp, before it starts
Ray; with both modules light, Ray starts while the ServerApp imports torch and MONAI.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fl_imaging.config import RunPlan, compose
from fl_imaging.logs import setup_logging
from fl_imaging.privacy.policy import REFUSED_BY_POLICY
from fl_imaging.protocol import (
    ConfigKey,
    MetricKey,
    RecordKey,
    RefusalKey,
    RunConfigKey,
    SiteKey,
)
from fl_imaging.site.audit import append_audit, audit_entry, describe_records
from fl_imaging.site.private_files import append_private
from fl_imaging.updates.compression import codec_of, encode_update
from fl_imaging.updates.wire import message_bytes, to_numpy, to_record, update_records

if TYPE_CHECKING:
    from fl_imaging.ml.training import EvalResult
    from fl_imaging.site.resolve import Site
    from fl_imaging.site.rounds import RoundOutcome

app = ClientApp()
logger = logging.getLogger("fl_imaging.client")

# context.state key remembering that this site's data passed the full check in this run
_CHECKED = "data-checked"
# context.state key of the compression residual: what this site has not sent yet (error
# feedback). context.state lives with the site for the whole run (SuperNode memory) and
# no longer: a residual belongs to one run's sequence of global models.
_RESIDUAL = "compression-residual"


def _plan_and_site(context: Context) -> tuple[RunPlan, Site]:
    from fl_imaging.site.resolve import resolve_site

    setup_logging()
    plan = compose(
        str(context.run_config.get(RunConfigKey.EXPERIMENT, "")),
        str(context.run_config.get(RunConfigKey.OVERRIDES, "")),
    )
    return plan, resolve_site(context.node_config, plan)


def _unchecked(context: Context, split: str) -> bool:
    """True until the site's cases of ``split`` passed the full check in this run."""
    record = context.state.config_records.get(_CHECKED, ConfigRecord())
    return not bool(record.get(split, False))


def _mark_checked(context: Context, split: str) -> None:
    """Remember that ``split`` passed (only after it did: a failing site checks again)."""
    record = context.state.config_records.get(_CHECKED, ConfigRecord())
    record[split] = True
    context.state.config_records[_CHECKED] = record


# the longest error reason a site sends (the traceback stays in the site's own log)
MAX_REASON_CHARS = 800
ERRORS_FILE = "site_errors.log"


def short_reason(exc: BaseException) -> str:
    """One line naming the error type and its message (case and file for data errors)."""
    text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


def _keep_traceback(context: Context, text: str) -> None:
    """Append the traceback to the site's own ``site_errors.log`` (never sent)."""
    try:
        _, site = _plan_and_site(context)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        append_private(site.state_dir / ERRORS_FILE, f"--- {stamp} run {context.run_id}\n{text}\n")
    except Exception as exc:  # the site's reply must still go out
        logger.warning("could not keep the traceback in the site's %s: %s", ERRORS_FILE, exc)


Handler = Callable[[Message, Context], Message]


def _audited(handler: Handler) -> Handler:
    """Record every reply in the site's outbound audit log before Flower sends it."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        reply = handler(msg, context)
        try:
            _, site = _plan_and_site(context)
        except Exception as exc:  # the site cannot be resolved: the error reply says why
            logger.warning("outbound audit: no site to log the reply at (%s)", exc)
            return reply
        config = msg.content.config_records.get(RecordKey.CONFIG) if msg.has_content() else None
        server_round = config.get(ConfigKey.SERVER_ROUND) if config is not None else None
        if reply.has_error():
            sha = hashlib.sha256(reply.error.reason.encode()).hexdigest()
            records, error = None, reply.error.reason
        else:
            sha, records, error = reply.content.object_id, describe_records(reply.content), None
        entry = audit_entry(
            site=site.name,
            run_id=int(context.run_id),
            server_round=int(server_round) if server_round is not None else None,
            message_type=str(msg.metadata.message_type),
            num_bytes=message_bytes(reply),
            sha256=sha,
            records=records,
            error=error,
        )
        append_audit(site.state_dir, entry)
        return reply

    return wrapped


def _site_errors(handler: Handler) -> Handler:
    """Reply with a one-line error (type, case, file) instead of a traceback.

    Flower would send the whole multi-line traceback as the reason; the server shows
    this short one, and the traceback goes to the site's log and ``site_errors.log``.
    """

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            text = traceback.format_exc()
            logger.error("%s failed: %s\n%s", handler.__name__, short_reason(exc), text)
            _keep_traceback(context, text)
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=short_reason(exc))
            return Message(error, reply_to=msg)

    return wrapped


def _reply(
    msg: Message,
    site: Site,
    metrics: dict[str, float | int],
    update: dict[str, ArrayRecord | ConfigRecord] | None = None,
) -> Message:
    content = RecordDict(
        {
            RecordKey.METRICS: MetricRecord(metrics),
            RecordKey.SITE: ConfigRecord({SiteKey.NAME: site.name}),
            **(update or {}),
        }
    )
    return Message(content=content, reply_to=msg)


def _encode(
    plan: RunPlan, context: Context, received: ArrayRecord, weights: dict, feedback: bool
) -> dict[str, ArrayRecord | ConfigRecord]:
    """The update ``weights - received`` encoded with the configured codec.

    With ``compression.error_feedback`` and ``feedback`` (a round that is aggregated),
    the residual in ``context.state`` is added first and replaced by what is left.
    """
    residual = None
    if feedback and plan.compression.error_feedback:
        stored = context.state.array_records.get(_RESIDUAL)
        residual = to_numpy(stored) if stored is not None else {}
    local = {name: tensor.detach().cpu().numpy() for name, tensor in weights.items()}
    encoded, residual = encode_update(
        local, to_numpy(received), codec_of(plan.compression), residual
    )
    if residual is not None:
        context.state[_RESIDUAL] = to_record(residual)
    return update_records(encoded)


@app.train()
@_audited
@_site_errors
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training cases (or a SecAgg+ stage)."""
    from fl_imaging.secagg.client import is_secure_message, secure_train

    if is_secure_message(msg):  # a SecAgg+ stage: Flower's secaggplus_mod wraps the training
        return secure_train(msg, context, _plan_and_site(context)[0], train_step)
    return train_step(msg, context)


def train_step(msg: Message, context: Context) -> Message:
    """The plain training reply (SecAgg+'s masked-vector stage masks the update it holds)."""
    from fl_imaging.site.rounds import evaluate_round, train_round

    plan, site = _plan_and_site(context)
    config = msg.content[RecordKey.CONFIG]
    server_round = int(config.get(ConfigKey.SERVER_ROUND, 0))
    received = msg.content[RecordKey.ARRAYS]
    finetune = int(config.get(ConfigKey.FINETUNE_EPOCHS, 0))
    extra: dict[str, ArrayRecord | ConfigRecord] = {}
    if int(config.get(ConfigKey.EVALUATE_FIRST, 0)):
        # the global model this site received, on its validation cases, before training
        result = evaluate_round(
            site, plan, received.to_torch_state_dict(), validate_data=_unchecked(context, "val")
        )
        _mark_checked(context, "val")
        extra[RecordKey.EVALUATION] = ConfigRecord(_eval_metrics(result))
    outcome = train_round(
        site,
        plan,
        received.to_torch_state_dict(),
        server_round=server_round,
        run_id=str(context.run_id),
        proximal_mu=float(config.get(ConfigKey.PROXIMAL_MU, 0.0)),
        epochs=finetune or None,
        validate_data=_unchecked(context, "train"),
    )
    _mark_checked(context, "train")
    privacy = outcome.privacy
    metrics: dict[str, float | int] = {
        MetricKey.EPSILON_SPENT: privacy.epsilon_spent if privacy else math.inf,
        MetricKey.EPSILON_BUDGET: privacy.epsilon_budget if privacy else math.inf,
    }
    if outcome.result is None or outcome.weights is None:
        return _no_update_reply(msg, site, outcome, metrics, extra)
    result = outcome.result
    logger.info(
        "[%s r%d] trained %d cases, %d steps, loss %.4f, %.1f s%s",
        site.name,
        server_round,
        result.num_examples,
        result.steps,
        result.loss,
        result.seconds,
        f", epsilon {privacy.epsilon_spent:.3f} of {privacy.epsilon_budget:g}" if privacy else "",
    )
    metrics.update(
        {
            MetricKey.NUM_EXAMPLES: result.num_examples,
            MetricKey.LOSS: result.loss,
            MetricKey.STEPS: result.steps,
            MetricKey.TRAIN_SECONDS: result.seconds,
            MetricKey.TRAIN_STARTED_AT: result.started_at,
            MetricKey.TRAINED: 1,
        }
    )
    if result.gpu_peak_mb:
        metrics[MetricKey.GPU_PEAK_MB] = result.gpu_peak_mb
    # a fine-tune (cross-site evaluation) is not aggregated: it leaves the residual alone
    update = _encode(plan, context, received, outcome.weights, feedback=not finetune)
    return _reply(msg, site, metrics, {**update, **extra})


def _no_update_reply(
    msg: Message,
    site: Site,
    outcome: RoundOutcome,
    metrics: dict[str, float | int],
    extra: dict[str, ArrayRecord | ConfigRecord],
) -> Message:
    """Budget exhausted, or refused by the site's own privacy policy: the site says so.

    It sends no update; the metric keys match a normal reply.
    """
    metrics.update(
        {
            MetricKey.NUM_EXAMPLES: 0,
            MetricKey.LOSS: math.nan,
            MetricKey.STEPS: 0,
            MetricKey.TRAIN_SECONDS: 0.0,
            MetricKey.TRAINED: 0,
            MetricKey.REFUSED: int(outcome.refusal is not None),
        }
    )
    if outcome.refusal is not None:
        extra[RecordKey.REFUSAL] = ConfigRecord(
            {RefusalKey.STATUS: REFUSED_BY_POLICY, RefusalKey.REASON: outcome.refusal}
        )
    return _reply(msg, site, metrics, extra)


@app.query()
@_audited
@_site_errors
def identify(msg: Message, context: Context) -> Message:
    """Name this site (the server asks once per run, so it can name a site that fails)."""
    _, site = _plan_and_site(context)
    return Message(
        RecordDict({RecordKey.SITE: ConfigRecord({SiteKey.NAME: site.name})}), reply_to=msg
    )


@app.evaluate()
@_audited
@_site_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Dice of the received global model on this site's validation cases."""
    from fl_imaging.site.rounds import evaluate_round

    plan, site = _plan_and_site(context)
    weights = msg.content[RecordKey.ARRAYS].to_torch_state_dict()
    result = evaluate_round(site, plan, weights, validate_data=_unchecked(context, "val"))
    _mark_checked(context, "val")
    return _reply(msg, site, _eval_metrics(result))


def _eval_metrics(result: EvalResult) -> dict[str, float | int]:
    """What a site tells about a model's validation: case count, loss, Dice per label."""
    metrics: dict[str, float | int] = {
        MetricKey.NUM_EXAMPLES: result.num_cases,
        MetricKey.LOSS: result.loss,
        MetricKey.DICE_MEAN: result.dice_mean,
    }
    metrics.update({MetricKey.dice_of(k): v for k, v in result.dice_per_class.items()})
    for region, (dice, hd95) in result.regions.items():
        metrics[MetricKey.region_dice_of(region)] = dice
        metrics[MetricKey.region_hd95_of(region)] = hd95
    return metrics
