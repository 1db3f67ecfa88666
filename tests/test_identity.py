"""A hospital's identity is its key: impostors, unknown keys and second claimants are refused.

Finding 1 of the security audit: a node registered with any key could declare
``site="hospital_a"``, train, and have its rows and Dice recorded as hospital_a's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

from fl_imaging.config import ConfigError, compose, plan_to_yaml
from fl_imaging.outputs.reporting import RunFolder
from fl_imaging.protocol import RecordKey, SiteKey
from fl_imaging.server import rounds as server
from fl_imaging.server.identity import IdentityError, VerifiedGrid, key_fingerprint
from tests.conftest import tiny_overrides
from tests.local_grid import LocalGrid, TamperingGrid

SITES = ["hospital_a", "hospital_b", "hospital_c"]


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The public key as a SuperLink stores a registered node's (PEM SubjectPublicKeyInfo)."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def openssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The public key as a hospital hands it over (its ``.pub`` file)."""
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def test_a_keys_fingerprint_is_the_same_from_its_pub_file_and_from_the_superlink() -> None:
    key = new_key()
    assert key_fingerprint(openssh(key)) == key_fingerprint(pem(key))
    assert key_fingerprint(pem(key)) != key_fingerprint(pem(new_key()))
    with pytest.raises(IdentityError, match="not a PEM or OpenSSH public key"):
        key_fingerprint(b"ssh-rsa garbage")


class NamedNodes:
    """A grid whose nodes answer "which site are you" with a fixed claim and hold a key."""

    def __init__(self, claims: dict[int, str | None], keys: dict[int, bytes]) -> None:
        self.claims, self.keys = claims, keys
        self.asked: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.claims)

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=self.keys.get(n, b"")) for n in self.claims]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.asked.append(node)
            claim = self.claims[node]
            if claim is None:  # its ClientApp failed (e.g. the hospital refused the bundle)
                replies.append(Message(Error(code=1, reason="bundle not approved"), reply_to=msg))
                continue
            content = RecordDict()
            content[RecordKey.SITE] = ConfigRecord({SiteKey.NAME: claim})
            reply = Message(content, reply_to=msg)
            replies.append(reply)
        return replies


def test_with_site_keys_only_the_key_holder_is_admitted_as_its_site(task_identity: None) -> None:
    keys = {site: new_key() for site in SITES}
    attacker = new_key()
    grid = NamedNodes(
        claims={
            1: "hospital_a",
            2: "hospital_b",
            3: "hospital_c",
            7: "hospital_a",
            8: "hospital_a",
            9: "hospital_c",
        },
        keys={
            1: pem(keys["hospital_a"]),
            2: pem(keys["hospital_b"]),
            3: pem(keys["hospital_c"]),
            7: pem(attacker),
            8: pem(keys["hospital_b"]),
        },
    )
    site_keys = {site: key_fingerprint(openssh(k)) for site, k in keys.items()}
    verified = VerifiedGrid(grid, SITES, site_keys, timeout=1.0)

    assert sorted(verified.get_node_ids()) == [1, 2, 3]
    assert verified.sites == {1: "hospital_a", 2: "hospital_b", 3: "hospital_c"}
    reasons = {r.node: r.reason for r in verified.refusals()}
    assert "belongs to no site" in reasons[7]  # the finding: a freshly registered key
    assert "claims site 'hospital_a' but its key belongs to 'hospital_b'" in reasons[8]
    assert "presents no registered public key" in reasons[9]
    assert [r.node for r in verified.refusals()] == [7, 8, 9]


def test_with_site_keys_a_node_that_cannot_say_who_it_is_is_named_by_its_key(
    task_identity: None,
) -> None:
    keys = {site: new_key() for site in SITES}
    grid = NamedNodes(
        claims={1: "hospital_a", 2: None},
        keys={1: pem(keys["hospital_a"]), 2: pem(keys["hospital_b"])},
    )
    site_keys = {site: key_fingerprint(pem(k)) for site, k in keys.items()}
    verified = VerifiedGrid(grid, SITES, site_keys, timeout=1.0)
    assert sorted(verified.get_node_ids()) == [1, 2]
    # admitted as hospital_b, so that every round records why hospital_b does not take part
    assert verified.sites == {1: "hospital_a", 2: "hospital_b"}
    assert verified.errors == {2: "bundle not approved"}


def test_without_keys_a_second_claimant_waits_until_the_sites_node_has_left(
    task_identity: None,
) -> None:
    grid = NamedNodes(
        claims={1: "hospital_a", 2: "hospital_b", 4: "hospital_a", 5: "hospital_x"}, keys={}
    )
    verified = VerifiedGrid(grid, SITES, {}, timeout=1.0)
    assert sorted(verified.get_node_ids()) == [1, 2]
    reasons = {r.node: r.reason for r in verified.refusals()}
    assert "already connected as node 1" in reasons[4]
    assert "not in federation.sites" in reasons[5]

    del grid.claims[1]  # hospital_a's node went away; its SuperNode came back as node 4
    assert sorted(verified.get_node_ids()) == [2, 4]
    assert verified.sites[4] == "hospital_a" and 1 not in verified.sites
    assert grid.asked.count(4) == 1  # its claim is asked once, not every call


