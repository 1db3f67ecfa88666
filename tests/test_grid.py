"""PromptGrid: replies are collected as they arrive, not on Flower's 3 s deployment cycle."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg

from fl_imaging.server.grid import NodeSnapshot, PromptGrid
from tests.local_grid import LocalGrid, make_message


class SlowSites(LocalGrid):
    """Answers each pushed message only after ``delay`` seconds (as remote sites do)."""

    def __init__(self, delays: dict[int, float]) -> None:
        super().__init__([], num_nodes=len(delays))
        self.delays = delays
        self.pushed: dict[str, tuple[float, Message]] = {}
        self.pulls = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            ready = time.monotonic() + self.delays[msg.metadata.dst_node_id]
            self.pushed[msg.metadata.message_id] = (ready, msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        replies = []
        for mid in list(message_ids):
            ready, msg = self.pushed[mid]
            if time.monotonic() >= ready:
                replies.append(Message(RecordDict(), reply_to=msg))
        return replies


def _messages(grid: LocalGrid) -> list[Message]:
    return [make_message(RecordDict(), MessageType.EVALUATE, n) for n in grid.get_node_ids()]


def test_replies_are_collected_soon_after_the_last_site_answers() -> None:
    sites = SlowSites({1: 0.05, 2: 0.3, 3: 0.5})
    started = time.monotonic()
    replies = list(PromptGrid(sites, interval=0.05).send_and_receive(_messages(sites), timeout=10))
    assert len(replies) == 3
    assert time.monotonic() - started < 1.5  # Flower's own loop would wait >= 3 s


def test_a_silent_site_costs_the_timeout_and_the_others_are_kept() -> None:
    sites = SlowSites({1: 0.0, 2: 0.0, 3: 60.0})
    started = time.monotonic()
    replies = list(PromptGrid(sites, interval=0.05).send_and_receive(_messages(sites), timeout=0.4))
    assert len(replies) == 2
    assert 0.4 <= time.monotonic() - started < 2.0


def test_everything_else_is_delegated() -> None:
    sites = SlowSites({1: 0.0})
    assert list(PromptGrid(sites).get_node_ids()) == [1]
    with pytest.raises(ValueError, match="interval"):
        PromptGrid(sites, interval=0)


class Reconnecting(LocalGrid):
    """Node 3 reconnects while the strategy samples: the second look sees it."""

    def __init__(self) -> None:
        super().__init__([], num_nodes=3)
        self.looks = 0

    def get_node_ids(self) -> Iterable[int]:
        self.looks += 1
        return [1, 2] if self.looks == 1 else [1, 2, 3]


def test_a_site_reconnecting_during_sampling_does_not_push_out_a_healthy_one(
    task_identity: None,
) -> None:
    strategy = FedAvg(fraction_train=1.0, min_available_nodes=2, min_train_nodes=2)
    for _ in range(5):  # Flower samples at random: the bare grid often drops node 1 or 2
        messages = strategy.configure_train(
            1, ArrayRecord(), ConfigRecord(), NodeSnapshot(Reconnecting())
        )
        assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
