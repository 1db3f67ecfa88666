r"""The hospitals' door to the SuperLink: only the Fleet API, nothing of the Control API.

Flower 1.42 serves its Fleet (SuperNodes), Control (``flwr run``, ``flwr list``,
``flwr supernode register``) and Runtime (ServerApp) APIs on one HTTP port, and the open
source SuperLink has no account authentication for the Control API. So anyone who can
reach that port and holds the public ``ca.crt`` can list nodes, register a key and submit
a run. The deployment therefore binds the SuperLink to the coordinator's loopback (or a
private interface) and puts this gateway on the address hospitals reach. It terminates
TLS with the SuperLink's certificate and forwards a request only when it is a ``POST`` to
one of the Fleet API routes Flower itself declares (read from Flower's Fleet router, so
a new Flower version brings its own list); every other request is answered 403 and
logged with the caller's address. SuperNode authentication is untouched: the signed
headers pass through and the SuperLink checks them as before.

    fl-imaging gateway --listen 0.0.0.0:9092 --superlink 127.0.0.1:9091 \
        --ssl-certfile certs/superlink.crt --ssl-keyfile certs/superlink.key \
        --root-certificates certs/ca.crt

An operator who prefers their own reverse proxy (nginx, envoy) applies the same rule:
``POST`` to exactly the paths :func:`fleet_routes` lists, everything else refused.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from functools import lru_cache

logger = logging.getLogger("fl_imaging.tools.gateway")

# hop-by-hop headers (RFC 9110 7.6.1) and those the HTTP client sets itself
_NOT_FORWARDED = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# and the body's encoding: httpx hands the gateway the decoded body
_NOT_RETURNED = _NOT_FORWARDED | {"content-encoding"}


@lru_cache(maxsize=1)
def fleet_routes() -> frozenset[str]:
    """The paths of Flower's Fleet API (what a SuperNode calls), from Flower's own router."""
    from flwr.superlink.routers.fleet.router import router

    paths = frozenset(route.path for route in router.routes if hasattr(route, "path"))
    if not paths:  # pragma: no cover - a Flower without a Fleet router
        raise RuntimeError("Flower's Fleet router lists no routes; the gateway would refuse all")
    return paths


def is_allowed(method: str, path: str, routes: Iterable[str] | None = None) -> bool:
    """True for a ``POST`` to exactly one of the Fleet API paths (no prefixes, no ``..``)."""
    return method == "POST" and path in (fleet_routes() if routes is None else set(routes))


@dataclass(frozen=True)
class Upstream:
    """Where the SuperLink listens and how to trust it."""

    address: str  # host:port
    insecure: bool = False
    root_certificates: str | None = None  # the CA file that signed the SuperLink's cert

    @property
    def base_url(self) -> str:
        """``https://host:port`` (``http://`` when insecure)."""
        return f"{'http' if self.insecure else 'https'}://{self.address}"

    def verify(self) -> ssl.SSLContext | bool:
        """The TLS verification the client uses towards the SuperLink."""
        if self.insecure:
            return False
        context = ssl.create_default_context(cafile=self.root_certificates)
        return context


def build_app(upstream: Upstream, transport: object | None = None):  # noqa: ANN201
    """An ASGI (Starlette) app that forwards allowed requests to ``upstream``, refuses the rest.

    ``transport``: an ``httpx`` transport to reach the upstream through (tests).
    """
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    client = httpx.AsyncClient(
        base_url=upstream.base_url, verify=upstream.verify(), timeout=120, transport=transport
    )

    async def forward(request: Request) -> Response:
        path = request.url.path
        caller = request.client.host if request.client else "unknown"
        if not is_allowed(request.method, path):
            logger.warning(
                "refused %s %s from %s (only the Fleet API passes)", request.method, path, caller
            )
            return JSONResponse(
                {
                    "error": f"{request.method} {path} is not served here: this address "
                    "exposes only the Fleet API to SuperNodes"
                },
                status_code=403,
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        try:
            answer = await client.request(
                request.method, path, content=await request.body(), headers=headers
            )
        except httpx.HTTPError as exc:
            logger.error("SuperLink %s unreachable for %s: %s", upstream.address, path, exc)
            return JSONResponse({"error": "SuperLink unreachable"}, status_code=502)
        out = {k: v for k, v in answer.headers.items() if k.lower() not in _NOT_RETURNED}
        return Response(answer.content, status_code=answer.status_code, headers=out)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def serve(
    listen: str,
    upstream: Upstream,
    ssl_certfile: str | None,
    ssl_keyfile: str | None,
) -> None:
    """Run the gateway on ``listen`` (host:port) until stopped."""
    import uvicorn

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen must be host:port, got {listen!r}")
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ValueError("give both --ssl-certfile and --ssl-keyfile, or neither (--insecure)")
    logger.info(
        "gateway on %s -> SuperLink %s: only %d Fleet API routes pass",
        listen,
        upstream.address,
        len(fleet_routes()),
    )
    uvicorn.run(
        build_app(upstream),
        host=host,
        port=int(port),
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        log_level="warning",
    )
