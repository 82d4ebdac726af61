"""The service's outer ASGI layer: Host / Origin checks, the bearer token, request metrics.

* ``Host`` must name one of ``allowed_hosts`` when that is set (a service bound to
  loopback answers only to loopback names, so a web page whose own name resolves to
  127.0.0.1 - DNS rebinding - gets 421, not the API).
* ``Origin``, when a browser sends one, must be the service's own origin (403 otherwise):
  another site's page in the operator's browser can neither post frames nor read answers.
* With a token, every endpoint but ``/healthz`` needs ``Authorization: Bearer <token>``
  (``GET /`` also takes ``?token=``, which the page moves into that header).

Pure ASGI (no request body is touched here), so refusals cost no thread and no read.
"""

from __future__ import annotations

import hmac
import json
import time
from urllib.parse import parse_qsl, urlsplit

OPEN_PATHS = ("/healthz",)


def host_name(host: str) -> str:
    """The name part of a ``Host`` header value (``[::1]:8000`` -> ``::1``), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _answer(send, status: int, code: str, message: str, headers: dict | None = None) -> None:
    body = json.dumps({"error": code, "message": message}).encode()
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: ``Guard(app, telemetry, token=None, allowed_hosts=None)``."""

    def __init__(self, app, telemetry, token: str | None = None, allowed_hosts=None):
        self.app, self.telemetry, self.token = app, telemetry, token
        self.allowed = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _answer(send_status, *refusal)
            else:
                await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.telemetry.observe(route, scope.get("method", ""), status[0], time.perf_counter() - start)

    def _refusal(self, scope) -> tuple | None:
        headers = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k.decode("latin-1"), v.decode("latin-1"))
        host = headers.get("host", "")
        if self.allowed is not None and host_name(host) not in self.allowed:
            return (421, "host_not_allowed", f"this service answers to {', '.join(sorted(self.allowed))} only, "
                                             f"not Host {host[:100]!r} (serve --allow-host NAME adds one)")
        origin = headers.get("origin")
        if origin is not None and not self._same_origin(origin, host, scope):
            return (403, "cross_origin", f"requests from another site ({origin[:100]!r}) are refused")
        if self.token and scope.get("path") not in OPEN_PATHS and not self._authorized(scope, headers):
            return (401, "unauthorized", "this service needs 'Authorization: Bearer <token>'",
                    {"WWW-Authenticate": "Bearer"})
        return None

    @staticmethod
    def _same_origin(origin: str, host: str, scope) -> bool:
        try:
            parts = urlsplit(origin.strip())
        except ValueError:
            return False
        return parts.scheme == scope.get("scheme", "http") and bool(host) and parts.netloc.lower() == host.lower()

    def _authorized(self, scope, headers: dict) -> bool:
        token = self.token.encode()
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token):
            return True
        if scope.get("path") == "/" and scope.get("method") in ("GET", "HEAD"):
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            return hmac.compare_digest(query.get("token", "").encode(), token)
        return False
