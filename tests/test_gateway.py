"""The gateway in front of the SuperLink passes the Fleet API and nothing else.

Finding 1 of the security audit: with only the public ``ca.crt``, anyone reaching the
SuperLink's port could list nodes, register a key and submit a run (Control API).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from fl_imaging.tools.gateway import Upstream, build_app, fleet_routes, is_allowed


class Caller:
    """Calls the gateway app in process (an HTTP client on an ASGI transport)."""

    def __init__(self, app: object) -> None:
        self.app = app

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, client=("203.0.113.9", 4321))
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                return await client.post(path, **kwargs)

        return asyncio.run(call())


@pytest.fixture
def forwarded() -> list[httpx.Request]:
    return []


@pytest.fixture
def gateway(forwarded: list[httpx.Request]) -> Caller:
    def superlink(request: httpx.Request) -> httpx.Response:
        forwarded.append(request)
        return httpx.Response(200, content=b"\x08\x01", headers={"x-upstream": "yes"})

    app = build_app(Upstream("127.0.0.1:1", insecure=True), httpx.MockTransport(superlink))
    return Caller(app)


def test_the_fleet_routes_come_from_flower_and_include_what_a_supernode_calls() -> None:
    routes = fleet_routes()
    assert {
        "/v1/fleet/activate-node",
        "/v1/fleet/pull-messages",
        "/v1/fleet/push-messages",
        "/v1/fleet/get-fab",
    } <= routes
    assert not any(r.startswith("/v1/control") or r.startswith("/v1/runtime") for r in routes)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/register-node",  # flwr supernode register
        "/v1/control/list-nodes",  # flwr supernode list
        "/v1/control/list-runs",  # flwr list
        "/v1/control/start-run",  # flwr run
        "/v1/runtime/get-nodes",  # the ServerApp's API
        "/v1/fleet/../control/list-nodes",
        "/v1/fleet/pull-messages/../../control/start-run",
        "/v1/fleet%2F..%2Fcontrol/list-nodes",
        "/docs",
    ],
)
def test_everything_but_the_fleet_api_is_refused_and_never_forwarded(
    gateway: Caller, forwarded: list[httpx.Request], path: str
) -> None:
    answer = gateway.post(path, content=b"x")
    assert answer.status_code == 403
    assert "exposes only the Fleet API" in answer.json()["error"]
    assert forwarded == []


def test_a_fleet_call_is_forwarded_with_its_signed_headers_and_body(
    gateway: Caller, forwarded: list[httpx.Request]
) -> None:
    headers = {"flwr-public-key": "cHVi", "flwr-signature": "c2ln", "content-type": "x/y"}
    answer = gateway.post("/v1/fleet/pull-messages", content=b"body", headers=headers)
    assert answer.status_code == 200 and answer.content == b"\x08\x01"
    assert answer.headers["x-upstream"] == "yes"
    [request] = forwarded
    assert request.url.path == "/v1/fleet/pull-messages" and request.content == b"body"
    assert request.headers["flwr-public-key"] == "cHVi"
    assert request.headers["flwr-signature"] == "c2ln"


def test_only_post_passes() -> None:
    assert is_allowed("POST", "/v1/fleet/pull-messages")
    assert not is_allowed("GET", "/v1/fleet/pull-messages")
    assert not is_allowed("POST", "/v1/fleet/pull-messages/")
