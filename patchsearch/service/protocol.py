"""uvicorn's h11 protocol with deadlines for slow clients and a connection cap.

uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``) but not a client
that sends its request slowly: a connection whose headers never complete, or whose
body trickles in a byte at a time, is held forever. :func:`protocol_class` makes an
:class:`~uvicorn.protocols.http.h11_impl.H11Protocol` subclass that

* gives the request line and headers ``header_timeout`` seconds from the moment the
  connection is ready for a request (opened, or its previous response sent), then
  answers 408 and closes;
* gives the request body ``body_timeout`` seconds once the headers are in, then closes
  (the application, reading the body, answers 408 itself a little earlier);
* holds at most ``max_connections`` connections: one more closes the connection that
  has waited longest for its next request (idle keep-alive or unfinished headers), or,
  when every connection is busy with a request, is answered 503 and closed.

So idle or slow sockets can neither pin the server nor crowd out a health probe.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

BODY_GRACE_S = 2.0  # the application's own 408 goes out before the protocol closes


def _raw(status: str, text: str, extra: str = "") -> bytes:
    body = text.encode("ascii")
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n").encode("ascii") + body


TIMEOUT_408 = _raw("408 Request Timeout", "the request headers did not arrive in time")
FULL_503 = _raw("503 Service Unavailable", "too many connections", "retry-after: 1\r\n")


class GuardedH11Protocol(H11Protocol):
    """:class:`H11Protocol` with the deadlines and cap of :func:`protocol_class` (class attributes)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 256

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._phase, self._since, self._timer = None, 0.0, None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._evict_idle():
            self.transport.write(FULL_503)
            self.transport.close()
            return
        self._track()

    def connection_lost(self, exc) -> None:
        self._cancel()
        self._phase = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    # -----------------------------------------------------------------------------------
    def _track(self) -> None:
        """Arm the deadline of the phase the connection is in (kept while the phase lasts)."""
        if self.transport.is_closing():
            return self._cancel()
        state = self.conn.their_state
        phase = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase == self._phase:
            return
        self._cancel()
        self._phase, self._since = phase, self.loop.time()
        if phase == "headers":
            self._timer = self.loop.call_later(self.header_timeout, self._expire)
        elif phase == "body":
            self._timer = self.loop.call_later(self.body_timeout + BODY_GRACE_S, self._expire)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._phase == "headers" and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(TIMEOUT_408)
        self.logger.info("closed a connection from %s: its request %s did not arrive in time",
                         "%s:%d" % self.client if self.client else "?", self._phase)
        self.transport.close()

    def _evict_idle(self) -> bool:
        """Close the connection waiting longest for a request; False if every one is busy."""
        idle = [c for c in self.connections if c is not self and getattr(c, "_phase", None) == "headers"
                and not c.transport.is_closing()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._since)
        oldest._cancel()
        oldest.transport.close()
        return True


def protocol_class(header_timeout: float, body_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass with these limits, for ``uvicorn.Config(http=...)``.

    Args:
        header_timeout: seconds for a request's line and headers, > 0.
        body_timeout: seconds for its body once the headers are in, > 0.
        max_connections: most open connections, >= 1.

    Raises:
        ValueError: a limit out of range.
    """
    if header_timeout <= 0 or body_timeout <= 0 or max_connections < 1:
        raise ValueError(f"bad connection limits: header_timeout={header_timeout}, body_timeout={body_timeout}, "
                         f"max_connections={max_connections}")
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": float(header_timeout), "body_timeout": float(body_timeout),
        "max_connections": int(max_connections)})
