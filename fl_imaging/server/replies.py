"""What the server makes of the sites' replies: metrics rows, failure rows, decoded updates.

A reply is read as the site its node was admitted as (:mod:`fl_imaging.server.identity`);
a reply that names another site is a failure, never an update. Updates arrive encoded
(:mod:`fl_imaging.updates.compression`) and are decoded and screened before the strategy
aggregates them; each one left out gets a rejection row saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, Message, RecordDict

from fl_imaging.config import RunPlan
from fl_imaging.outputs.records import MetricRow, Row, RowStatus, failure_row, rejection_row
from fl_imaging.protocol import MetricKey, RecordKey, RefusalKey, SiteKey
from fl_imaging.server.grid import replied_node
from fl_imaging.server.identity import site_name
from fl_imaging.updates.compression import CompressionError, codec_of, decode_update
from fl_imaging.updates.screening import screen_updates
from fl_imaging.updates.wire import message_bytes, read_update, to_numpy, to_record

logger = logging.getLogger("fl_imaging.server")


def named_as_admitted(reply: Message, node_sites: Mapping[int, str], sent_to: dict) -> bool:
    """False for a successful reply whose site name differs from its node's admitted site."""
    if reply.has_error() or RecordKey.SITE not in reply.content:
        return True
    admitted = node_sites.get(replied_node(reply, sent_to))
    return admitted == str(reply.content[RecordKey.SITE][SiteKey.NAME])


def site_rows(
    replies: Iterable[Message],
    server_round: int,
    split: str,
    labels: dict[int, str],
    node_sites: dict[int, str],
    bytes_down: dict[int, int] | None = None,
    sent_to: dict[str, int] | None = None,
    *,
    metrics_key: str = RecordKey.METRICS,
    count_bytes: bool = True,
    regions: Sequence[str] = (),
) -> tuple[list[MetricRow], list[MetricRow]]:
    """Metrics rows of the sites that replied, and rows describing failed replies.

    ``node_sites`` maps node ids to site names; it is learnt from every successful
    reply (a site names itself) and names the site of a later failed reply.
    ``bytes_down`` (node id -> bytes of the message it was sent) and the size of each
    reply are recorded as ``bytes_down`` / ``bytes_up``. ``sent_to`` (message id ->
    node id) names the site of an error reply the SuperLink wrote on a node's behalf
    (e.g. the node went offline): its source is the SuperLink, not the node.
    ``metrics_key`` names the record holding the metrics (``evaluation``: the validation
    a train reply carries); ``count_bytes=False`` leaves the sizes to the train rows.
    ``regions``: the ``data.label_scheme`` regions whose Dice and HD95 validation reports.
    """
    rows, failures = [], []
    bytes_down, sent_to = bytes_down or {}, sent_to or {}
    for msg in replies:
        node = replied_node(msg, sent_to)
        traffic = {Row.BYTES_UP: message_bytes(msg)} if count_bytes else {}
        if count_bytes and node in bytes_down:
            traffic[Row.BYTES_DOWN] = bytes_down[node]
        if msg.has_error():
            site = site_name(node_sites, node)
            failures.append(failure_row(server_round, site, split, msg.error.reason, **traffic))
            continue
        claimed = str(msg.content[RecordKey.SITE][SiteKey.NAME])
        site = node_sites.setdefault(node, claimed)  # a site never seen before names itself
        if not named_as_admitted(msg, node_sites, sent_to):  # the admitted name wins
            error = f"reply names site {claimed!r}, but node {node} was admitted as {site!r}"
            failures.append(failure_row(server_round, site, split, error, **traffic))
            continue
        row = {Row.ROUND: server_round, Row.SITE: site, Row.SPLIT: split}
        row |= metrics_columns(msg.content[metrics_key], labels, regions)
        if metrics_key == RecordKey.METRICS:
            row |= _status_columns(msg.content, row)
        rows.append(row | traffic)
    return sorted(rows, key=lambda r: r[Row.SITE]), failures


def metrics_columns(
    metrics: Mapping[str, Any], labels: Mapping[int, str], regions: Sequence[str] = ()
) -> MetricRow:
    """A site's ``MetricRecord`` as ``metrics.jsonl`` columns (what it reported, no more)."""
    row: MetricRow = {
        Row.LOSS: float(metrics[MetricKey.LOSS]),
        Row.NUM_EXAMPLES: int(metrics[MetricKey.NUM_EXAMPLES]),
    }
    if MetricKey.DICE_MEAN in metrics:
        row[Row.DICE_MEAN] = float(metrics[MetricKey.DICE_MEAN])
        for label, name in sorted(labels.items()):
            if label:
                row[Row.dice_of(name)] = float(metrics[MetricKey.dice_of(label)])
        for region in regions:
            row[Row.dice_of(region)] = float(metrics[MetricKey.region_dice_of(region)])
            row[Row.hd95_of(region)] = float(metrics[MetricKey.region_hd95_of(region)])
    if MetricKey.TRAIN_SECONDS in metrics:
        row[Row.STEPS] = int(metrics[MetricKey.STEPS])
        row[Row.TRAIN_SECONDS] = float(metrics[MetricKey.TRAIN_SECONDS])
    if MetricKey.TRAIN_STARTED_AT in metrics:
        row[Row.TRAIN_STARTED_AT] = float(metrics[MetricKey.TRAIN_STARTED_AT])
    if MetricKey.GPU_PEAK_MB in metrics:
        row[Row.GPU_PEAK_MB] = float(metrics[MetricKey.GPU_PEAK_MB])
    if MetricKey.EPSILON_SPENT in metrics:
        # non-private sites report inf (no DP guarantee); recorded as null
        row[Row.EPSILON_SPENT] = float(metrics[MetricKey.EPSILON_SPENT])
        row[Row.EPSILON_BUDGET] = float(metrics[MetricKey.EPSILON_BUDGET])
    return row


