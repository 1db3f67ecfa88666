"""Who is who in a federation: the server admits a node only as the site its key belongs to.

A node's ``--node-config site=...`` is a claim. With ``federation.site_keys`` (site name ->
SHA-256 fingerprint of the public key the coordinator registered for that hospital), the
verified identity of a node is the site its SuperNode key belongs to; the SuperLink has
already checked that the node holds that key (SuperNode authentication). The server
refuses, and logs once:

- a node whose key is not in ``federation.site_keys`` (or that presents none);
- a node that names a different site than its key belongs to;
- a second node claiming a site whose node is still connected;
- a node naming a site that ``federation.sites`` does not list.

Without ``site_keys`` (simulation, or a deployment without node authentication) the
last two rules still hold: one node per configured site. Every round, metric row and
screening decision uses the admitted name (:attr:`VerifiedGrid.sites`), never a
reply's claim.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid

from fl_imaging.server.grid import DelegatingGrid, ask_sites

logger = logging.getLogger("fl_imaging.server")

# seconds before a node that did not say which site it is gets asked again
REASK_AFTER = 30.0


def site_name(sites: Mapping[int, str], node: int) -> str:
    """The admitted site of ``node`` for logs and rows; ``node <id>`` when it has none yet."""
    return sites.get(node, f"node {node}")


class IdentityError(ValueError):
    """A public key that cannot be read or fingerprinted."""


def key_fingerprint(public_key: bytes) -> str:
    """SHA-256 (hex) of a public key's DER SubjectPublicKeyInfo.

    Accepts the PEM a SuperLink stores for a registered node and the OpenSSH
    ``.pub`` file a hospital hands the coordinator: both give the same fingerprint.

    Raises:
        IdentityError: the bytes are neither a PEM nor an OpenSSH public key.
    """
    text = public_key.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
        else:
            key = serialization.load_ssh_public_key(text)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"not a PEM or OpenSSH public key: {exc}") from exc
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def file_fingerprint(path: Path) -> str:
    """:func:`key_fingerprint` of a public key file, naming the file when it is not one."""
    try:
        return key_fingerprint(path.read_bytes())
    except (OSError, IdentityError) as exc:
        raise IdentityError(f"{path}: {exc}") from exc


@dataclass(frozen=True)
class Refusal:
    """A node the server did not admit, and why."""

    node: int
    claimed_site: str | None
    key_fingerprint: str | None
    reason: str
    at: float = field(default_factory=time.time)  # Unix time of the refusal

    def to_row(self) -> dict[str, object]:
        """The summary's ``refused_nodes`` entry."""
        return {
            "node": self.node,
            "claimed_site": self.claimed_site,
            "key_fingerprint": self.key_fingerprint,
            "reason": self.reason,
            "at": self.at,
        }


