"""The round loop: train at the sites, aggregate, evaluate at the sites, checkpoint, repeat.

It is Flower's ``Strategy.start`` loop with what a segmentation study needs on top: the
initial model is evaluated on every site (round 0), every reply is recorded per site in
``metrics.jsonl`` (Flower's strategies keep only aggregates), failures are kept per site
and the run goes on while ``strategy.min_sites`` still send updates, and each round ends
with a checkpoint and a rewritten ``summary.json``. Sampling and aggregation are Flower's
strategies (:mod:`fl_imaging.server.strategies`).

A round is :meth:`RoundLoop.run_round`: :meth:`~RoundLoop.train_step`,
:meth:`~RoundLoop.aggregate`, :meth:`~RoundLoop.evaluate_step`,
:meth:`~RoundLoop.end_round`; :meth:`~RoundLoop.finish` closes the run.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fl_imaging.config import RunPlan, plan_to_dict
from fl_imaging.data.regions import regions_of
from fl_imaging.ml.models import initial_weights
from fl_imaging.outputs.records import MetricRow, Row, RowStatus, RunSummary, mean_dice
from fl_imaging.outputs.reporting import RunFolder, write_cross_site
from fl_imaging.privacy.policy import REFUSED_BY_POLICY
from fl_imaging.protocol import ConfigKey, RecordKey
from fl_imaging.secagg.server import SecureAggregation
from fl_imaging.server.averaging import GlobalAverage
from fl_imaging.server.cross_site import cross_site_evaluation
from fl_imaging.server.grid import FederationError, NodeSnapshot, destinations, wait_for_sites
from fl_imaging.server.identity import VerifiedGrid
from fl_imaging.server.replies import (
    decode_updates,
    named_as_admitted,
    screen,
    silent_rows,
    site_rows,
)
from fl_imaging.server.resume import ResumeState
from fl_imaging.server.strategies import build_strategy, restore_strategy_state, strategy_state
from fl_imaging.updates.wire import message_bytes

logger = logging.getLogger("fl_imaging.server")

Exchanged = tuple[list[Message], list[MetricRow], list[MetricRow]]  # replies, rows, failures


def round_line(
    server_round: int, rows: list[MetricRow], labels: dict[int, str], regions: Sequence[str] = ()
) -> str:
    """``round r Dice: mean m | site d (label d, ...) | ...`` for the console."""
    names = [n for k, n in sorted(labels.items()) if k] + list(regions)
    parts = []
    for row in rows:
        per_class = ", ".join(f"{n} {row[Row.dice_of(n)]:.3f}" for n in names)
        parts.append(f"{row[Row.SITE]} {row[Row.DICE_MEAN]:.3f} ({per_class})")
    mean = mean_dice(r[Row.DICE_MEAN] for r in rows)
    return f"round {server_round} Dice: mean {mean:.3f} | " + " | ".join(parts)


def unrecovered(
    failed_at: Mapping[str, tuple[int, str]], replied_at: Mapping[str, int]
) -> dict[str, str]:
    """Sites whose last failure came after their last successful reply: site -> reason."""
    return {
        site: f"round {r}: {error}"
        for site, (r, error) in sorted(failed_at.items())
        if replied_at.get(site, -1) <= r
    }


class RoundLoop:
    """One federation's rounds, written into a run folder as they happen.

    Args:
        grid: the ServerApp's grid; only admitted nodes take part (:class:`VerifiedGrid`),
            each as the site its key (or its first claim) says.
        plan: the run plan.
        run: the run folder (metrics, checkpoints, summary).
        run_id: the Flower run id.
        node_sites: node id -> site of the nodes already identified; others are asked.
    """

    def __init__(
        self,
        grid: Grid,
        plan: RunPlan,
        run: RunFolder,
        run_id: int,
        node_sites: Mapping[int, str] | None = None,
    ) -> None:
        self.plan, self.run = plan, run
        self.started = time.monotonic()
        self.labels = dict(plan.data.labels)
        self.regions = list(regions_of(plan.data.label_scheme))
        self.num_sites = len(plan.federation.sites)
        self.grid = self.verified = VerifiedGrid(
            grid,
            plan.site_names,
            plan.federation.site_keys,
            plan.strategy.round_timeout,
            node_sites,
        )
        self.node_sites = self.verified.sites  # shared with the SecAgg+ path
        wait_for_sites(self.grid, self.num_sites, plan.strategy.connect_timeout)
        self.strategy = build_strategy(plan)
        self.arrays = ArrayRecord(initial_weights(plan))  # model.init_checkpoint or fresh
        self.summary = RunSummary(
            plan.name, run_id, plan.site_names, plan.rounds, plan.compression.codec
        )
        self.meta = {
            "config": plan_to_dict(plan),
            "labels": self.labels,
            "modalities": list(plan.data.modalities),
        }
        # strategy.global_ema_decay: the run evaluates, checkpoints and delivers the moving
        # average of the global models (self.delivered); training goes on from self.arrays
        decay = plan.strategy.global_ema_decay
        self.average = GlobalAverage(decay) if decay is not None else None
        self.delivered = self.arrays
        # one message per round: a train message also evaluates the model it carries, so the
        # Dice of round r's model arrives with round r + 1 (the last model gets an evaluation);
        # not with the average, which no train message carries
        self.fused = plan.strategy.evaluate_in_train and self.average is None
        if self.average is not None:
            logger.info(
                "the evaluated and delivered model is the moving average of the global models "
                "(strategy.global_ema_decay=%g); each round evaluates it in its own message",
                decay,
            )
        self.secure = None
        if plan.secure_aggregation.name != "none":
            self.secure = SecureAggregation(
                plan, self.grid, run_id, self.exchange, run.append_metrics, self.node_sites
            )
        self.first_round, self.minutes_before = 0, 0.0
        self.traffic: Counter[str] = Counter()  # this round's bytes up and down
        self.round_failures: list[MetricRow] = []
        # the last round each site replied successfully / failed (recovered failures clear)
        self.replied_at: dict[str, int] = {}
        self.failed_at: dict[str, tuple[int, str]] = {}
        self.dice_mean, self.evaluated = math.nan, 0  # of the last evaluation

    # --- the run ---------------------------------------------------------------------

    def resume(self, state: ResumeState) -> None:
        """Continue ``state``: its model, strategy state and summary; drop the cut-short round."""
        self.arrays = ArrayRecord(state.training_state_dict)
        self.delivered = ArrayRecord(state.state_dict)
        if self.average is not None:
            # a run that had no average continues one from its last global model
            self.average.start(state.state_dict, folded=state.last_round)
        restore_strategy_state(self.strategy, state.strategy_state)
        dropped = self.run.truncate_metrics(state.last_round, drop_val_of_last=self.fused)
        self.summary.continue_from(state.summary, state.last_round)
        self.first_round = state.last_round + 1
        self.minutes_before = float(state.summary.get("minutes", 0.0))
        logger.info(
            "resuming %s after round %d (%d rows of the unfinished round dropped)",
            self.run.path,
            state.last_round,
            dropped,
        )

    def rounds(self) -> range:
        """The rounds still to run (round 0 evaluates the initial model)."""
        self.summary.started_at = time.time()
        if self.fused and self.first_round == 0:
            # the initial model, so that a failing round 1 loses nothing
            self._checkpoint(0, self.arrays.to_torch_state_dict())
            self._write_summary()
        first = max(self.first_round, 1) if self.fused else self.first_round
        return range(first, self.plan.rounds + 1)

    def run_round(self, server_round: int) -> None:
        """Train (round > 0), aggregate, evaluate, checkpoint and log one round."""
        round_started = time.monotonic()
        phase = {"train": 0.0, "aggregate": 0.0, "evaluate": 0.0}
        self.traffic.clear()
        self.round_failures.clear()
        if server_round > 0:
            replies, rows, failures = self.train_step(server_round)
            trained_at = time.monotonic()
            if self.fused:
                self.evaluate_fused(server_round - 1, replies)
            self.arrays = self.aggregate(server_round, replies, rows, failures)
            phase["train"] = trained_at - round_started
            phase["aggregate"] = time.monotonic() - trained_at
        state_dict = self.arrays.to_torch_state_dict()
        if self.average is not None and server_round > 0:
            state_dict = self.average.fold(state_dict)
        self.delivered = ArrayRecord(state_dict) if self.average is not None else self.arrays
        if not self.fused or server_round == self.plan.rounds:
            evaluated_from = time.monotonic()
            self.evaluate_step(server_round, state_dict)
            phase["evaluate"] = time.monotonic() - evaluated_from
        self.summary.round_seconds[str(server_round)] = phase
        self.end_round(server_round, state_dict)

    def finish(self) -> dict[str, Any]:
        """Cross-site evaluation (if asked), the final status; returns ``summary.json``."""
        summary, plan = self.summary, self.plan
        if plan.strategy.cross_site_epochs > 0 and self.first_round <= plan.rounds:
            matrix = cross_site_evaluation(
                self.grid, plan, self.delivered, self.node_sites, plan.rounds
            )
            write_cross_site(self.run.path, matrix)
            summary.finetuned_dice_per_site = {
                site: matrix["dice"][f"{site} fine-tuned"].get(site)
                for site in plan.site_names
                if f"{site} fine-tuned" in matrix["dice"]
            }
        failed = unrecovered(self.failed_at, self.replied_at)
        summary.failed_sites = failed
        summary.status = "finished_with_failures" if failed else "finished"
        self._write_summary()
        if not failed or plan.strategy.allow_site_failures:
            self.run.mark_latest()
        return summary.to_json()

    # --- the steps of a round ----------------------------------------------------------

    def train_step(self, server_round: int) -> Exchanged:
        """Send the global model to the sampled sites and collect their updates."""
        logger.info(
            "round %d/%d: training at %d sites", server_round, self.plan.rounds, self.num_sites
        )
        if self.summary.first_train_sent_at is None:
            self.summary.first_train_sent_at = time.time()
        messages = self.strategy.configure_train(
            server_round, self.arrays, ConfigRecord(), self.connected()
        )
        if self.fused:
            for msg in messages:
                msg.content[RecordKey.CONFIG][ConfigKey.EVALUATE_FIRST] = 1
        if self.secure is None:
            return self.exchange(server_round, "train", messages)
        # SecAgg+: the reply is the sites' unmasked mean update, rows are per site
        return self.secure.train_round(server_round, self.arrays, messages)

    def evaluate_fused(self, evaluated_round: int, replies: Iterable[Message]) -> None:
        """The validation each train reply carries: of the model the sites just received."""
        val_rows, _ = site_rows(
            [m for m in replies if not m.has_error() and RecordKey.EVALUATION in m.content],
            evaluated_round,
            "val",
            self.labels,
            self.node_sites,
            metrics_key=RecordKey.EVALUATION,
            count_bytes=False,
            regions=self.regions,
        )
        self.run.append_metrics(val_rows)
        self.record_evaluation(evaluated_round, val_rows, self.arrays.to_torch_state_dict())

    def aggregate(
        self,
        server_round: int,
        replies: list[Message],
        rows: list[MetricRow],
        failures: list[MetricRow],
    ) -> ArrayRecord:
        """Decode, screen and aggregate a round's updates; record what was left out and why.

        Raises:
            FederationError: fewer than ``strategy.min_sites`` real updates, or no model.
        """
        self.summary.record_epsilon(rows)
        replies, undecodable = decode_updates(
            replies, self.arrays, self.node_sites, self.plan, server_round
        )
        replies, rejected = screen(replies, self.arrays, self.node_sites, self.plan, server_round)
        rejected = undecodable + rejected
        if rejected:
            self.run.append_metrics(rejected)
            self.summary.record_rejections(len(rejected))
            rejected_sites = {r[Row.SITE] for r in rejected}
            rows = [r for r in rows if r[Row.SITE] not in rejected_sites]
        self._require_min_sites(server_round, rows, failures, rejected)
        # only real updates are aggregated (a site out of budget sends none)
        new_arrays, _ = self.strategy.aggregate_train(
            server_round,
            [m for m in replies if not m.has_error() and RecordKey.ARRAYS in m.content],
        )
        if new_arrays is None:
            raise FederationError(f"round {server_round}: aggregation produced no model")
        return new_arrays

    def evaluate_step(self, server_round: int, state_dict: dict[str, Any]) -> None:
        """Evaluate the round's global model (or its average) at every connected site."""
        messages = self.strategy.configure_evaluate(
            server_round, self.delivered, ConfigRecord(), self.connected()
        )
        _, rows, _ = self.exchange(server_round, "val", messages)
        self.record_evaluation(server_round, rows, state_dict)

    def end_round(self, server_round: int, state_dict: dict[str, Any]) -> None:
        """Checkpoint, summary and the round's console line."""
        self._checkpoint(server_round, state_dict)
        summary = self.summary
        summary.rounds_completed = server_round
        summary.minutes = self.minutes_before + (time.monotonic() - self.started) / 60
        summary.record_traffic(
            server_round, self.traffic[Row.BYTES_UP], self.traffic[Row.BYTES_DOWN]
        )
        self._write_summary()
        self._log_round(server_round)

    # --- helpers -------------------------------------------------------------------------

    def exchange(self, server_round: int, split: str, messages: Iterable[Message]) -> Exchanged:
        """Send, collect, log failures and record every site's row in metrics.jsonl."""
        messages = list(messages)
        sent = {m.metadata.dst_node_id: message_bytes(m) for m in messages}
        timeout = self.plan.strategy.round_timeout
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        sent_to = destinations(messages)
        rows, failures = site_rows(
            replies,
            server_round,
            split,
            self.labels,
            self.node_sites,
            sent,
            sent_to,
            regions=self.regions,
        )
        failures += silent_rows(
            messages,
            replies,
            server_round,
            split,
            self.node_sites,
            timeout=timeout,
            sent_to=sent_to,
            bytes_down=sent,
        )
        # a reply naming another site than its node was admitted as is a failure, not an update
        replies = [r for r in replies if named_as_admitted(r, self.node_sites, sent_to)]
        for key in (Row.BYTES_UP, Row.BYTES_DOWN):
            self.traffic[key] += sum(r.get(key, 0) for r in rows + failures)
        self._record_failures(server_round, split, rows, failures)
        self.run.append_metrics(rows + failures)
        return replies, rows, failures

    def connected(self) -> NodeSnapshot:
        """The sites a round samples from, as one list for Flower's whole sampling.

        Every site; after strategy.connect_timeout the connected ones (at least min_sites).
        """
        strategy = self.plan.strategy
        nodes = wait_for_sites(
            self.grid, self.num_sites, strategy.connect_timeout, minimum=strategy.min_sites
        )
        return NodeSnapshot(self.grid, nodes)

    def record_evaluation(
        self, evaluated_round: int, rows: list[MetricRow], state_dict: dict[str, Any]
    ) -> None:
        """Dice of the global model of ``evaluated_round`` into the summary; best checkpoint."""
        if rows:
            logger.info(round_line(evaluated_round, rows, self.labels, self.regions))
        if self.summary.record_evaluation(evaluated_round, rows):
            dice = self.summary.best_dice_mean
            self.run.save_checkpoint(
                "best", state_dict, round=evaluated_round, dice_mean=dice, **self.meta
            )
        self.dice_mean, self.evaluated = self.summary.final_dice_mean, len(rows)

    def _record_failures(
        self, server_round: int, split: str, rows: list[MetricRow], failures: list[MetricRow]
    ) -> None:
        """Keep each site's failures in the summary and whether it recovered since."""
        for row in rows:
            self.replied_at[row[Row.SITE]] = server_round
        for failure in failures:
            site, error = failure[Row.SITE], failure[Row.ERROR]
            logger.warning("round %d %s failed at %s: %s", server_round, split, site, error)
            self.failed_at[site] = (server_round, error)
            self.summary.record_failure(server_round, split, site, error)
            self.round_failures.append(failure)

    def _require_min_sites(
        self,
        server_round: int,
        rows: list[MetricRow],
        failures: list[MetricRow],
        rejected: list[MetricRow],
    ) -> None:
        """Log sites that sent no update; raise when fewer than min_sites did."""
        exhausted = [r for r in rows if r.get(Row.STATUS) == RowStatus.BUDGET_EXHAUSTED]
        for row in exhausted:
            logger.warning(
                "site %s: privacy budget exhausted (spent %.2f of %g); it sent no update",
                row[Row.SITE],
                row[Row.EPSILON_SPENT],
                row[Row.EPSILON_BUDGET],
            )
        refused = [r for r in rows if r.get(Row.STATUS) == REFUSED_BY_POLICY]
        for row in refused:
            logger.warning(
                "round %d: site %s refused the run (its own privacy policy): %s",
                server_round,
                row[Row.SITE],
                row[Row.REASON],
            )
            self.summary.record_refusal(row[Row.SITE], row[Row.REASON])
        updated = len(rows) - len(exhausted) - len(refused)
        if updated >= self.plan.strategy.min_sites:
            return
        failed = {f[Row.SITE]: f[Row.ERROR] for f in failures}
        failed.update({r[Row.SITE]: "privacy budget exhausted" for r in exhausted})
        failed.update({r[Row.SITE]: f"refused: {r[Row.REASON]}" for r in refused})
        failed.update({r[Row.SITE]: r[Row.REASON] for r in rejected})
        raise FederationError(
            f"round {server_round}: only {updated} sites returned an update "
            f"(strategy.min_sites={self.plan.strategy.min_sites}); others: {failed}"
        )

    def _checkpoint(self, server_round: int, state_dict: dict[str, Any]) -> None:
        """``checkpoints/last.pt``: the model after ``server_round``, what resume reads.

        ``state_dict`` is the delivered model; with a global average the plain aggregate,
        which training goes on from, is kept beside it (``training_state_dict``).
        """
        extra = {}
        if self.average is not None:
            extra["training_state_dict"] = self.arrays.to_torch_state_dict()
        self.run.save_checkpoint(
            "last",
            state_dict,
            round=server_round,
            dice_mean=self.summary.dice_mean_per_round.get(str(server_round), math.nan),
            strategy_state=strategy_state(self.strategy),
            **extra,
            **self.meta,
        )

    def _write_summary(self) -> None:
        refusals = self.verified.refusals()  # every node refused admission so far
        if refusals:
            self.summary.refused_nodes = [r.to_row() for r in refusals]
        self.run.write_summary(self.summary.to_json())

    def _log_round(self, server_round: int) -> None:
        """``round r/R done | sites evaluated | mean Dice | epsilon | elapsed | eta``."""
        plan = self.plan
        elapsed = time.monotonic() - self.started
        done = server_round - self.first_round + 1
        eta = elapsed / done * (plan.rounds - server_round) if server_round else 0
        failed_now = sorted({f[Row.SITE] for f in self.round_failures})
        lagging = self.fused and server_round < plan.rounds
        logger.log(
            logging.WARNING if failed_now else logging.INFO,
            "round %d/%d done | %d/%d sites evaluated%s | mean Dice %.3f%s | %.0f s elapsed | "
            "eta %.0f s%s",
            server_round,
            plan.rounds,
            self.evaluated,
            self.num_sites,
            f" (the round {server_round - 1} model)" if lagging else "",
            self.dice_mean,
            self.summary.epsilon_note(),
            elapsed,
            eta,
            f" | FAILED: {', '.join(failed_now)}" if failed_now else "",
        )
