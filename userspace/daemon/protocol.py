"""kvosd's HTTP/1.1 protocol: uvicorn's h11 protocol with the limits it lacks.

- a header timeout: a connection that has not sent a whole request head within `header_timeout`
  seconds of connecting (or of starting its next request) is closed; uvicorn's only timer is the
  keep-alive one, armed after a response, so a client that sends half a request line held its
  connection forever;
- a connection limit: past `max_connections` open connections, a new one is answered 503 EAGAIN
  (JSON, in the route's shape) and closed, instead of uvicorn's plain-text 503;
- malformed HTTP is answered 400 EINVAL, and a head past the size limit 431 E2BIG, in JSON,
  not plain text;
- after an early answer (413 for a body over the cap) what the client still sends is discarded,
  so it can read that answer, but only up to DRAIN_BYTES; then the connection is closed.
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from kernel.errors import E2BIG, EAGAIN, EINVAL, KvosError
from userspace.daemon import errors

DRAIN_BYTES = 64 * 1024 * 1024


def protocol_class(header_timeout: float, max_connections: int) -> type:
    """The protocol class to give uvicorn.Config(http=...), with these limits."""
    return type("KvosdProtocol", (KvosdProtocol,), {"header_timeout": header_timeout,
                                                    "max_connections": max_connections})


class KvosdProtocol(H11Protocol):
    header_timeout: float = 10.0
    max_connections: int = 4096

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.header_timer: asyncio.TimerHandle | None = None
        self.discarded = 0
        if len(self.connections) > self.max_connections:
            self.app = over_capacity(self.max_connections)     # this connection's requests only
        self._watch_head()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY:
            self.discarded += len(data)        # the rest of a body we answered without reading
            if self.discarded > DRAIN_BYTES:
                self.transport.close()
                return
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.discarded = 0

    # -- the header timeout ------------------------------------------------------------------------
    def _watch_head(self) -> None:
        """Run the header timer while the peer owes us a request head; uvicorn's keep-alive timer
        covers an idle connection between requests, so the timer starts only once bytes of the
        next request have arrived (or at connect, for the first one)."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self.header_timer is None and (self.timeout_keep_alive_task is None):
            self.header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)
        elif not waiting:
            self._cancel_header_timer()

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timed_out(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    # -- malformed requests ------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """h11 refused the request: a head still incomplete past the size limit (431), or not HTTP (400)."""
        if len(self.conn.trailing_data[0]) > self.config.h11_max_incomplete_event_size:
            status, err = 431, KvosError(E2BIG, f"the request head is over kvosd's limit of "
                                                f"{self.config.h11_max_incomplete_event_size:,} bytes "
                                                f"(kvos serve --max-header-bytes)")
        else:
            status, err = 400, KvosError(EINVAL, "malformed HTTP request")
        payload = errors.response("/", err, status).body
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=payload),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:       # h11 cannot answer in this state: just close
            pass
        self.transport.close()


def over_capacity(limit: int):
    """An ASGI app answering every request 503 EAGAIN and closing the connection."""
    async def app(scope, receive, send):
        err = KvosError(EAGAIN, f"kvosd has {limit} connections open, its limit: retry later "
                                "(kvos serve --max-connections)")
        await errors.response(scope.get("path", "/"), err, 503,
                              {"Connection": "close", "Retry-After": "1"})(scope, receive, send)
    return app