class VerifiedGrid(DelegatingGrid):
    """``grid`` that lists only admitted nodes; :attr:`sites` names them (node id -> site).

    Args:
        grid: the grid to wrap (its ``send_and_receive`` asks new nodes their site).
        site_names: the configured sites (``federation.sites``).
        site_keys: site name -> key fingerprint; empty: names are not bound to keys.
        timeout: seconds to wait for a new node to say which site it is.
        claimed: node id -> site a node already named (asked before this grid existed).
    """

    def __init__(
        self,
        grid: Grid,
        site_names: Sequence[str],
        site_keys: Mapping[str, str],
        timeout: float,
        claimed: Mapping[int, str] | None = None,
    ) -> None:
        super().__init__(grid)
        self.site_names = list(site_names)
        self.site_of_key = {fp: site for site, fp in site_keys.items()}
        self.bound = bool(site_keys)
        self.timeout = timeout
        self.claimed: dict[int, str] = dict(claimed or {})
        self.errors: dict[int, str] = {}  # nodes whose answer to "which site" was an error
        self.sites: dict[int, str] = {}  # admitted: node id -> verified site
        self.refused: dict[int, Refusal] = {}  # for good (key or name wrong)
        self.waiting: dict[int, Refusal] = {}  # its site is held by a connected node
        self.keys: dict[int, str | None] = {}  # node id -> its key's fingerprint (None: none)
        self._asked_at: dict[int, float] = {}

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes that are admitted (new ones are checked first)."""
        connected = list(self.inner.get_node_ids())
        undecided = [n for n in connected if n not in self.sites and n not in self.refused]
        if undecided:
            self._decide(undecided, connected)
        return [n for n in connected if n in self.sites]

    def get_nodes(self) -> Iterable[NodeInfo]:
        """The admitted nodes' information."""
        return [info for info in self.inner.get_nodes() if info.node_id in self.sites]

    def refusals(self) -> list[Refusal]:
        """Every node refused so far (for good, or while its claimed site was held)."""
        return [*self.refused.values(), *self.waiting.values()]

    def _decide(self, nodes: list[int], connected: list[int]) -> None:
        now = time.monotonic()
        unnamed = [
            n
            for n in nodes
            if n not in self.claimed and now - self._asked_at.get(n, -REASK_AFTER) >= REASK_AFTER
        ]
        if unnamed:
            for n in unnamed:
                self._asked_at[n] = now
            names, errors = ask_sites(self.inner, self.timeout, unnamed)
            self.claimed.update(names)
            self.errors.update(errors)
            for node in names:
                self.errors.pop(node, None)
        # a node is judged once it said who it is, or (names bound to keys) answered an error:
        # its key then says who it is, its replies why it cannot take part (e.g. the hospital
        # refused the app bundle), so it is admitted and every round records that
        judged = [n for n in nodes if n in self.claimed or (self.bound and n in self.errors)]
        if self.bound:
            self._fetch_keys([n for n in judged if n not in self.keys])
        for node in judged:
            self._judge(node, self.claimed.get(node), self.keys.get(node), connected)

    def _fetch_keys(self, nodes: list[int]) -> None:
        """Fingerprints of ``nodes``' registered keys (a node id keeps its key: asked once)."""
        if not nodes:
            return
        wanted = set(nodes)
        for info in self.inner.get_nodes():
            if info.node_id in wanted:
                try:
                    fingerprint = key_fingerprint(info.public_key) if info.public_key else None
                except IdentityError:
                    fingerprint = None
                self.keys[info.node_id] = fingerprint

    def _judge(self, node: int, claim: str | None, key: str | None, connected: list[int]) -> None:
        """Admit ``node`` as its site, or refuse it (``claim`` None: it could not say)."""
        if claim is not None and claim not in self.site_names:
            self._refuse(
                node,
                claim,
                key,
                f"names site {claim!r}, which is not in federation.sites {self.site_names}",
            )
            return
        if self.bound:
            if key is None:
                self._refuse(
                    node,
                    claim,
                    None,
                    "presents no registered public key "
                    "(federation.site_keys binds every site to a key)",
                )
                return
            owner = self.site_of_key.get(key)
            if owner is None:
                self._refuse(
                    node,
                    claim,
                    key,
                    f"its key {key[:16]}... belongs to no site in federation.site_keys",
                )
                return
            if claim is None:
                logger.warning(
                    "node %d is %s by its key, but it could not say which site it is: %s",
                    node,
                    owner,
                    self.errors.get(node),
                )
                claim = owner
            elif owner != claim:
                self._refuse(
                    node, claim, key, f"claims site {claim!r} but its key belongs to {owner!r}"
                )
                return
        holder = next((n for n, s in self.sites.items() if s == claim and n in connected), None)
        if holder is not None:
            refusal = Refusal(
                node, claim, key, f"claims site {claim!r}, already connected as node {holder}"
            )
            if node not in self.waiting:
                logger.warning("REFUSED node %d: %s", node, refusal.reason)
            self.waiting[node] = refusal
            return
        for stale in [n for n, s in self.sites.items() if s == claim]:
            del self.sites[stale]  # its node left; the site reconnected as a new node
        self.waiting.pop(node, None)
        self.sites[node] = claim
        logger.info(
            "node %d admitted as %s%s",
            node,
            claim,
            f" (key {key[:16]}...)" if self.bound and key else "",
        )

    def _refuse(self, node: int, claim: str, key: str | None, reason: str) -> None:
        self.refused[node] = Refusal(node, claim, key, reason)
        logger.warning("REFUSED node %d: %s", node, reason)
