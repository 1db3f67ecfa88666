"""Secure aggregation (SecAgg+): the server learns only the weighted mean of the sites' updates.

Flower 1.42 ships SecAgg+ as a legacy-API pair: :class:`SecAggPlusWorkflow` (server,
driven by a ``LegacyContext`` and a legacy ``Strategy``) and ``secaggplus_mod``
(client, which parses legacy fit messages). This module runs that tested code,
unchanged, inside the Message-API apps, for the training step of a round only:

* Server: :class:`SecureAggregation` runs the workflow's four stages (setup, share
  keys, collect masked vectors, unmask) over the ServerApp's own grid. The Message-API
  strategy still samples the sites and writes the round config; a small legacy
  strategy adapter hands that to the workflow and takes back the unmasked mean, which
  then goes through the strategy's own ``aggregate_train`` (so FedAdam, FedYogi and
  FedAvgM apply their server optimiser to it). The masked-vector stage goes through
  the ServerApp's ``exchange``, so each site's metrics row is recorded as in a plain
  round.
* Client: :func:`secure_train` passes a SecAgg+ message to ``secaggplus_mod``. In the
  masked-vector stage the mod calls back into the ClientApp's plain ``train`` handler
  (the same training, privacy ledger and metrics), and the site's update
  ``local - global`` is handed to the mod, which weights it by
  ``num_examples / max_weight``, quantises it, masks it and sends only the masked
  integers; the mod empties every ArrayRecord of the reply.

A site's metrics (loss, num-examples, epsilon) travel in the clear, as in plain rounds.
Which configurations cannot work with secure aggregation is checked in
``fl_imaging.secagg.settings`` (robust strategies, screening, central DP, compression, ...).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import LegacyContext, SimpleClientManager
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fl_imaging.config import RunPlan
from fl_imaging.outputs.records import MetricRow, Row, failure_row
from fl_imaging.protocol import MetricKey, RecordKey, SiteKey
from fl_imaging.secagg import SecureAggregationError
from fl_imaging.secagg.settings import MODULUS_RANGE, protocol_sizes
from fl_imaging.server.grid import DelegatingGrid, destinations, replied_node
from fl_imaging.server.identity import site_name
from fl_imaging.server.replies import no_reply_error
from fl_imaging.updates.compression import codec_of, encode_update
from fl_imaging.updates.wire import to_numpy, update_records

logger = logging.getLogger(__name__)

# the ServerApp's exchange: send, collect, record rows -> (replies, rows, failures)
Exchange = Callable[
    [int, str, Iterable[Message]], tuple[list[Message], list[MetricRow], list[MetricRow]]
]


# the "site" of the one reply a secure round yields: the sum of every site's update
AGGREGATE = "secure-aggregate"


class SecureAggregation:
    """The training step of each round through Flower's ``SecAggPlusWorkflow``.

    Args:
        plan: the run plan (``secure_aggregation`` settings, round timeout).
        grid: the ServerApp's grid.
        run_id: the Flower run id (for the workflow's client proxies).
        exchange: the ServerApp's send-collect-record function; the masked-vector
            stage goes through it, so each site's metrics row is recorded as usual.
        record: appends rows to ``metrics.jsonl`` (failures of the other stages).
        node_sites: node id -> admitted site (the server's map, shared; names failures).
    """

    def __init__(
        self,
        plan: RunPlan,
        grid: Grid,
        run_id: int,
        exchange: Exchange,
        record: Callable[[list[MetricRow]], None],
        node_sites: dict[int, str] | None = None,
    ) -> None:
        self.plan = plan
        self.grid = grid
        self.run_id = run_id
        self.exchange = exchange
        self.record = record
        self.node_sites: dict[int, str] = {} if node_sites is None else node_sites

    def train_round(
        self, server_round: int, arrays: ArrayRecord, messages: Iterable[Message]
    ) -> tuple[list[Message], list[MetricRow], list[MetricRow]]:
        """Run SecAgg+ for one training round.

        Args:
            server_round: the round number.
            arrays: the global model sent this round.
            messages: the strategy's ``configure_train`` messages (which sites, and the
                round's ``ConfigRecord``); their content goes out with the masked-vector
                stage as a legacy ``FitIns``.

        Returns:
            ``(replies, rows, failures)`` like the ServerApp's ``exchange``: ``replies``
            is one message holding the sites' weighted mean update (encoded with codec
            none, like a site's update) and their total number of examples (empty when
            no site trained); ``rows`` and ``failures`` are the sites' rows.

        Raises:
            SecureAggregationError: the protocol stopped (fewer active sites than the
                reconstruction threshold at some stage).
        """
        messages = list(messages)
        cfg = self.plan.secure_aggregation
        shares, threshold = protocol_sizes(cfg, len(messages))
        adapter, context = self._legacy_context(server_round, arrays, messages)
        stages = _StageGrid(self, server_round, min_contributors=max(threshold, 2))
        workflow = SecAggPlusWorkflow(
            num_shares=shares,
            reconstruction_threshold=threshold,
            max_weight=float(cfg.max_weight),
            clipping_range=float(cfg.clipping_range),
            quantization_range=2**cfg.quantization_bits,
            modulus_range=MODULUS_RANGE,
            timeout=self.plan.strategy.round_timeout,
        )
        started = time.monotonic()
        workflow(stages, context)
        seconds = {"total": time.monotonic() - started, **stages.seconds}
        logger.info(
            "round %d: SecAgg+ seconds: %s",
            server_round,
            ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()),
        )
        rows, failures = stages.rows, stages.failures
        if adapter.mean_update is None:
            raise SecureAggregationError(
                f"round {server_round}: secure aggregation stopped after the "
                f"{stages.last_stage} stage: {stages.active} of {len(messages)} sites still "
                f"taking part, each site needs {threshold} "
                f"(secure_aggregation.reconstruction_threshold); failures: "
                f"{ {f[Row.SITE]: f[Row.ERROR] for f in failures} }"
            )
        total = sum(r[Row.NUM_EXAMPLES] for r in rows)
        if total == 0:
            return [], rows, failures  # no site trained (privacy budgets exhausted)
        logger.info(
            "round %d: securely aggregated the updates of %d sites (%d examples)",
            server_round,
            len(rows),
            total,
        )
        return [self._aggregate_reply(arrays, adapter.mean_update, total)], rows, failures

    def _legacy_context(
        self, server_round: int, arrays: ArrayRecord, messages: list[Message]
    ) -> tuple[_RoundStrategy, LegacyContext]:
        """The legacy strategy adapter and context the workflow runs with (one proxy a site)."""
        proxies: dict[int, ClientProxy] = {
            m.metadata.dst_node_id: GridClientProxy(m.metadata.dst_node_id, self.grid, self.run_id)
            for m in messages
        }
        manager = SimpleClientManager()
        for proxy in proxies.values():
            manager.register(proxy)
        adapter = _RoundStrategy(messages, proxies)
        state = RecordDict(
            {
                MAIN_PARAMS_RECORD: arrays,
                MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
            }
        )
        context = LegacyContext(
            Context(run_id=self.run_id, node_id=0, node_config={}, state=state, run_config={}),
            strategy=adapter,
            client_manager=manager,
        )
        return adapter, context

    def _aggregate_reply(
        self, arrays: ArrayRecord, mean_update: list[np.ndarray], total: int
    ) -> Message:
        """The sites' weighted mean as one reply, encoded like a site's update (codec none).

        So the ServerApp decodes and aggregates it as usual.
        """
        weights = {
            name: (ref.astype(np.float64) + mean).astype(ref.dtype)
            for (name, ref), mean in zip(to_numpy(arrays).items(), mean_update, strict=True)
        }
        encoded, _ = encode_update(weights, to_numpy(arrays), codec_of(self.plan.compression))
        content = RecordDict(
            {
                **update_records(encoded),
                RecordKey.METRICS: MetricRecord({MetricKey.NUM_EXAMPLES: total}),
                RecordKey.SITE: ConfigRecord({SiteKey.NAME: AGGREGATE}),
            }
        )
        return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


class _RoundStrategy(LegacyStrategy):
    """Legacy strategy facade for one SecAgg+ round.

    ``configure_fit`` turns the Message-API strategy's train messages into ``FitIns``;
    ``aggregate_fit`` receives the unmasked weighted mean (Flower's workflow puts the
    same aggregate into every result) and keeps it.
    """

    def __init__(self, messages: Sequence[Message], proxies: dict[int, ClientProxy]) -> None:
        self.messages = messages
        self.proxies = proxies
        self.mean_update: list[np.ndarray] | None = None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [
            (
                self.proxies[m.metadata.dst_node_id],
                FitIns(parameters, dict(m.content[RecordKey.CONFIG])),
            )
            for m in self.messages
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        if not results:
            return None, {}
        aggregate = results[0][1].parameters
        self.mean_update = parameters_to_ndarrays(aggregate)
        return aggregate, {}

    # the workflow only trains; evaluation stays in the ServerApp's own loop
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


class _StageGrid(DelegatingGrid):
    """The ServerApp's grid as the workflow sees it: one ``send_and_receive`` per stage.

    The masked-vector stage goes through the ServerApp's ``exchange`` (site rows);
    failures in the other stages become failure rows of their own.
    """

    def __init__(self, secure: SecureAggregation, server_round: int, min_contributors: int) -> None:
        super().__init__(secure.grid)
        self.secure = secure
        self.server_round = server_round
        self.min_contributors = min_contributors
        self.rows: list[MetricRow] = []
        self.failures: list[MetricRow] = []
        self.last_stage = ""
        self.active = 0
        self.seconds: dict[str, float] = {}  # wall-clock seconds of each stage's exchange

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        stage = str(messages[0].content[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else ""
        self.last_stage = stage
        started = time.monotonic()
        if stage == Stage.COLLECT_MASKED_VECTORS:
            replies, rows, failures = self.secure.exchange(self.server_round, "train", messages)
            for reply in replies:  # a site never seen before names itself here
                if not reply.has_error() and RecordKey.SITE in reply.content:
                    name = str(reply.content[RecordKey.SITE][SiteKey.NAME])
                    self.secure.node_sites.setdefault(reply.metadata.src_node_id, name)
            self.rows += rows
            self.failures += failures
            self._require_contributors(rows)
        else:
            replies = list(self.inner.send_and_receive(messages, timeout=timeout))
            self._record_failures(stage, messages, replies)
        self.active = sum(not r.has_error() for r in replies)
        self.seconds[stage] = time.monotonic() - started
        return replies

    def _require_contributors(self, rows: list[MetricRow]) -> None:
        """Stop before unmasking unless enough sites contributed a real update.

        A site out of budget (or refused by its policy) sends a zero update of weight 0:
        were it the only other site, the unmasked "sum" would be one hospital's update.
        The rule is enforced here, in the coordinator's code, before the unmask stage
        is sent: no share that could unmask anything leaves a site.
        """
        contributors = sorted(r[Row.SITE] for r in rows if r.get(Row.NUM_EXAMPLES, 0) > 0)
        if len(contributors) >= self.min_contributors:
            return
        others = {
            r[Row.SITE]: r.get(Row.STATUS, "no update")
            for r in rows
            if r[Row.SITE] not in contributors
        }
        raise SecureAggregationError(
            f"round {self.server_round}: only {len(contributors)} sites contributed an update "
            f"({', '.join(contributors) or 'none'}); secure aggregation unmasks a sum of at "
            f"least {self.min_contributors} (max(reconstruction_threshold, 2)), else the sum "
            f"would be one site's update. Not unmasked. Others: {others}"
        )

    def _record_failures(self, stage: str, messages: list[Message], replies: list[Message]) -> None:
        # an error reply the SuperLink writes for a lost node comes from the SuperLink:
        # the message it answers names the node
        sent_to = destinations(messages)
        replied = {replied_node(r, sent_to) for r in replies}
        errors = {replied_node(r, sent_to): r.error.reason for r in replies if r.has_error()}
        timeout = self.secure.plan.strategy.round_timeout
        for msg in messages:
            if msg.metadata.dst_node_id not in replied:
                errors[msg.metadata.dst_node_id] = no_reply_error(timeout)
        rows = []
        for node, reason in sorted(errors.items()):
            site = site_name(self.secure.node_sites, node)
            logger.warning(
                "round %d: site %s failed in the secure-aggregation %s stage: %s",
                self.server_round,
                site,
                stage,
                reason,
            )
            error = f"secure aggregation ({stage}): {reason}"
            rows.append(failure_row(self.server_round, site, "train", error))
        if rows:
            self.secure.record(rows)
            self.failures += rows


# --------------------------------------------------------------------------- client
