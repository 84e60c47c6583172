"""uvicorn's HTTP protocol with each answer's writes joined into one send: one TCP segment per small answer.

    uvicorn.Config(app, http=CoalescingHttpToolsProtocol, ...)

uvicorn writes an answer's status line and headers when the app sends `http.response.start`, and the
body in a second write. With TCP_NODELAY (which every workbench server needs, see the socket setup in
server.py and trainer/__main__.py) those are two segments, so the client usually wakes twice per answer:
once for the head, then again for the body it still waits for. Every SDK training call is two requests
through the gateway, i.e. four such answers (trainer -> control plane -> SDK, twice). Here every write
made during one event-loop step is kept and sent at the end of that step, as one `write`: the head and a
body sent right after it (what every Response and the gateway relay do) leave together, and a streamed
body still goes out chunk by chunk, one loop step later at most.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _CoalescingTransport:
    """A transport whose writes of one loop step become one write to the real transport; all else is
    the real transport's (uvicorn reads flow-control state and extra info from it)."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()   # what was written before close still goes out first
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `_CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))
