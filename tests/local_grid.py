"""An in-process Flower grid for tests: messages go straight to this process's handlers."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, MessageType, Metadata, RecordDict
from flwr.serverapp import Grid

from fl_imaging.apps import client_app
from fl_imaging.updates.compression import Codec, decode_update, encode_update
from fl_imaging.updates.wire import read_update, to_numpy, update_records


def make_message(content: RecordDict, message_type: str, dst: int) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=dst,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600,
        message_type=message_type,
    )
    return Message(metadata=metadata, content=content)


def context_for(partition_id: int, overrides: list[str]) -> Context:
    return Context(
        run_id=1,
        node_id=partition_id + 1,
        node_config={"partition-id": partition_id, "num-partitions": 3},
        state=RecordDict(),
        run_config={"experiment": "demo", "overrides": " ".join(overrides)},
    )


def sent_weights(reply: Message, received: ArrayRecord) -> dict[str, np.ndarray]:
    """The weights a training reply's encoded update stands for (as the server decodes it)."""
    return decode_update(read_update(reply.content), to_numpy(received))


def send_weights(
    reply: Message, weights: Mapping[str, np.ndarray], received: ArrayRecord, codec: Codec
) -> None:
    """Make a training reply carry ``weights``, encoded as a site encodes its update."""
    encoded, _ = encode_update(weights, to_numpy(received), codec)
    for key, record in update_records(encoded).items():
        reply.content[key] = record


class LocalGrid(Grid):
    """Delivers messages to this process's ClientApp handlers (one Context per node)."""

    def __init__(self, overrides: list[str], num_nodes: int = 3) -> None:
        self.contexts = {i + 1: context_for(i, overrides) for i in range(num_nodes)}
        self.received: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            handler = {
                MessageType.TRAIN: client_app.train,
                MessageType.EVALUATE: client_app.evaluate,
                MessageType.QUERY: client_app.identify,
            }[msg.metadata.message_type]
            try:
                replies.append(handler(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as exc:  # as Flower does: the exception becomes an error reply
                replies.append(Message(Error(code=1, reason=str(exc)), reply_to=msg))
        self.received.extend(replies)
        return replies

    # The loop under test uses only the two methods above.
    def set_run(self, run_id: int) -> None:  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_nodes(self):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError


class TamperingGrid(LocalGrid):
    """Changes what sites' training replies carry, as a faulty or malicious site would."""

    def tamper(self, reply: Message, received: ArrayRecord) -> None:
        """Change ``reply`` in place; ``received`` is the global model its site was sent."""
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        sent = {
            m.metadata.dst_node_id: m.content["arrays"]
            for m in messages
            if m.metadata.message_type == MessageType.TRAIN
        }
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.metadata.message_type == MessageType.TRAIN and not reply.has_error():
                self.tamper(reply, sent[reply.metadata.src_node_id])
        return replies
