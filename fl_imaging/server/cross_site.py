"""Cross-site evaluation: every site's briefly fine-tuned model evaluated at every site.

Only models travel between sites (through the server), never data.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl_imaging.config import RunPlan
from fl_imaging.protocol import ConfigKey, MetricKey, RecordKey, SiteKey
from fl_imaging.server.replies import decode_updates

logger = logging.getLogger("fl_imaging.server")


def cross_site_evaluation(
    grid: Grid, plan: RunPlan, arrays: ArrayRecord, node_sites: dict[int, str], last_round: int
) -> dict[str, Any]:
    """Fine-tune the global model briefly at each site, then evaluate every model at every site.

    Only models travel between sites (through the server), never data. A private site
    whose budget is spent sends no fine-tuned model. Returns
    ``{"models": [...], "sites": [...], "dice": {model: {site: mean Dice}}}``.
    """
    nodes = list(grid.get_node_ids())
    config = ConfigRecord(
        {
            ConfigKey.SERVER_ROUND: last_round,
            ConfigKey.FINETUNE_EPOCHS: plan.strategy.cross_site_epochs,
        }
    )

    def to_all(record: ArrayRecord, message_type: str, cfg: ConfigRecord) -> list[Message]:
        content = RecordDict({RecordKey.ARRAYS: record, RecordKey.CONFIG: cfg})
        messages = [Message(content, message_type=message_type, dst_node_id=n) for n in nodes]
        return list(grid.send_and_receive(messages, timeout=plan.strategy.round_timeout))

    finetuned: dict[str, ArrayRecord] = {}
    # fine-tuned models come back encoded like any update (undecodable ones are left out)
    replies, _ = decode_updates(
        to_all(arrays, MessageType.TRAIN, config), arrays, node_sites, plan, last_round
    )
    for reply in replies:
        if reply.has_error() or RecordKey.ARRAYS not in reply.content:
            continue  # failed, or a private site with no budget left
        site = node_sites.get(reply.metadata.src_node_id)
        if site is None or site != str(reply.content[RecordKey.SITE][SiteKey.NAME]):
            continue  # not admitted, or names another site than it was admitted as
        finetuned[f"{site} fine-tuned"] = reply.content[RecordKey.ARRAYS]
    models = {"global": arrays, **dict(sorted(finetuned.items()))}
    dice: dict[str, dict[str, float]] = {}
    for name, record in models.items():
        dice[name] = {}
        for reply in to_all(record, MessageType.EVALUATE, ConfigRecord()):
            if not reply.has_error():
                site = str(reply.content[RecordKey.SITE][SiteKey.NAME])
                dice[name][site] = float(reply.content[RecordKey.METRICS][MetricKey.DICE_MEAN])
        logger.info("cross-site: %s -> %s", name, {k: round(v, 3) for k, v in dice[name].items()})
    return {"models": list(models), "sites": plan.site_names, "dice": dice}
