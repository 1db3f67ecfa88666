"""The server's side of a run: rounds of FedAvg with per-site evaluation, checkpoints, a run folder.

The round loop is Flower's ``Strategy.start`` loop with two additions a
segmentation study needs: the initial model is evaluated on every site (round 0),
and every reply is recorded per site (Flower's strategies only keep aggregates).
Sampling and aggregation are Flower's strategies (``fl_imaging.server.strategies``).
:mod:`fl_imaging.apps.server_app` is the Flower ``ServerApp`` that runs :func:`serve`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from omegaconf import OmegaConf

from fl_imaging.config import ConfigError, RunPlan, compose, plan_to_dict, plan_to_yaml, to_plan
from fl_imaging.data.regions import regions_of
from fl_imaging.logs import setup_logging
from fl_imaging.ml.models import initial_weights
from fl_imaging.outputs.overlays import legend
from fl_imaging.outputs.reporting import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CheckpointReadError,
    RunFolder,
    last_started_run,
    load_checkpoint,
    read_summary,
    write_cross_site,
    write_report,
)
from fl_imaging.privacy.policy import REFUSED_BY_POLICY
from fl_imaging.protocol import (
    ConfigKey,
    MetricKey,
    RecordKey,
    RefusalKey,
    RunConfigKey,
    SiteKey,
)
from fl_imaging.secagg.server import SecureAggregation
from fl_imaging.server.grid import (
    FederationError,
    NodeSnapshot,
    PromptGrid,
    destinations,
    replied_node,
    wait_for_sites,
)
from fl_imaging.server.identity import VerifiedGrid, site_name
from fl_imaging.server.strategies import build_strategy, restore_strategy_state, strategy_state
from fl_imaging.updates.compression import CompressionError, codec_of, decode_update
from fl_imaging.updates.screening import screen_updates
from fl_imaging.updates.wire import message_bytes, read_update, to_numpy, to_record

logger = logging.getLogger("fl_imaging.server")


class SiteFailureError(RuntimeError):
    """Sites failed and did not recover (the run's results are kept; it counts as failed)."""


def _epsilon_note(summary: Mapping[str, Any]) -> str:
    """`` | epsilon site spent/budget, ...`` for the private sites so far (else empty)."""
    spent = summary.get("epsilon_spent_per_site") or {}
    budgets = summary.get("epsilon_budget_per_site") or {}
    if not spent:
        return ""
    parts = [f"{site} {eps:.2f}/{budgets.get(site, float('nan')):g}" for site, eps in spent.items()]
    return " | epsilon " + ", ".join(parts)


def _named_as_admitted(reply: Message, node_sites: Mapping[int, str], sent_to: dict) -> bool:
    """False for a successful reply whose site name differs from its node's admitted site."""
    if reply.has_error() or RecordKey.SITE not in reply.content:
        return True
    admitted = node_sites.get(replied_node(reply, sent_to))
    return admitted == str(reply.content[RecordKey.SITE][SiteKey.NAME])


def _record_traffic(summary: dict[str, Any], server_round: int, traffic: Mapping[str, int]) -> None:
    """A round's bytes up and down (all sites, every message) and the run's totals."""
    summary["bytes_per_round"][str(server_round)] = {
        "up": traffic.get("bytes_up", 0),
        "down": traffic.get("bytes_down", 0),
    }
    for key in ("up", "down"):
        summary[f"bytes_{key}_total"] = sum(r[key] for r in summary["bytes_per_round"].values())


def _unrecovered(
    failed_at: Mapping[str, tuple[int, str]], replied_at: Mapping[str, int]
) -> dict[str, str]:
    """Sites whose last failure came after their last successful reply: site -> reason."""
    return {
        site: f"round {r}: {error}"
        for site, (r, error) in sorted(failed_at.items())
        if replied_at.get(site, -1) <= r
    }


def _record_refusals(summary: dict[str, Any], verified: VerifiedGrid) -> None:
    """Every node refused admission so far, in the summary (none: no key)."""
    refusals = verified.refusals()
    if refusals:
        summary["refused_nodes"] = [r.to_row() for r in refusals]


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
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
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
    bytes_down = bytes_down or {}
    for msg in replies:
        node = replied_node(msg, sent_to or {})
        traffic = {"bytes_up": message_bytes(msg)} if count_bytes else {}
        if count_bytes and node in bytes_down:
            traffic["bytes_down"] = bytes_down[node]
        if msg.has_error():
            failures.append(
                {
                    "round": server_round,
                    "site": site_name(node_sites, node),
                    "split": split,
                    "error": msg.error.reason,
                    **traffic,
                }
            )
            continue
        claimed = str(msg.content[RecordKey.SITE][SiteKey.NAME])
        site = node_sites.setdefault(node, claimed)  # a site never seen before names itself
        if not _named_as_admitted(msg, node_sites, sent_to or {}):  # the admitted name wins
            failures.append(
                {
                    "round": server_round,
                    "site": site,
                    "split": split,
                    "error": f"reply names site {claimed!r}, but node {node} was "
                    f"admitted as {site!r}",
                    **traffic,
                }
            )
            continue
        metrics = msg.content[metrics_key]
        row: dict[str, Any] = {
            "round": server_round,
            "site": site,
            "split": split,
            "loss": float(metrics[MetricKey.LOSS]),
            "num_examples": int(metrics[MetricKey.NUM_EXAMPLES]),
        }
        if MetricKey.DICE_MEAN in metrics:
            row["dice_mean"] = float(metrics[MetricKey.DICE_MEAN])
            for label, name in sorted(labels.items()):
                if label:
                    row[f"dice_{name}"] = float(metrics[MetricKey.dice_of(label)])
            for region in regions:
                row[f"dice_{region}"] = float(metrics[MetricKey.region_dice_of(region)])
                row[f"hd95_{region}"] = float(metrics[MetricKey.region_hd95_of(region)])
        if MetricKey.TRAIN_SECONDS in metrics:
            row["steps"] = int(metrics[MetricKey.STEPS])
            row["train_seconds"] = float(metrics[MetricKey.TRAIN_SECONDS])
        if MetricKey.TRAIN_STARTED_AT in metrics:
            row["train_started_at"] = float(metrics[MetricKey.TRAIN_STARTED_AT])
        if MetricKey.EPSILON_SPENT in metrics:
            # non-private sites report inf (no DP guarantee); recorded as null
            row["epsilon_spent"] = float(metrics[MetricKey.EPSILON_SPENT])
            row["epsilon_budget"] = float(metrics[MetricKey.EPSILON_BUDGET])
        if metrics_key == RecordKey.METRICS and RecordKey.REFUSAL in msg.content:
            refusal = msg.content[RecordKey.REFUSAL]
            row["status"] = str(refusal[RefusalKey.STATUS])
            row["reason"] = str(refusal[RefusalKey.REASON])
        elif MetricKey.TRAINED in metrics and not int(metrics[MetricKey.TRAINED]):
            row["status"] = "budget_exhausted"
        row.update(traffic)
        rows.append(row)
    return sorted(rows, key=lambda r: r["site"]), failures


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _round_line(
    server_round: int,
    rows: list[dict[str, Any]],
    labels: dict[int, str],
    regions: Sequence[str] = (),
) -> str:
    parts = []
    for row in rows:
        names = [n for k, n in sorted(labels.items()) if k] + list(regions)
        per_class = ", ".join(f"{n} {row[f'dice_{n}']:.3f}" for n in names)
        parts.append(f"{row['site']} {row['dice_mean']:.3f} ({per_class})")
    mean = _mean(r["dice_mean"] for r in rows)
    return f"round {server_round} Dice: mean {mean:.3f} | " + " | ".join(parts)


@dataclass(frozen=True)
class ResumeState:
    """Where a stopped run left off (from its ``checkpoints/last.pt`` and ``summary.json``)."""

    last_round: int
    state_dict: dict[str, Any]
    strategy_state: dict[str, Any]
    summary: dict[str, Any]


def load_resume_state(run: RunFolder, plan: RunPlan) -> ResumeState:
    """Read a run folder's last completed round; refuse one trained under another setup.

    Raises:
        ConfigError: the folder's model, data or sites differ from ``plan``, or it has
            no completed round to continue from.
    """
    stored = to_plan(OmegaConf.load(run.path / CONFIG_FILE), check=False)
    old, new = plan_to_dict(stored), plan_to_dict(plan)
    for key in ("model", "data"):
        if old[key] != new[key]:
            raise ConfigError(
                f"cannot resume {run.path}: its {key} config differs ({old[key]} vs {new[key]})"
            )
    if stored.site_names != plan.site_names:
        raise ConfigError(
            f"cannot resume {run.path}: it was run with sites {stored.site_names}, "
            f"not {plan.site_names}"
        )
    last = run.path / CHECKPOINT_DIR / "last.pt"
    if not last.is_file():
        raise ConfigError(f"cannot resume {run.path}: no completed round (no {last.name})")
    try:
        ckpt = load_checkpoint(last)
    except CheckpointReadError as exc:
        raise ConfigError(f"cannot resume {run.path}: {exc}") from exc
    summary = read_summary(run.path)
    return ResumeState(
        int(ckpt["round"]), ckpt["state_dict"], ckpt.get("strategy_state", {}), summary
    )


def aggregate_round(
    server_round: int,
    replies: list[Message],
    rows: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    arrays: ArrayRecord,
    strategy: Any,
    plan: RunPlan,
    run: RunFolder,
    summary: dict[str, Any],
    node_sites: Mapping[int, str],
) -> ArrayRecord:
    """Decode, screen and aggregate a round's updates; record what was left out and why.

    Epsilon per private site, rejected updates, exhausted budgets and policy refusals go
    into ``summary`` (and rejected updates into ``metrics.jsonl``).

    Raises:
        FederationError: fewer than ``strategy.min_sites`` real updates, or no model.
    """
    for row in rows:
        if "epsilon_spent" in row and math.isfinite(row["epsilon_spent"]):
            summary["epsilon_spent_per_site"][row["site"]] = row["epsilon_spent"]
            summary["epsilon_budget_per_site"][row["site"]] = row["epsilon_budget"]
    replies, undecodable = _decode_updates(replies, arrays, node_sites, plan)
    replies, rejected = _screen(replies, arrays, node_sites, plan, server_round)
    rejected = [{"round": server_round, **r} for r in undecodable] + rejected
    if rejected:
        run.append_metrics(rejected)
        summary["rejected_updates"] = summary.get("rejected_updates", 0) + len(rejected)
        rejected_sites = {r["site"] for r in rejected}
        rows = [r for r in rows if r["site"] not in rejected_sites]
    exhausted = [r for r in rows if r.get("status") == "budget_exhausted"]
    for row in exhausted:
        logger.warning(
            "site %s: privacy budget exhausted (spent %.2f of %g); it sent no update",
            row["site"],
            row["epsilon_spent"],
            row["epsilon_budget"],
        )
    refused = [r for r in rows if r.get("status") == REFUSED_BY_POLICY]
    for row in refused:
        logger.warning(
            "round %d: site %s refused the run (its own privacy policy): %s",
            server_round,
            row["site"],
            row["reason"],
        )
        summary.setdefault("refused_by_policy", {})[row["site"]] = row["reason"]
    updated = len(rows) - len(exhausted) - len(refused)
    if updated < plan.strategy.min_sites:
        failed = {f["site"]: f["error"] for f in failures}
        failed.update({r["site"]: "privacy budget exhausted" for r in exhausted})
        failed.update({r["site"]: f"refused: {r['reason']}" for r in refused})
        failed.update({r["site"]: r["reason"] for r in rejected})
        raise FederationError(
            f"round {server_round}: only {updated} sites returned an update "
            f"(strategy.min_sites={plan.strategy.min_sites}); others: {failed}"
        )
    # only real updates are aggregated (a site out of budget sends none)
    new_arrays, _ = strategy.aggregate_train(
        server_round,
        [m for m in replies if not m.has_error() and RecordKey.ARRAYS in m.content],
    )
    if new_arrays is None:
        raise FederationError(f"round {server_round}: aggregation produced no model")
    return new_arrays


def new_summary(plan: RunPlan, run_id: int) -> dict[str, Any]:
    """``summary.json`` of a run that starts now (what each round then fills in)."""
    return {
        "name": plan.name,
        "run_id": run_id,
        "status": "running",
        "sites": plan.site_names,
        "rounds_planned": plan.rounds,
        "rounds_completed": 0,
        "dice_mean_per_round": {},
        "best_round": None,
        "best_dice_mean": None,
        # private sites only: cumulative epsilon reported after each round
        "epsilon_spent_per_site": {},
        "epsilon_budget_per_site": {},
        # wall-clock seconds of each round's phases: train (send, site compute, receive),
        # aggregate (decode, screen, aggregate) and evaluate
        "round_seconds": {},
        # bytes of every message of a round (train and evaluate), summed over sites
        "codec": plan.compression.codec,
        "bytes_per_round": {},
        "bytes_up_total": 0,
        "bytes_down_total": 0,
        # every failed reply per site ({round, split, error}); failed_sites: those that
        # had not recovered (no later successful reply) when the run ended
        "site_failures": {},
    }


def _resume(
    resume: ResumeState, run: RunFolder, plan: RunPlan, strategy: Any, summary: dict[str, Any]
) -> tuple[ArrayRecord, int, float]:
    """Continue ``resume``: its model, strategy state and summary; drop the cut-short round.

    Returns the model to start from, the first round to run and the minutes already spent.
    """
    run_id = summary["run_id"]  # this run's, not the resumed summary's
    arrays = ArrayRecord(resume.state_dict)
    restore_strategy_state(strategy, resume.strategy_state)
    dropped = run.truncate_metrics(
        resume.last_round, drop_val_of_last=plan.strategy.evaluate_in_train
    )
    summary.update(
        {
            k: v
            for k, v in resume.summary.items()
            if k in summary or k in ("final_dice_mean", "final_dice_per_site", "rejected_updates")
        }
    )
    summary.update(status="running", run_id=run_id, rounds_planned=plan.rounds)
    summary.setdefault("resumed_after_rounds", []).append(resume.last_round)
    first_round = resume.last_round + 1
    minutes_before = float(resume.summary.get("minutes", 0.0))
    logger.info(
        "resuming %s after round %d (%d rows of the unfinished round dropped)",
        run.path,
        resume.last_round,
        dropped,
    )
    return arrays, first_round, minutes_before


def run_federation(
    grid: Grid,
    plan: RunPlan,
    run: RunFolder,
    run_id: int,
    resume: ResumeState | None = None,
    node_sites: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Train up to ``plan.rounds`` rounds; write metrics, checkpoints and summary into ``run``.

    With ``resume``, continue after its last completed round: rows of a round that was
    cut short are dropped from ``metrics.jsonl`` and that round runs again, so every
    completed round appears exactly once. ``node_sites`` (node id -> site name) are the
    sites already identified; the other connected nodes are asked.
    """
    labels = dict(plan.data.labels)
    regions = list(regions_of(plan.data.label_scheme))
    num_sites = len(plan.federation.sites)
    started = time.monotonic()
    # only admitted nodes take part, each as the site its key (or its first claim) says
    grid = verified = VerifiedGrid(
        grid,
        plan.site_names,
        plan.federation.site_keys,
        plan.strategy.round_timeout,
        node_sites,
    )
    node_sites = verified.sites
    wait_for_sites(grid, num_sites, plan.strategy.connect_timeout)
    strategy = build_strategy(plan)
    arrays = ArrayRecord(initial_weights(plan))  # model.init_checkpoint or fresh
    first_round, minutes_before = 0, 0.0
    summary = new_summary(plan, run_id)
    if resume is not None:
        arrays, first_round, minutes_before = _resume(resume, run, plan, strategy, summary)
    traffic: dict[str, int] = {}  # this round's bytes up and down (summary)
    # the last round each site replied successfully / failed (recovered failures clear)
    replied_at: dict[str, int] = {}
    failed_at: dict[str, tuple[int, str]] = {}
    round_failures: list[dict[str, Any]] = []
    meta = {
        "config": plan_to_dict(plan),
        "labels": labels,
        "modalities": list(plan.data.modalities),
    }

    def exchange(
        server_round: int, split: str, messages: Iterable[Message]
    ) -> tuple[list[Message], list[dict[str, Any]], list[dict[str, Any]]]:
        """Send, collect, log failures and record every site's row in metrics.jsonl."""
        messages = list(messages)
        sent = {m.metadata.dst_node_id: message_bytes(m) for m in messages}
        replies = list(grid.send_and_receive(messages, timeout=plan.strategy.round_timeout))
        sent_to = destinations(messages)
        rows, failures = site_rows(
            replies, server_round, split, labels, node_sites, sent, sent_to, regions=regions
        )
        silent = {m.metadata.dst_node_id for m in messages} - {
            replied_node(r, sent_to) for r in replies
        }
        # a reply naming another site than its node was admitted as is a failure, not an update
        replies = [r for r in replies if _named_as_admitted(r, node_sites, sent_to)]
        timeout = plan.strategy.round_timeout
        failures += [
            {
                "round": server_round,
                "site": site_name(node_sites, n),
                "split": split,
                "error": f"no reply within strategy.round_timeout={timeout:g} s",
                "bytes_down": sent[n],
            }
            for n in sorted(silent)
        ]
        for key in ("bytes_up", "bytes_down"):
            traffic[key] = traffic.get(key, 0) + sum(r.get(key, 0) for r in rows + failures)
        for failure in failures:
            logger.warning(
                "round %d %s failed at %s: %s",
                server_round,
                split,
                failure["site"],
                failure["error"],
            )
        record_failures(server_round, split, rows, failures)
        run.append_metrics(rows + failures)
        return replies, rows, failures

    def record_failures(
        server_round: int, split: str, rows: list[dict[str, Any]], failures: list[dict[str, Any]]
    ) -> None:
        """Keep each site's failures in the summary and whether it recovered since."""
        for row in rows:
            replied_at[row["site"]] = server_round
        for failure in failures:
            site = failure["site"]
            failed_at[site] = (server_round, failure["error"])
            summary["site_failures"].setdefault(site, []).append(
                {"round": server_round, "split": split, "error": failure["error"]}
            )
            round_failures.append(failure)

    def connected() -> NodeSnapshot:
        """The sites a round samples from, as one list for Flower's whole sampling.

        Every site; after strategy.connect_timeout the connected ones (at least min_sites).
        """
        nodes = wait_for_sites(
            grid, num_sites, plan.strategy.connect_timeout, minimum=plan.strategy.min_sites
        )
        return NodeSnapshot(grid, nodes)

    def evaluate_round(server_round: int) -> list[dict[str, Any]]:
        messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(), connected())
        _, rows, _ = exchange(server_round, "val", messages)
        return rows

    def record_evaluation(
        evaluated_round: int, rows: list[dict[str, Any]], state_dict: dict[str, Any]
    ) -> float:
        """Dice of the global model of ``evaluated_round`` into the summary; best checkpoint."""
        if rows:
            logger.info(_round_line(evaluated_round, rows, labels, regions))
        dice_per_site = {r["site"]: r["dice_mean"] for r in rows}
        dice_mean = _mean(dice_per_site.values())
        best = summary["best_dice_mean"]
        if math.isfinite(dice_mean) and (best is None or dice_mean > best):
            summary["best_round"], summary["best_dice_mean"] = evaluated_round, dice_mean
            run.save_checkpoint(
                "best", state_dict, round=evaluated_round, dice_mean=dice_mean, **meta
            )
        summary.update(final_dice_mean=dice_mean, final_dice_per_site=dice_per_site)
        summary["dice_mean_per_round"][str(evaluated_round)] = dice_mean
        return dice_mean

    secure = None
    if plan.secure_aggregation.name != "none":
        secure = SecureAggregation(plan, grid, run_id, exchange, run.append_metrics, node_sites)
    # one message per round: a train message also evaluates the model it carries, so the
    # Dice of round r's model arrives with round r + 1 (the last model gets an evaluation)
    fused = plan.strategy.evaluate_in_train
    # wall-clock phases per round (what the benchmarks and the report's timing table read)
    timings: dict[str, dict[str, float]] = summary.setdefault("round_seconds", {})
    summary["started_at"] = time.time()
    dice_mean, evaluated = float("nan"), 0
    if fused and first_round == 0:  # the initial model, so that a failing round 1 loses nothing
        run.save_checkpoint(
            "last",
            arrays.to_torch_state_dict(),
            round=0,
            dice_mean=math.nan,
            strategy_state=strategy_state(strategy),
            **meta,
        )
        run.write_summary(summary)
    for server_round in range(max(first_round, 1) if fused else first_round, plan.rounds + 1):
        round_started = time.monotonic()
        phase = {"train": 0.0, "aggregate": 0.0, "evaluate": 0.0}
        traffic.clear()
        round_failures.clear()
        if server_round > 0:
            logger.info("round %d/%d: training at %d sites", server_round, plan.rounds, num_sites)
            summary.setdefault("first_train_sent_at", time.time())
            messages = strategy.configure_train(server_round, arrays, ConfigRecord(), connected())
            if fused:
                for msg in messages:
                    msg.content[RecordKey.CONFIG][ConfigKey.EVALUATE_FIRST] = 1
            if secure is None:
                replies, rows, failures = exchange(server_round, "train", messages)
            else:  # SecAgg+: the reply is the sites' unmasked mean update, rows are per site
                replies, rows, failures = secure.train_round(server_round, arrays, messages)
            trained_at = time.monotonic()
            if fused:  # the validation of the model the sites just received
                val_rows, _ = site_rows(
                    [m for m in replies if not m.has_error() and RecordKey.EVALUATION in m.content],
                    server_round - 1,
                    "val",
                    labels,
                    node_sites,
                    metrics_key=RecordKey.EVALUATION,
                    count_bytes=False,
                    regions=regions,
                )
                run.append_metrics(val_rows)
                dice_mean = record_evaluation(
                    server_round - 1, val_rows, arrays.to_torch_state_dict()
                )
                evaluated = len(val_rows)
            arrays = aggregate_round(
                server_round,
                replies,
                rows,
                failures,
                arrays,
                strategy,
                plan,
                run,
                summary,
                node_sites,
            )
            phase["aggregate"] = time.monotonic() - trained_at
            phase["train"] = trained_at - round_started
        state_dict = arrays.to_torch_state_dict()
        if not fused or server_round == plan.rounds:
            evaluated_from = time.monotonic()
            rows = evaluate_round(server_round)
            phase["evaluate"] = time.monotonic() - evaluated_from
            dice_mean, evaluated = record_evaluation(server_round, rows, state_dict), len(rows)
        timings[str(server_round)] = phase
        run.save_checkpoint(
            "last",
            state_dict,
            round=server_round,
            dice_mean=summary["dice_mean_per_round"].get(str(server_round), math.nan),
            strategy_state=strategy_state(strategy),
            **meta,
        )
        summary.update(
            rounds_completed=server_round,
            minutes=minutes_before + (time.monotonic() - started) / 60,
        )
        _record_traffic(summary, server_round, traffic)
        _record_refusals(summary, verified)
        run.write_summary(summary)
        elapsed = time.monotonic() - started
        done = server_round - first_round + 1
        eta = elapsed / done * (plan.rounds - server_round) if server_round else 0
        failed_now = sorted({f["site"] for f in round_failures})
        logger.log(
            logging.WARNING if failed_now else logging.INFO,
            "round %d/%d done | %d/%d sites evaluated%s | mean Dice %.3f%s | %.0f s elapsed | "
            "eta %.0f s%s",
            server_round,
            plan.rounds,
            evaluated,
            num_sites,
            f" (the round {server_round - 1} model)"
            if fused and server_round < plan.rounds
            else "",
            dice_mean,
            _epsilon_note(summary),
            elapsed,
            eta,
            f" | FAILED: {', '.join(failed_now)}" if failed_now else "",
        )
    if plan.strategy.cross_site_epochs > 0 and first_round <= plan.rounds:
        matrix = cross_site_evaluation(grid, plan, arrays, node_sites, plan.rounds)
        write_cross_site(run.path, matrix)
        summary["finetuned_dice_per_site"] = {
            site: matrix["dice"][f"{site} fine-tuned"].get(site)
            for site in plan.site_names
            if f"{site} fine-tuned" in matrix["dice"]
        }
    failed = _unrecovered(failed_at, replied_at)
    summary["failed_sites"] = failed
    summary["status"] = "finished_with_failures" if failed else "finished"
    _record_refusals(summary, verified)
    run.write_summary(summary)
    if not failed or plan.strategy.allow_site_failures:
        run.mark_latest()
    return summary


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
    replies, _ = _decode_updates(
        to_all(arrays, MessageType.TRAIN, config), arrays, node_sites, plan
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


def serve(grid: Grid, context: Context, node_sites: Mapping[int, str] | None = None) -> None:
    """Compose the run plan from the run config and run the federation (the ServerApp's main).

    ``node_sites``: sites that have already named themselves (node id -> site name).
    """
    setup_logging()
    plan = compose(
        str(context.run_config.get(RunConfigKey.EXPERIMENT, "")),
        str(context.run_config.get(RunConfigKey.OVERRIDES, "")),
    )
    outputs = plan.resolve_path(plan.paths.outputs)
    resume = None
    if plan.resume:
        # latest: the most recently active run folder (a failed run is not outputs/latest)
        target = (
            last_started_run(outputs) if plan.resume == "latest" else plan.resolve_path(plan.resume)
        )
        run = RunFolder.reopen(target.resolve())
        resume = load_resume_state(run, plan)
    else:
        run = RunFolder.create(outputs, plan.name, plan_to_yaml(plan))
    logger.info("run folder: %s", run.path)
    try:
        summary = run_federation(PromptGrid(grid), plan, run, context.run_id, resume, node_sites)
    except BaseException as exc:  # every exit path leaves a status: failed, or crashed
        status = "failed" if isinstance(exc, Exception) else "crashed"
        logger.error("run %s: %s", status, exc or type(exc).__name__)
        try:
            run.write_summary(
                {
                    **read_summary(run.path),
                    "status": status,
                    "error": str(exc) or type(exc).__name__,
                }
            )
        except OSError as write_error:
            logger.error("could not record the %s status: %s", status, write_error)
        raise
    finally:
        run.close()
        if (run.path / "metrics.jsonl").is_file():
            _write_report(run, plan)
    for site, reason in summary.get("refused_by_policy", {}).items():
        logger.warning(
            "site %s did not train: its own privacy policy refused the run: %s", site, reason
        )
    failed = summary.get("failed_sites", {})
    for site, reason in failed.items():
        logger.error(
            "site %s FAILED: %s (the traceback is in the site's log and its "
            "state folder's site_errors.log)",
            site,
            reason,
        )
    logger.log(
        logging.ERROR if failed else logging.INFO,
        "%s %d rounds in %.1f min: final mean Dice %.3f %s; results in %s",
        f"FINISHED WITH {len(failed)} FAILED SITE(S):" if failed else "finished",
        summary["rounds_completed"],
        summary["minutes"],
        summary["final_dice_mean"],
        {k: round(v, 3) for k, v in summary["final_dice_per_site"].items()},
        run.path,
    )
    if failed and not plan.strategy.allow_site_failures:
        raise SiteFailureError(
            f"{len(failed)} site(s) failed and did not recover: {failed}. The run folder "
            f"{run.path} keeps the results (outputs/latest was not moved). Fix the site, or "
            f"accept partial runs with strategy.allow_site_failures=true"
        )


def _decode_updates(
    replies: Iterable[Message], arrays: ArrayRecord, node_sites: dict[int, str], plan: RunPlan
) -> tuple[list[Message], list[dict[str, Any]]]:
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
            node = msg.metadata.src_node_id
            site = site_name(node_sites, node)
            logger.warning("rejected the update of site %s: %s", site, exc)
            rejected.append(
                {
                    "site": site,
                    "split": "train",
                    "status": "rejected",
                    "reason": f"undecodable update: {exc}",
                }
            )
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


def _screen(
    replies: list[Message],
    arrays: ArrayRecord,
    node_sites: dict[int, str],
    plan: RunPlan,
    server_round: int,
) -> tuple[list[Message], list[dict[str, Any]]]:
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
        rows.append(
            {
                "round": server_round,
                "site": site,
                "split": "train",
                "status": "rejected",
                "reason": reason,
            }
        )
    kept = [m for m in replies if site_name(node_sites, m.metadata.src_node_id) not in reasons]
    return kept, rows


# the server never opens a scan: overlays are drawn where the scans are
OVERLAY_NOTE = (
    "Overlays need the scans, which stay at the sites: `fl-imaging report RUN` run at a "
    "hospital draws its own (`fl-imaging run` does so for a local simulation)."
)


def _write_report(run: RunFolder, plan: RunPlan) -> None:
    path = write_report(run.path, {}, OVERLAY_NOTE, legend(dict(plan.data.labels)))
    logger.info("report: %s", path)