def _status_columns(content: RecordDict, row: MetricRow) -> MetricRow:
    """Why a training reply carries no update: its policy refused, or its budget is spent."""
    if RecordKey.REFUSAL in content:
        refusal = content[RecordKey.REFUSAL]
        return {
            Row.STATUS: str(refusal[RefusalKey.STATUS]),
            Row.REASON: str(refusal[RefusalKey.REASON]),
        }
    metrics = content[RecordKey.METRICS]
    if MetricKey.TRAINED in metrics and not int(metrics[MetricKey.TRAINED]):
        return {Row.STATUS: RowStatus.BUDGET_EXHAUSTED}
    return {}


def no_reply_error(timeout: float) -> str:
    """The failure of a node that did not reply to a message within the round's timeout."""
    return f"no reply within strategy.round_timeout={timeout:g} s"


def silent_rows(
    messages: Sequence[Message],
    replies: Sequence[Message],
    server_round: int,
    split: str,
    node_sites: Mapping[int, str],
    *,
    timeout: float,
    sent_to: dict[str, int],
    bytes_down: Mapping[int, int],
) -> list[MetricRow]:
    """A failure row for every node that was sent a message and did not reply in time."""
    silent = {m.metadata.dst_node_id for m in messages} - {
        replied_node(r, sent_to) for r in replies
    }
    error = no_reply_error(timeout)
    return [
        failure_row(
            server_round, site_name(node_sites, n), split, error, **{Row.BYTES_DOWN: bytes_down[n]}
        )
        for n in sorted(silent)
    ]


def decode_updates(
    replies: Iterable[Message],
    arrays: ArrayRecord,
    node_sites: Mapping[int, str],
    plan: RunPlan,
    server_round: int,
) -> tuple[list[Message], list[MetricRow]]:
    """Decode each training reply's encoded update into full weights (``global + delta``).

    A decoded reply carries the site's weights under ``arrays`` (and no encoded
    records), as Flower's strategies and the screening expect. A reply whose update
    cannot be decoded, uses another codec than ``compression``, or carries raw
    weights instead of an encoded update is dropped with a rejection row.
    """
    reference = to_numpy(arrays)
    codec = codec_of(plan.compression)
    kept, rejected = [], []
    for msg in replies:
        content = msg.content if not msg.has_error() else None
        if content is None or (RecordKey.UPDATE not in content and RecordKey.ARRAYS not in content):
            kept.append(msg)  # failed, or no update (privacy budget exhausted)
            continue
        try:
            encoded = read_update(content)
            if encoded.codec != codec:
                raise CompressionError(
                    f"update encoded as {encoded.codec}, the federation uses {codec}"
                )
            weights = decode_update(encoded, reference)
        except CompressionError as exc:
            site = site_name(node_sites, msg.metadata.src_node_id)
            logger.warning("rejected the update of site %s: %s", site, exc)
            rejected.append(rejection_row(server_round, site, f"undecodable update: {exc}"))
            continue
        msg.content = RecordDict(
            {
                RecordKey.ARRAYS: to_record(weights),
                RecordKey.METRICS: content[RecordKey.METRICS],
                RecordKey.SITE: content[RecordKey.SITE],
            }
        )
        kept.append(msg)
    return kept, rejected


def screen(
    replies: list[Message],
    arrays: ArrayRecord,
    node_sites: Mapping[int, str],
    plan: RunPlan,
    server_round: int,
) -> tuple[list[Message], list[MetricRow]]:
    """Drop replies whose update fails screening; return kept replies and rejection rows."""
    reference = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
    updates = {}
    for msg in replies:
        if not msg.has_error() and RecordKey.ARRAYS in msg.content:
            record = msg.content[RecordKey.ARRAYS]
            site = site_name(node_sites, msg.metadata.src_node_id)
            updates[site] = dict(zip(record.keys(), record.to_numpy_ndarrays(), strict=True))
    reasons = screen_updates(reference, updates, norm_factor=plan.strategy.screen_norm_factor)
    rows = []
    for site, reason in sorted(reasons.items()):
        logger.warning("round %d: rejected the update of site %s: %s", server_round, site, reason)
        rows.append(rejection_row(server_round, site, reason))
    kept = [m for m in replies if site_name(node_sites, m.metadata.src_node_id) not in reasons]
    return kept, rows
