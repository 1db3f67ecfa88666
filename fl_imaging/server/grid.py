"""Grid helpers: waiting for and naming the sites, and a grid that collects replies promptly.

Flower 1.42's deployment grid (``HttpGrid.send_and_receive``) checks for replies every
3 s, so every exchange of a round waits up to 3 s after the last site has answered;
with two exchanges per round that alone is up to 6 s a round. :class:`PromptGrid`
wraps any grid and polls with Flower's own ``push_messages`` / ``pull_messages`` at
``interval`` instead. Everything else is delegated unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message, MessageType, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fl_imaging.protocol import RecordKey, SiteKey

logger = logging.getLogger("fl_imaging.server")

# seconds between checks for replies (each check is one cheap call to the SuperLink)
DEFAULT_POLL_INTERVAL = 0.05


def destinations(messages: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of ``messages`` that have an id (a SuperLink's do)."""
    return {
        m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id
    }


def replied_node(reply: Message, sent_to: dict[str, int]) -> int:
    """The node a reply answers for (``sent_to``: message id -> destination node).

    A node's reply comes from that node; an error reply the SuperLink wrote on its behalf
    (e.g. it went offline) comes from the SuperLink and is matched by ``reply_to_message_id``.
    """
    node = reply.metadata.src_node_id
    if node in sent_to.values():
        return node
    return sent_to.get(reply.metadata.reply_to_message_id, node)


class FederationError(RuntimeError):
    """The federation cannot continue (too few sites connected or replied)."""


def wait_for_sites(
    grid: Grid, expected: int, timeout: float, minimum: int | None = None
) -> list[int]:
    """Wait until ``expected`` nodes are connected; return their ids.

    After ``timeout`` seconds, go on with the connected nodes if there are at least
    ``minimum`` of them (default: ``expected``), else raise :class:`FederationError`.
    """
    minimum = expected if minimum is None else minimum
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            if len(nodes) >= minimum:
                logger.warning(
                    "%d of %d sites connected after %.0f s: going on without the others",
                    len(nodes),
                    expected,
                    timeout,
                )
                return nodes
            raise FederationError(
                f"only {len(nodes)} of {expected} sites connected within {timeout:.0f} s; in "
                f'simulation pass --federation-config "num-supernodes={expected}", in '
                f"deployment start one SuperNode per site"
            )
        time.sleep(1.0)


def ask_sites(
    grid: Grid, timeout: float, nodes: Iterable[int]
) -> tuple[dict[int, str], dict[int, str]]:
    """Ask ``nodes`` which site they are: ``(node -> claimed name, node -> error reason)``.

    An error reply the SuperLink wrote on a node's behalf is attributed to that node.
    A node that does not answer within ``timeout`` is in neither mapping.
    """
    messages = [
        Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=node) for node in nodes
    ]
    names: dict[int, str] = {}
    errors: dict[int, str] = {}
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sent_to = destinations(messages)
    for reply in replies:
        node = replied_node(reply, sent_to)
        if reply.has_error():
            errors[node] = reply.error.reason
        elif RecordKey.SITE in reply.content:
            names[node] = str(reply.content[RecordKey.SITE][SiteKey.NAME])
    return names, errors


def identify_sites(
    grid: Grid, timeout: float, nodes: Iterable[int] | None = None
) -> dict[int, str]:
    """Ask ``nodes`` (default: every connected node) which site they are: node id -> name.

    Learnt once per run, so a site whose very first message fails is still named in the
    logs and ``metrics.jsonl``. A node that does not answer is named later, by its
    first successful reply.
    """
    return ask_sites(grid, timeout, grid.get_node_ids() if nodes is None else nodes)[0]


class DelegatingGrid(Grid):
    """A grid that hands every call to ``inner`` (subclasses change one behaviour)."""

    def __init__(self, grid: Grid) -> None:
        self.inner = grid

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Delegated."""
        return self.inner.send_and_receive(messages, timeout=timeout)

    def set_run(self, run: Run) -> None:
        """Delegated."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """Delegated."""
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Delegated."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegated."""
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Delegated."""
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated."""
        return self.inner.pull_messages(message_ids)


class PromptGrid(DelegatingGrid):
    """``grid`` with a faster ``send_and_receive``; every other call goes to ``grid``."""

    def __init__(self, grid: Grid, interval: float = DEFAULT_POLL_INTERVAL) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        super().__init__(grid)
        self.interval = interval

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; return the replies that arrive within ``timeout`` seconds."""
        pending = set(self.inner.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            arrived = list(self.inner.pull_messages(pending))
            replies += arrived
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies


class NodeSnapshot(DelegatingGrid):
    """``grid`` with its connected nodes frozen at construction.

    Flower's strategies read ``get_node_ids`` twice while sampling (once for the sample
    size, once to sample): a site reconnecting in between makes the sample smaller
    than the set it is drawn from, and a healthy site is left out of the round.
    """

    def __init__(self, grid: Grid, node_ids: Iterable[int] | None = None) -> None:
        super().__init__(grid)
        self.node_ids = list(grid.get_node_ids() if node_ids is None else node_ids)

    def get_node_ids(self) -> Iterable[int]:
        """The nodes connected when this snapshot was taken."""
        return list(self.node_ids)
