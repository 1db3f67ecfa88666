"""What a run writes: the columns of ``metrics.jsonl`` and the fields of ``summary.json``.

The server's round loop writes both; the report, the sweep and the CLI read them. The
column names (:class:`Row`) and the summary's fields (:class:`RunSummary`) are defined
here once. Nothing here imports Flower or torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

# one row of metrics.jsonl: a site's metrics (or failure) in one round and split
MetricRow = dict[str, Any]


class Row(StrEnum):
    """A column of ``metrics.jsonl`` (one row per site, round and split)."""

    ROUND = "round"
    SITE = "site"
    SPLIT = "split"  # train or val
    LOSS = "loss"
    NUM_EXAMPLES = "num_examples"
    DICE_MEAN = "dice_mean"  # mean over the foreground labels
    STEPS = "steps"
    TRAIN_SECONDS = "train_seconds"
    TRAIN_STARTED_AT = "train_started_at"  # the site's clock (Unix seconds)
    GPU_PEAK_MB = "gpu_peak_mb"  # a site that trained on a GPU: its peak memory (MiB)
    EPSILON_SPENT = "epsilon_spent"  # cumulative, null for a non-private site
    EPSILON_BUDGET = "epsilon_budget"
    STATUS = "status"  # a RowStatus, or the site's privacy policy's refusal
    REASON = "reason"
    ERROR = "error"  # the reply failed (the row has no metrics)
    BYTES_UP = "bytes_up"
    BYTES_DOWN = "bytes_down"

    @staticmethod
    def dice_of(name: str) -> str:
        """The column of one label's (or region's) Dice."""
        return f"dice_{name}"

    @staticmethod
    def hd95_of(region: str) -> str:
        """The column of one region's 95th-percentile Hausdorff distance (mm)."""
        return f"hd95_{region}"


class RowStatus(StrEnum):
    """Why a site's row carries no aggregated update."""

    REJECTED = "rejected"  # undecodable, or failed screening
    BUDGET_EXHAUSTED = "budget_exhausted"  # a private site with no epsilon left


def failure_row(server_round: int, site: str, split: str, error: str, **traffic: int) -> MetricRow:
    """The row of a reply that failed (or never came); ``traffic``: bytes up / down."""
    return {Row.ROUND: server_round, Row.SITE: site, Row.SPLIT: split, Row.ERROR: error, **traffic}


def rejection_row(server_round: int, site: str, reason: str) -> MetricRow:
    """The row of a site's training update the server left out of the aggregate."""
    return {
        Row.ROUND: server_round,
        Row.SITE: site,
        Row.SPLIT: "train",
        Row.STATUS: RowStatus.REJECTED,
        Row.REASON: reason,
    }


