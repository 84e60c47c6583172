"""Keep-alive HTTP/1.1 relay to the workbench's own processes on loopback: the gateway's hop to a trainer.

    pool = UpstreamPool()
    answered = await pool.relay(port, b"POST", b"/api/v1/forward", headers, body, send)  # ASGI `send`
    if not answered:        # the process could not be reached, nothing was sent: answer 503 yourself
        ...
    await pool.close()

One request at a time per connection, connections kept per port and reused (the trainer keeps them open
75 s; an idle one is reused for at most IDLE_S). TCP_NODELAY is set (asyncio does it for IPPROTO_TCP
sockets), so a small answer is never held back by Nagle. The answer is relayed as it arrives: status and
headers once they are parsed, then the body; one that is complete by then (every trainer call: small JSON
of known length) goes out as a single ASGI message. Reading pauses while more than HIGH_WATER bytes wait
for a slow client.

Why not httpx here: per proxied request httpx builds URL/Headers/Request/Response objects and runs
httpcore's pool under anyio locks, ~1 ms of control-plane CPU per exchange on this machine, for a hop
that only ever talks plain HTTP/1.1 to 127.0.0.1. The parser is httptools (llhttp, the C parser uvicorn
uses); this module only frames the request and moves bytes.
"""

from __future__ import annotations

import asyncio
import collections
import socket

import httptools

IDLE_S = 30.0
"""An idle pooled connection is reused only this long (well under the trainer's 75 s keep-alive), so a
request never races the server closing it."""
CONNECT_TIMEOUT_S = 5.0
MAX_IDLE_PER_PORT = 16
HIGH_WATER = 1 << 20
"""Body bytes buffered for the client before reading from the upstream pauses."""

HOP_BY_HOP = frozenset({b"host", b"content-length", b"connection", b"keep-alive", b"transfer-encoding",
                        b"upgrade", b"proxy-authorization", b"proxy-connection", b"te", b"trailer", b"expect"})
_DROP_ANSWER = HOP_BY_HOP - {b"content-length"} | {b"date", b"server"}   # uvicorn adds its own date/server


class _Connection(asyncio.Protocol):
    """One upstream connection; httptools calls the on_* methods while parsing the answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.error: BaseException | None = None    # set once the connection is unusable
        self.idle_since = 0.0
        self._paused = False
        self._waiter: asyncio.Future | None = None
        self.begin()

    def begin(self) -> None:
        """Ready for the next answer."""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future = self.loop.create_future()
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False

    # -- transport --
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ConnectionError(f"the upstream sent an invalid HTTP answer ({e})"))
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._fail(exc or ConnectionResetError("the upstream closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()   # retrieved here: nobody may be waiting yet
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- parser --
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if not self.head.done():
            self.head.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()   # asked later, llhttp would say False
        self._wake()

    # -- used by the pool --
    @property
    def reusable(self) -> bool:
        return self.error is None and self.complete and self.keep_alive and \
            not self.transport.is_closing()

    async def body_so_far(self) -> bytes:
        """The body bytes received since the last call (waiting for at least one, unless complete)."""
        while not self.chunks and not self.complete:
            if self.error is not None:
                raise ConnectionError(f"the upstream broke off its answer ({self.error})")
            self._waiter = self.loop.create_future()
            await self._waiter
            self._waiter = None
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        return data


class UpstreamPool:
    """Pooled keep-alive connections to 127.0.0.1:<port>; see the module docstring."""

    def __init__(self):
        self._idle: dict[int, list[_Connection]] = {}

    async def _acquire(self, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        idle = self._idle.get(port)
        while idle:
            conn = idle.pop()
            if conn.error is None and not conn.transport.is_closing() and loop.time() - conn.idle_since < IDLE_S:
                conn.begin()
                return conn
            conn.transport.close()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(loop), "127.0.0.1", port), CONNECT_TIMEOUT_S)
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:   # asyncio sets it for TCP already; explicit, because the latency depends on it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _release(self, port: int, conn: _Connection) -> None:
        idle = self._idle.setdefault(port, [])
        if conn.reusable and len(idle) < MAX_IDLE_PER_PORT:
            conn.idle_since = conn.loop.time()
            idle.append(conn)
        else:
            conn.transport.close()
        # Drop ports whose connections all died (a trainer that exited, a restart on a new port).
        for p in [p for p, conns in self._idle.items() if conns and all(c.error for c in conns)]:
            for c in self._idle.pop(p):
                c.transport.close()

    async def request(self, port: int, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes) -> "UpstreamAnswer | None":
        """Send `method target` with `headers` (hop-by-hop ones are dropped) and `body` to the process on
        `port`; its answer once status and headers are in, or None if there is none (the process cannot be
        reached, or broke the connection first). The caller must `close()` the answer."""
        try:
            conn = await self._acquire(port)
        except (OSError, asyncio.TimeoutError):
            return None
        head = [b"%s %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-length: %d\r\n" % (method, target, port, len(body))]
        head += [b"%s: %s\r\n" % (k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        conn.transport.write(b"".join(head) + b"\r\n" + body)
        try:
            status = await conn.head
        except (OSError, ConnectionError):
            self._release(port, conn)
            return None
        except BaseException:
            self._release(port, conn)
            raise
        return UpstreamAnswer(self, port, conn, status)

    async def relay(self, port: int, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                    body: bytes, send) -> bool:
        """`request`, answered through the ASGI `send`. False if there is no answer: nothing was sent, the
        caller answers. An upstream that breaks off mid-answer raises (the client's connection is then
        closed, as any proxy must)."""
        answer = await self.request(port, method, target, headers, body)
        if answer is None:
            return False
        try:
            data = await answer.read_some()
            await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
            # The usual case (every trainer call): the whole small answer is already here, one body message.
            await send({"type": "http.response.body", "body": data, "more_body": not answer.complete})
            while not answer.complete:
                data = await answer.read_some()
                await send({"type": "http.response.body", "body": data, "more_body": not answer.complete})
            return True
        finally:
            answer.close()

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.transport.close()
        self._idle.clear()


class UpstreamAnswer:
    """An answer whose status and headers are in; its body is read with `read_some` / `chunks`."""

    def __init__(self, pool: UpstreamPool, port: int, conn: _Connection, status: int):
        self._pool, self._port, self._conn = pool, port, conn
        self.status = status
        self.headers = [(k, v) for k, v in conn.headers if k not in _DROP_ANSWER]
        self._closed = False

    @property
    def complete(self) -> bool:
        return self._conn.complete

    async def read_some(self) -> bytes:
        """The body bytes received since the last call (waits for some unless the body is complete)."""
        return await self._conn.body_so_far()

    async def chunks(self):
        """The rest of the body as it arrives."""
        while True:
            data = await self.read_some()
            if data:
                yield data
            if self.complete:
                return

    def close(self) -> None:
        """Give the connection back (kept if the answer was read whole, else closed)."""
        if not self._closed:
            self._closed = True
            self._pool._release(self._port, self._conn)
