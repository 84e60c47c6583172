"""The cheapest server that answers the official SDK's trainer calls: canned bodies, no workbench code.

    python bench/canned_trainer.py PORT_FILE FORWARD_RESULT_FILE     # writes its port to PORT_FILE, serves forever

It exists to measure the SDK's own floor: `FiretitanServiceClient(base_url=f"http://127.0.0.1:{port}")`
and a training client on it do what they do against a trainer (create_session, create_model, then per
`forward(...).result()` one POST /api/v1/forward and one POST /api/v1/retrieve_future), and every answer
is a constant (the forward result is the bytes in FORWARD_RESULT_FILE, captured from a real trainer so the
client parses the same body). Whatever a forward costs against this server is client-side cost (the SDK,
its HTTP stack, loopback TCP) that no server can remove. One asyncio Protocol over httptools' parser (the
C parser uvicorn uses), run in its own process so it never competes with the client for the GIL.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import sys
from pathlib import Path

import httptools
import orjson


class CannedTrainer:
    """path + body -> (status, body bytes); the future results wait here until retrieved."""

    def __init__(self, forward_result: bytes):
        self.forward_result = forward_result
        self.pending: dict[str, bytes] = {}
        self.ids = itertools.count()
        self.model_id = "model-canned-0"

    def future(self, result: bytes) -> bytes:
        rid = f"req-canned-{next(self.ids)}"
        self.pending[rid] = result
        return orjson.dumps({"request_id": rid, "model_id": self.model_id})

    def answer(self, path: bytes, body: bytes) -> tuple[int, bytes]:
        if path == b"/api/v1/forward":
            return 200, self.future(self.forward_result)
        if path == b"/api/v1/retrieve_future":
            result = self.pending.pop(orjson.loads(body).get("request_id"), None)
            if result is None:
                return 404, b'{"error": {"code": 5, "message": "unknown request_id", "status": "NOT_FOUND"}}'
            return 200, result
        if path == b"/api/v1/create_model":
            return 200, self.future(orjson.dumps({"type": "create_model", "model_id": self.model_id}))
        if path == b"/api/v1/create_session":
            return 200, b'{"type": "create_session", "session_id": "sess-canned"}'
        if path == b"/api/v1/session_heartbeat":
            return 200, b'{"type": "session_heartbeat"}'
        if path == b"/api/v1/telemetry":
            return 200, b'{"status": "accepted"}'
        if path == b"/api/v1/healthz":
            return 200, b'{"status": "ok"}'
        print(f"canned trainer: no canned answer for {path.decode(errors='replace')}", file=sys.stderr, flush=True)
        return 404, b'{"error": {"code": 5, "message": "no canned answer", "status": "NOT_FOUND"}}'


class _Connection(asyncio.Protocol):
    """One keep-alive connection: httptools calls the on_* methods as it parses each request."""

    def __init__(self, trainer: CannedTrainer):
        self.trainer = trainer
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status, payload = self.trainer.answer(self.url.split(b"?", 1)[0], b"".join(self.body))
        reason = b"OK" if status == 200 else b"Not Found"
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (status, reason, len(payload), payload))


async def serve(port_file: Path, forward_result: bytes) -> None:
    trainer = CannedTrainer(forward_result)
    # proto=IPPROTO_TCP so asyncio sets TCP_NODELAY on accepted sockets (as the workbench servers do).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.get_running_loop().create_server(lambda: _Connection(trainer), sock=sock)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(f"{sock.getsockname()[1]}\n")
    tmp.replace(port_file)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]), Path(sys.argv[2]).read_bytes()))
