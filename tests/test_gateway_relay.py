"""The gateway's relay to trainer processes (control_plane/relay.py) against a scripted upstream, in-process:
connection reuse, what is forwarded and dropped, large chunked answers, and an upstream that cannot answer.
Also the servers' write coalescing (backend/coalesce.py)."""

from __future__ import annotations

import asyncio

import httptools

from workbench.backend.coalesce import _CoalescingTransport
from workbench.backend.control_plane.relay import HIGH_WATER, UpstreamPool


class _Upstream(asyncio.Protocol):
    """One connection of the scripted upstream: records each request, answers with `answer(request)`."""

    def __init__(self, server: "Upstream"):
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        server.connections += 1

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_message_begin(self):
        self.request = {"url": b"", "headers": {}, "body": b""}

    def on_url(self, url):
        self.request["url"] += url

    def on_header(self, name, value):
        self.request["headers"][name.decode().lower()] = value.decode()

    def on_body(self, body):
        self.request["body"] += body

    def on_message_complete(self):
        self.request["method"] = self.parser.get_method()
        self.server.requests.append(self.request)
        answer = self.server.answer(self.request)
        if answer is None:
            self.transport.close()   # the upstream dies before answering
        else:
            self.transport.write(answer)


class Upstream:
    def __init__(self, answer):
        self.answer = answer
        self.requests: list[dict] = []
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.get_running_loop().create_server(lambda: _Upstream(self), "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]


def _collector():
    messages: list[dict] = []

    async def send(message):
        messages.append(message)

    return messages, send


def _small(request) -> bytes:
    body = b'{"ok": "%s"}' % request["url"]
    return (b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\nx-trainer: yes\r\ndate: then\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


def test_relay_reuses_one_connection_and_forwards_what_it_should():
    async def main():
        upstream = Upstream(_small)
        port = await upstream.start()
        pool = UpstreamPool()
        headers = [(b"x-api-key", b"k1"), (b"connection", b"close"), (b"content-type", b"application/json"),
                   (b"host", b"elsewhere:1")]
        for i in range(3):
            messages, send = _collector()
            assert await pool.relay(port, b"POST", b"/api/v1/forward?x=%d" % i, headers, b'{"n": %d}' % i, send)
            start, body = messages
            assert start["status"] == 201
            answer_headers = dict(start["headers"])
            assert answer_headers[b"x-trainer"] == b"yes" and b"date" not in answer_headers
            assert body["body"] == b'{"ok": "/api/v1/forward?x=%d"}' % i and not body.get("more_body")
        assert upstream.connections == 1   # keep-alive: one connection for all three
        for i, request in enumerate(upstream.requests):
            assert request["method"] == b"POST" and request["body"] == b'{"n": %d}' % i
            assert request["headers"]["x-api-key"] == "k1"
            assert request["headers"]["host"] == f"127.0.0.1:{port}"            # hop-by-hop headers replaced,
            assert "connection" not in request["headers"]                         # not forwarded
        await pool.close()
        upstream.server.close()

    asyncio.run(main())


def test_relay_streams_a_large_chunked_answer():
    piece = b"x" * 65536
    n = 3 * HIGH_WATER // len(piece)   # more than the buffer limit, so reading pauses and resumes

    def chunked(_request) -> bytes:
        return (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                + b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(n)) + b"0\r\n\r\n")

    async def main():
        upstream = Upstream(chunked)
        port = await upstream.start()
        pool = UpstreamPool()
        messages, send = _collector()
        assert await pool.relay(port, b"GET", b"/api/v1/big", [], b"", send)
        assert messages[0]["type"] == "http.response.start"
        assert b"transfer-encoding" not in dict(messages[0]["headers"])   # the server re-frames the body
        bodies = messages[1:]
        assert b"".join(m["body"] for m in bodies) == piece * n
        assert all(m["more_body"] for m in bodies[:-1]) and not bodies[-1].get("more_body")
        # The connection is reusable afterwards.
        messages, send = _collector()
        assert await pool.relay(port, b"GET", b"/api/v1/big", [], b"", send)
        assert upstream.connections == 1
        await pool.close()
        upstream.server.close()

    asyncio.run(main())


def test_an_upstream_that_cannot_answer_is_reported_and_not_reused():
    async def main():
        calls = {"n": 0}

        def dies_once(request):
            calls["n"] += 1
            return None if calls["n"] == 1 else _small(request)

        upstream = Upstream(dies_once)
        port = await upstream.start()
        pool = UpstreamPool()
        messages, send = _collector()
        assert not await pool.relay(port, b"POST", b"/api/v1/forward", [], b"{}", send)
        assert messages == []                      # nothing sent: the caller answers 503
        assert await pool.relay(port, b"POST", b"/api/v1/forward", [], b"{}", send)
        assert upstream.connections == 2           # the broken connection was not reused
        upstream.server.close()
        await upstream.server.wait_closed()
        messages, send = _collector()
        await pool.close()
        assert not await pool.relay(port, b"GET", b"/api/v1/healthz", [], b"", send)   # nothing listens
        assert messages == []

    asyncio.run(main())


def test_writes_of_one_loop_step_leave_as_one_write_and_close_flushes_first():
    class Recorder:
        def __init__(self):
            self.writes, self.closed = [], False

        def write(self, data):
            self.writes.append(data)

        def close(self):
            self.closed = True

        def is_closing(self):
            return self.closed

        def get_extra_info(self, name):
            return ("127.0.0.1", 1) if name == "peername" else None

    async def main():
        real = Recorder()
        t = _CoalescingTransport(real, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        t.write(b"ok")
        assert real.writes == []                     # held until the end of this loop step
        await asyncio.sleep(0)
        assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
        t.write(b"last")
        t.close()                                    # what was written before close goes out first
        assert real.writes[-1] == b"last" and real.closed
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)   # everything else is the real transport's
        await asyncio.sleep(0)
        assert len(real.writes) == 2

    asyncio.run(main())