def mean_dice(values: Iterable[float | None]) -> float:
    """Mean of the finite values (NaN when there are none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


# the metadata of a summary field that summary.json holds only once it is known
WHEN_KNOWN = {"when_known": True}


@dataclass
class RunSummary:
    """``summary.json``: what a run did so far (rewritten after every round).

    Fields with ``None`` that are marked "when known" are left out of the JSON, so a
    reader can tell "not yet" from "none".
    """

    name: str
    run_id: int
    sites: list[str]
    rounds_planned: int
    codec: str  # the update codec (bytes below are of encoded updates)
    status: str = "running"  # running, finished, finished_with_failures, failed, crashed
    rounds_completed: int = 0
    dice_mean_per_round: dict[str, float] = field(default_factory=dict)
    best_round: int | None = None
    best_dice_mean: float | None = None
    # private sites only: cumulative epsilon reported after each round
    epsilon_spent_per_site: dict[str, float] = field(default_factory=dict)
    epsilon_budget_per_site: dict[str, float] = field(default_factory=dict)
    # wall-clock seconds of each round's phases: train (send, site compute, receive),
    # aggregate (decode, screen, aggregate) and evaluate
    round_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    # bytes of every message of a round (train and evaluate), summed over sites
    bytes_per_round: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes_up_total: int = 0
    bytes_down_total: int = 0
    # every failed reply per site ({round, split, error})
    site_failures: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    started_at: float | None = field(default=None, metadata=WHEN_KNOWN)
    first_train_sent_at: float | None = field(default=None, metadata=WHEN_KNOWN)
    minutes: float | None = field(default=None, metadata=WHEN_KNOWN)
    final_dice_mean: float | None = field(default=None, metadata=WHEN_KNOWN)
    final_dice_per_site: dict[str, float] | None = field(default=None, metadata=WHEN_KNOWN)
    rejected_updates: int | None = field(default=None, metadata=WHEN_KNOWN)
    refused_by_policy: dict[str, str] | None = field(
        default=None, metadata=WHEN_KNOWN
    )  # site -> its policy's reason
    refused_nodes: list[dict[str, Any]] | None = field(
        default=None, metadata=WHEN_KNOWN
    )  # nodes not admitted
    resumed_after_rounds: list[int] | None = field(default=None, metadata=WHEN_KNOWN)
    # sites that had not recovered (no later successful reply) when the run ended
    failed_sites: dict[str, str] | None = field(default=None, metadata=WHEN_KNOWN)
    finetuned_dice_per_site: dict[str, float | None] | None = field(
        default=None, metadata=WHEN_KNOWN
    )

    # what a resumed run takes over from the summary of the run it continues
    CARRIED_OVER = frozenset(
        {
            "name",
            "sites",
            "codec",
            "status",
            "rounds_completed",
            "dice_mean_per_round",
            "best_round",
            "best_dice_mean",
            "epsilon_spent_per_site",
            "epsilon_budget_per_site",
            "round_seconds",
            "bytes_per_round",
            "bytes_up_total",
            "bytes_down_total",
            "site_failures",
            "minutes",
            "final_dice_mean",
            "final_dice_per_site",
            "rejected_updates",
            "resumed_after_rounds",
        }
    )

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``summary.json``."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or not f.metadata.get("when_known"):
                out[f.name] = value
        return out

    def continue_from(self, earlier: Mapping[str, Any], last_round: int) -> None:
        """Take over an earlier run's summary (its rounds up to ``last_round`` are kept)."""
        for key in self.CARRIED_OVER & earlier.keys():
            setattr(self, key, earlier[key])
        self.status = "running"
        self.resumed_after_rounds = [*(self.resumed_after_rounds or []), last_round]

    def record_epsilon(self, rows: Iterable[MetricRow]) -> None:
        """Each private site's cumulative epsilon and budget from its training rows."""
        for row in rows:
            spent = row.get(Row.EPSILON_SPENT)
            if spent is not None and math.isfinite(spent):
                self.epsilon_spent_per_site[row[Row.SITE]] = spent
                self.epsilon_budget_per_site[row[Row.SITE]] = row[Row.EPSILON_BUDGET]

    def record_evaluation(self, evaluated_round: int, rows: Iterable[MetricRow]) -> bool:
        """The validation Dice of a round's global model; True when it is the best so far."""
        per_site = {r[Row.SITE]: r[Row.DICE_MEAN] for r in rows}
        dice = mean_dice(per_site.values())
        self.final_dice_mean, self.final_dice_per_site = dice, per_site
        self.dice_mean_per_round[str(evaluated_round)] = dice
        if not math.isfinite(dice) or (
            self.best_dice_mean is not None and dice <= self.best_dice_mean
        ):
            return False
        self.best_round, self.best_dice_mean = evaluated_round, dice
        return True

    def record_failure(self, server_round: int, split: str, site: str, error: str) -> None:
        """A site's failed reply (the run keeps going; see ``failed_sites`` at the end)."""
        self.site_failures.setdefault(site, []).append(
            {Row.ROUND: server_round, Row.SPLIT: split, Row.ERROR: error}
        )

    def record_rejections(self, count: int) -> None:
        """Updates left out of a round's aggregate (undecodable or failed screening)."""
        self.rejected_updates = (self.rejected_updates or 0) + count

    def record_refusal(self, site: str, reason: str) -> None:
        """A site whose own privacy policy refused the run."""
        self.refused_by_policy = {**(self.refused_by_policy or {}), site: reason}

    def record_traffic(self, server_round: int, up: int, down: int) -> None:
        """A round's bytes up and down (all sites, every message) and the run's totals."""
        self.bytes_per_round[str(server_round)] = {"up": up, "down": down}
        self.bytes_up_total = sum(r["up"] for r in self.bytes_per_round.values())
        self.bytes_down_total = sum(r["down"] for r in self.bytes_per_round.values())

    def epsilon_note(self) -> str:
        """`` | epsilon site spent/budget, ...`` for the private sites so far (else empty)."""
        if not self.epsilon_spent_per_site:
            return ""
        budgets = self.epsilon_budget_per_site
        parts = [
            f"{site} {eps:.2f}/{budgets.get(site, float('nan')):g}"
            for site, eps in self.epsilon_spent_per_site.items()
        ]
        return " | epsilon " + ", ".join(parts)
