"""Run the service with uvicorn (what ``patchsearch serve`` calls)."""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import unquote_plus

from .app import Settings, create_app

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def redact_query(target: str) -> str:
    """``target`` (a request path with its query string, as the access log prints it) with
    the value of every ``token`` parameter replaced by ``***``; parameter names are
    compared percent- and plus-decoded (repeatedly) and case-insensitively (``?tok%65n=``,
    ``?TOKEN=``)."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    parts = []
    for item in query.split("&"):
        name, eq, _ = item.partition("=")
        parts.append(f"{name}=***" if eq and _decoded(name) == "token" else item)
    return path + sep + "&".join(parts)


def _decoded(name: str) -> str:
    """``name`` percent-decoded until it no longer changes (at most 4 times), stripped, lower case."""
    for _ in range(4):
        plain = unquote_plus(name)
        if plain == name:
            break
        name = plain
    return name.strip().lower()


class RedactToken(logging.Filter):
    """Replace the value of a ``token`` query parameter in access-log lines by ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(redact_query(a) if isinstance(a, str) and "?" in a else a for a in record.args)
        return True


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, extra: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The ``Host`` names the service answers to when bound to ``host``: the loopback
    names (plus ``extra``) when ``host`` is a loopback address, else ``extra`` or None
    (any name)."""
    if is_loopback(host):
        return tuple(dict.fromkeys((*LOOPBACK_NAMES, host.strip("[]"), *extra)))
    return tuple(extra) or None


def uvicorn_config(settings: Settings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """The :class:`uvicorn.Config` of :func:`serve`: the guarded h11 protocol
    (:mod:`.protocol`: header and body deadlines, a connection cap), no WebSocket, a 16 KiB
    bound on the request line plus headers, 5 s keep-alive."""
    import uvicorn

    from .protocol import protocol_class

    return uvicorn.Config(create_app(settings), host=host, port=port, log_level=log_level,
                          http=protocol_class(settings.header_timeout_s, settings.body_timeout_s,
                                              settings.max_connections),
                          ws="none", lifespan="on", timeout_keep_alive=5, h11_max_incomplete_event_size=16 * 1024,
                          backlog=min(2048, 4 * settings.max_connections), timeout_graceful_shutdown=30,
                          server_header=False)


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT / SIGTERM (uvicorn finishes in-flight requests, then the registry
    stops its threads and closes every index)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.access").addFilter(RedactToken())
    uvicorn.Server(uvicorn_config(settings, host, port, log_level)).run()
