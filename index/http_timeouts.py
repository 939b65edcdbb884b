"""uvicorn's h11 protocol with a deadline for request headers (slow-loris connections).

uvicorn times out only idle keep-alive connections, and only after a response: a client that
connects and sends nothing, or sends half a request line and stops, or trickles header bytes,
holds its connection (and a file descriptor) forever. :class:`HeaderDeadlineProtocol` gives every
request ``header_timeout_s`` seconds from its first byte (from the connection's opening for the
first request) to deliver complete headers, else answers ``408`` and closes. It also closes a
connection whose response is complete while the request body is still arriving (a route that
answered without reading it): such a connection cannot serve another request anyway, and a
trickling body would otherwise hold it. The body of a route that does read it has its own
deadline (the search route's body reader).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .http_guard import error_body

log = logging.getLogger(__name__)

_BODY = error_body("the request headers did not arrive in time")
_RESPONSE_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"x-content-type-options: nosniff\r\ncontent-length: " + str(len(_BODY)).encode()
    + b"\r\n\r\n" + _BODY
)  # fmt: skip


class HeaderDeadlineProtocol(H11Protocol):
    """:class:`uvicorn.protocols.http.h11_impl.H11Protocol` plus a request-header deadline."""

    header_timeout_s: float = 10.0
    """Seconds a request may take to deliver its headers (set by :func:`protocol_class`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte is a request that never arrives

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of a next request on a kept-alive connection
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the headers are in: the request runs

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            # answered before the body was read: the connection cannot carry another request
            self.transport.close()
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm()  # part of a pipelined next request arrived with this one

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse (or headers over its size limit), as
        JSON like every other error instead of plain text."""
        body = error_body(f"invalid HTTP request: {msg}")
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"x-content-type-options", b"nosniff")]  # fmt: skip
        event = h11.Response(status_code=400, headers=headers, reason=b"Bad Request")
        self.transport.write(self.conn.send(event) or b"")
        self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
        self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        self.transport.close()

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        # h11 cannot send a response before it has parsed a request: write it raw, then close.
        who = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info("%s: no complete request headers in %g s: 408, closed", who, self.header_timeout_s)
        self.transport.write(_RESPONSE_408)
        self.transport.close()


def protocol_class(header_timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """A :class:`HeaderDeadlineProtocol` subclass with this deadline (uvicorn's ``http=``)."""
    if not header_timeout_s > 0:
        raise ValueError(f"the header timeout must be > 0 seconds, got {header_timeout_s}")
    return type(
        "HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": header_timeout_s}
    )


__all__ = ["HeaderDeadlineProtocol", "protocol_class"]