def test_site_keys_are_validated_against_the_sites(tiny_sites: list[Path], tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_sites, tmp_path)
    good = key_fingerprint(pem(new_key()))
    with pytest.raises(ConfigError) as caught:
        compose(
            "demo",
            [
                *overrides,
                f"+federation.site_keys.hospital_a={good}",
                f"+federation.site_keys.hospital_b={good}",
                "+federation.site_keys.hospital_z=abc",
            ],
        )
    message = str(caught.value)
    assert "names 'hospital_z', which is not in federation.sites" in message
    assert "no key for site 'hospital_c'" in message
    assert "hospital_z must be 64 lowercase hex digits" in message
    assert "'hospital_a' and 'hospital_b' have the same key" in message


class KeyedLocalGrid(LocalGrid):
    """The in-process grid with a SuperNode key per node (as a SuperLink reports them)."""

    def __init__(self, overrides: list[str], keys: dict[int, bytes]) -> None:
        super().__init__(overrides)
        self.keys = keys

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=self.keys.get(n, b"")) for n in self.contexts]


def test_an_impostor_with_its_own_key_never_trains_and_is_in_the_summary(
    tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    overrides = tiny_overrides(tiny_sites, tmp_path)
    keys = {i + 1: new_key() for i in range(3)}
    site_keys = [
        f"+federation.site_keys.{site}={key_fingerprint(openssh(keys[i + 1]))}"
        for i, site in enumerate(SITES)
    ]
    plan = compose("demo", [*overrides, *site_keys, "rounds=1"])
    grid = KeyedLocalGrid([*overrides, "rounds=1"], {n: pem(k) for n, k in keys.items()})
    # node 99 registered a key of its own and says it is hospital_a (the audit's attack)
    grid.keys[99] = pem(new_key())
    grid.contexts[99] = Context(
        run_id=1,
        node_id=99,
        node_config={"site": "hospital_a"},
        state=RecordDict(),
        run_config=grid.contexts[1].run_config,
    )
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))

    summary = server.run_federation(grid, plan, run, run_id=1)

    answered = [m for m in grid.received if m.metadata.message_type != "query"]
    assert answered and {m.metadata.src_node_id for m in answered} == {1, 2, 3}
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    a_rows = [r for r in rows if r["site"] == "hospital_a"]
    assert len([r for r in a_rows if r["split"] == "train"]) == 1  # one hospital_a, not two
    on_disk = json.loads((run.path / "summary.json").read_text())
    assert on_disk["status"] == "finished" and summary["status"] == "finished"
    [refusal] = on_disk["refused_nodes"]
    assert refusal["node"] == 99 and refusal["claimed_site"] == "hospital_a"
    assert "belongs to no site" in refusal["reason"]


class RenamingGrid(TamperingGrid):
    """hospital_b's node says it is hospital_a in its training replies (after admission)."""

    def tamper(self, reply: Message, received: ArrayRecord) -> None:
        if reply.metadata.src_node_id == 2:
            reply.content[RecordKey.SITE] = ConfigRecord({SiteKey.NAME: "hospital_a"})


def test_a_reply_naming_another_site_than_its_node_was_admitted_as_is_not_aggregated(
    tiny_sites: list[Path], tmp_path: Path, task_identity: None
) -> None:
    overrides = [*tiny_overrides(tiny_sites, tmp_path), "rounds=1"]
    plan = compose("demo", overrides)
    run = RunFolder.create(tmp_path / "outputs", plan.name, plan_to_yaml(plan))

    summary = server.run_federation(RenamingGrid(overrides), plan, run, run_id=1)

    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["site"] for r in train if "error" not in r] == ["hospital_a", "hospital_c"]
    [failure] = [r for r in train if "error" in r]
    assert failure["site"] == "hospital_b"
    assert (
        "reply names site 'hospital_a', but node 2 was admitted as 'hospital_b'"
        in (failure["error"])
    )
    assert summary["status"] == "finished_with_failures"
    assert "hospital_b" in summary["failed_sites"]


def test_site_fingerprint_prints_what_federation_site_keys_expects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fl_imaging.tools.cli import main

    key = new_key()
    pub = tmp_path / "hospital_a.pub"
    pub.write_bytes(openssh(key))
    assert main(["site", "fingerprint", str(pub)]) == 0
    assert capsys.readouterr().out.split() == [key_fingerprint(pem(key)), str(pub)]
    broken = tmp_path / "broken.pub"
    broken.write_text("not a key\n")
    assert main(["site", "fingerprint", str(broken)]) == 2
    assert f"error: {broken}: not a PEM or OpenSSH public key" in capsys.readouterr().err
