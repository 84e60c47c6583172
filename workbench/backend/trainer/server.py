"""HTTP surface of a trainer process: the Tinker trainer protocol (wire contract §7) at `/api/v1/*`.

    app = create_app(backend, api_key="...")     # any protocol.TrainerBackend; served by uvicorn (__main__.py)

The control plane reverse-proxies `/training/v1/rlorTrainerJobs/{account}/{job}/api/v1/*` here verbatim.
This module owns HTTP concerns only: authentication, the two-phase futures and their ordering. Request
bodies are validated by `protocol.py` (on the worker thread, so a malformed request is a `user` future
error like any other) and executed by a `protocol.TrainerBackend`, the only thing this module calls.

Futures (§7.3). Every training operation answers `{"request_id", "model_id"}` at once and queues its
work. ONE worker thread runs the queue: operations of one `model_id` run in `seq_id` order (§7.4: the
SDK sends the next operation before the previous finished, and posts parallel chunks out of order, e.g.
5,6,4), so arrivals ahead of a gap wait; if the missing `seq_id` has not arrived within `gap_timeout_s`
the worker proceeds anyway, so a lost request can never deadlock the trainer. A retried
`(model_id, seq_id)` (or a retried unsequenced POST with the same `x-idempotency-key`) gets the
original request_id back instead of running twice. `retrieve_future` long-polls: it holds the request
until the result is ready or `long_poll_s` elapsed, then answers `try_again` (the SDK re-polls at once,
without sleeping, so an instant `try_again` would make it spin). Results are
`{"error": msg, "category": "user"|"server"}` for failures — never an HTTP error, so the client's
request sequence is not poisoned.

HTTP errors always carry a JSON body (a bare empty 400 is read by the SDK as a proxy rejection and
retried 16 times) and 409 is never used (the SDK retries it as "busy").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from workbench.backend.asgi import RouteApp
from workbench.common import IDLE_RELEASE_S, ApiKeyMiddleware, error_body, release_free_memory

from . import protocol
from .protocol import TrainerBackend, TrainerCannotContinue, UserError, describe_failure

try:  # the SDK ships orjson; it is much faster for the large float arrays of forward results
    import orjson

    _dumps, _loads = orjson.dumps, orjson.loads
except ImportError:  # pragma: no cover
    import json

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    _loads = json.loads

log = logging.getLogger("workbench.trainer.server")

_MAX_FUTURES = 20000          # completed futures kept for re-delivery before the oldest are dropped


class JSONBytes(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _dumps(content)


def error_response(status: int, message: str) -> JSONBytes:
    # The gRPC-style error shape the SDK parses (errors.py reads `error.message`).
    return JSONBytes(error_body(status, message), status_code=status)


class BadRequest(Exception):
    """A request the server cannot even queue (not JSON, missing model_id): answered 400 with a body."""


# ---- futures and the ordered worker -----------------------------------------------------------------
@dataclass
class FutureRecord:
    request_id: str
    op: str
    model_id: str | None
    seq_id: int | None
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event
    dedup_key: tuple | None = None
    result: dict | None = None
    done: bool = False
    created: float = field(default_factory=time.monotonic)
    delivered: bool = False


@dataclass
class _Job:
    record: FutureRecord
    fn: Callable[[], dict]
    arrival: float


def _complete(rec: FutureRecord, payload: dict) -> None:
    rec.result = payload
    rec.done = True
    try:
        rec.loop.call_soon_threadsafe(rec.event.set)
    except RuntimeError:  # event loop already closed (shutting down)
        pass


def _server_error(rec: FutureRecord, exc: BaseException) -> dict:
    return {"error": f"{rec.op} failed on the trainer: {describe_failure(exc)}", "category": "server",
            "error_class": type(exc).__name__[:128]}


class OrderedWorker:
    """One thread running queued jobs: per model_id in seq_id order, everything else in arrival order.

    A failing job fails its own future only: `UserError` -> category "user"; any other exception,
    BaseException subclasses included (torch's `CheckpointException` on a full disk is one), ->
    "server", and the worker goes on. Only `TrainerCannotContinue`, `KeyboardInterrupt`/`SystemExit`
    or a bug in the worker itself stop it: then every queued future fails with the reason,
    later submissions fail at once, and `on_fatal(reason)` is called (the process exits non-zero,
    so the control plane marks the job FAILED with that reason) — never a silently dead queue.
    Once the queue has stayed empty `idle_s` after some work, `on_idle` runs once (by default the freed
    heap of the last steps goes back to the OS: an idle trainer does not keep its peak memory).
    """

    def __init__(self, known_model: Callable[[str], bool], gap_timeout_s: float = 3.0,
                 on_fatal: Callable[[str], None] | None = None,
                 on_idle: Callable[[], object] | None = release_free_memory, idle_s: float = IDLE_RELEASE_S):
        self._known_model = known_model
        self._gap = gap_timeout_s
        self._on_fatal = on_fatal
        # Not while requests keep coming: the next step would fault every released page back in.
        self._on_idle = on_idle
        self._idle_s = idle_s
        self._worked_since_idle = False
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._next_seq: dict[str, int] = {}
        self._progress: dict[str, float] = {}
        self._stopping = False
        self.fatal: str | None = None
        self._thread = threading.Thread(target=self._run, name="trainer-worker", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._cond:
            if self.fatal is None:
                self._queue.append(job)
                self._cond.notify()
                return
        _complete(job.record, {"error": f"{job.record.op} not run: {self.fatal}", "category": "server",
                               "error_class": "TrainerCannotContinue"})

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def queue_length(self) -> int:
        with self._cond:
            return len(self._queue)

    def _pick(self, now: float) -> tuple[_Job | None, float | None]:
        """The next runnable job, or (None, seconds until a gap times out)."""
        for job in self._queue:   # arrival order
            rec = job.record
            if rec.seq_id is None or rec.model_id is None or not self._known_model(rec.model_id):
                return job, None   # unsequenced, or bound to fail anyway: no reason to wait
            if rec.seq_id <= self._next_seq.get(rec.model_id, 1):
                return job, None   # the expected one (or a late arrival after a skipped gap)
        wait = None
        by_model: dict[str, list[_Job]] = {}
        for job in self._queue:
            by_model.setdefault(job.record.model_id, []).append(job)
        for model_id, jobs in by_model.items():
            first = min(jobs, key=lambda j: j.record.seq_id)
            blocked_since = max(self._progress.get(model_id, 0.0), min(j.arrival for j in jobs))
            deadline = blocked_since + self._gap
            if now >= deadline:
                log.warning("model %s: seq_id %d never arrived within %.1fs; running seq_id %d", model_id,
                            self._next_seq.get(model_id, 1), self._gap, first.record.seq_id)
                return first, None
            wait = deadline - now if wait is None else min(wait, deadline - now)
        return None, wait

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - whatever stopped the worker, say so and fail fast
            reason = f"trainer worker stopped: {type(e).__name__}: {e}"
            log.critical("%s", reason, exc_info=not isinstance(e, TrainerCannotContinue))
            with self._cond:
                self.fatal = reason
                queued, self._queue = self._queue, []
            for job in queued:
                _complete(job.record, {"error": f"{job.record.op} not run: {reason}", "category": "server",
                                       "error_class": "TrainerCannotContinue"})
            if self._on_fatal is not None:
                self._on_fatal(reason)

    def _loop(self) -> None:
        idle_since: float | None = None   # when the queue last went empty after work
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    job, wait = self._pick(now)
                    if job is not None:
                        self._queue.remove(job)
                        rec = job.record
                        if rec.seq_id is not None and rec.model_id is not None:
                            self._next_seq[rec.model_id] = max(self._next_seq.get(rec.model_id, 1), rec.seq_id + 1)
                            self._progress[rec.model_id] = time.monotonic()
                        break
                    if self._worked_since_idle and self._on_idle is not None and not self._queue:
                        idle_since = now if idle_since is None else idle_since
                        if now - idle_since >= self._idle_s:
                            break   # idle long enough: release outside the lock (job is None)
                        wait = self._idle_s - (now - idle_since) if wait is None else \
                            min(wait, self._idle_s - (now - idle_since))
                    self._cond.wait(timeout=wait)
            idle_since = None
            if job is None:
                self._worked_since_idle = False
                try:
                    self._on_idle()
                except Exception:  # noqa: BLE001 - a failed release costs memory, never the queue
                    log.exception("releasing memory while idle failed")
                continue
            self._worked_since_idle = True
            self._execute(job)

    @staticmethod
    def _execute(job: _Job) -> None:
        rec = job.record
        start = time.monotonic()
        fatal: BaseException | None = None
        try:
            payload = job.fn()
            outcome = "ok"
        except UserError as e:
            payload, outcome = {"error": str(e), "category": "user", "error_class": "UserError"}, "user error"
            log.info("%s %s seq=%s: user error: %s", rec.op, rec.model_id, rec.seq_id, e)
        except (TrainerCannotContinue, KeyboardInterrupt, SystemExit) as e:
            payload, outcome, fatal = _server_error(rec, e), "fatal error", e
        except BaseException as e:  # noqa: BLE001 - one failed operation (torch, disk, ...): its future only
            log.exception("%s %s seq=%s failed", rec.op, rec.model_id, rec.seq_id)
            payload, outcome = _server_error(rec, e), "server error"
        log.info("%s %s seq=%s %s in %.3fs", rec.op, rec.model_id, rec.seq_id, outcome, time.monotonic() - start)
        _complete(rec, payload)
        if fatal is not None:
            raise fatal


class FutureStore:
    """request_id -> FutureRecord, plus the dedup index; only touched from the event loop thread."""

    def __init__(self):
        self.records: OrderedDict[str, FutureRecord] = OrderedDict()
        self.dedup: dict[tuple, str] = {}

    def find(self, key: tuple | None) -> str | None:
        rid = self.dedup.get(key) if key is not None else None
        return rid if rid in self.records else None

    def add(self, record: FutureRecord) -> None:
        self.records[record.request_id] = record
        if record.dedup_key is not None:
            self.dedup[record.dedup_key] = record.request_id
        if len(self.records) > _MAX_FUTURES:
            self._collect()

    def _collect(self) -> None:
        # Drop the oldest finished futures (delivered ones first); pending ones are never dropped.
        target = int(_MAX_FUTURES * 0.75)
        for only_delivered in (True, False):
            for rid in [r for r, rec in self.records.items() if rec.done and (rec.delivered or not only_delivered)]:
                if len(self.records) <= target:
                    return
                rec = self.records.pop(rid)
                if rec.dedup_key is not None:
                    self.dedup.pop(rec.dedup_key, None)


# ---- the app ------------------------------------------------------------------------------------------
def create_app(backend: TrainerBackend, api_key: str | None, *, long_poll_s: float = 20.0,
               gap_timeout_s: float = 3.0, on_fatal: Callable[[str], None] | None = None) -> RouteApp:
    """The trainer's ASGI app over `backend`; `on_fatal(reason)` is called (from the worker thread)
    if the worker cannot continue — the process should then exit non-zero (see __main__)."""
    futures = FutureStore()
    worker = OrderedWorker(backend.has_model, gap_timeout_s, on_fatal)
    sessions: dict[str, dict] = {}
    model_prefix = secrets.token_hex(4)     # model ids of this process: model-<prefix>-<n>
    model_counter = itertools.count()
    state = {"stopping": False}

    def begin_shutdown() -> None:
        """Stop the worker and release held long-polls (they answer try_again), so exit is prompt."""
        state["stopping"] = True
        worker.stop()
        for rec in futures.records.values():
            rec.event.set()

    @contextlib.asynccontextmanager
    async def lifespan(_app: RouteApp):
        yield
        begin_shutdown()

    app = RouteApp(lifespan=lifespan)
    app.state.backend, app.state.worker, app.state.futures = backend, worker, futures
    app.state.begin_shutdown = begin_shutdown   # called by __main__ as soon as SIGTERM arrives

    # -- auth & errors --
    # Either credential may carry the key (the SDK's healthz poll sends both).
    app.add_middleware(ApiKeyMiddleware, api_key=api_key,
                       reject=error_response(401, "missing or invalid API key: send X-Api-Key: <key> or "
                                                  "Authorization: Bearer <key>"))

    async def _bad_request(_request: Request, exc: BadRequest):
        return error_response(400, str(exc))

    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(404, f"no trainer endpoint {request.method} {request.url.path}")
        return error_response(exc.status_code, str(exc.detail))
    app.add_exception_handler(BadRequest, _bad_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    async def _body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = _loads(raw) if raw else {}
        except Exception as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    def _model_id(body: dict) -> str:
        model_id = body.get("model_id")
        if not isinstance(model_id, str) or not model_id:
            raise BadRequest("model_id is required (a string returned by create_model)")
        return model_id

    def _seq_id(body: dict) -> int | None:
        seq = body.get("seq_id")
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
            raise BadRequest(f"seq_id must be a non-negative integer, got {seq!r}")
        return seq

    def _submit(request: Request, op: str, model_id: str | None, seq_id: int | None,
                fn: Callable[[], dict]) -> JSONBytes:
        if seq_id is not None and model_id is not None:
            key: tuple | None = ("seq", model_id, seq_id)
        else:
            idem = request.headers.get("x-idempotency-key")
            key = ("idem", op, idem) if idem else None
        existing = futures.find(key)
        if existing is not None:
            log.info("%s %s seq=%s: duplicate, returning %s", op, model_id, seq_id, existing)
            return JSONBytes({"request_id": existing, "model_id": futures.records[existing].model_id})
        rid = f"req-{secrets.token_hex(8)}"
        record = FutureRecord(rid, op, model_id, seq_id, asyncio.get_running_loop(), asyncio.Event(), key)
        futures.add(record)
        worker.submit(_Job(record, fn, time.monotonic()))
        out = {"request_id": rid}
        if model_id is not None:
            out["model_id"] = model_id
        return JSONBytes(out)

    # -- health, config, sessions, telemetry (synchronous) --
    @app.get("/api/v1/healthz")
    async def healthz(_request: Request):
        return JSONBytes({"status": "ok"})

    @app.post("/api/v1/client/config")
    async def client_config(request: Request):
        await _body(request)
        # proto_* must stay false (true makes every forward_backward raise client-side, §7.2).
        return JSONBytes({"pjwt_auth_enabled": False, "parallel_fwdbwd_chunks": True, "proto_write_fwdbwd": False,
                          "proto_compress_fwdbwd": False, "fwd_via_fwdbwd": False, "use_pyqwest_transport": True})

    @app.post("/api/v1/create_session")
    async def create_session(request: Request):
        body = await _body(request)
        session_id = f"sess-{secrets.token_hex(6)}"
        now = time.time()
        sessions[session_id] = {"created": now, "last_heartbeat": now, "tags": body.get("tags"),
                                "sdk_version": body.get("sdk_version")}
        log.info("create_session %s (sdk %s)", session_id, body.get("sdk_version"))
        return JSONBytes({"type": "create_session", "session_id": session_id})

    @app.post("/api/v1/session_heartbeat")
    async def session_heartbeat(request: Request):
        body = await _body(request)
        session = sessions.get(body.get("session_id"))
        if session is not None:
            session["last_heartbeat"] = time.time()
        return JSONBytes({"type": "session_heartbeat"})

    @app.post("/api/v1/telemetry")
    async def telemetry(request: Request):
        body = await _body(request)
        events = body.get("events")
        log.debug("telemetry: %d events", len(events) if isinstance(events, list) else 0)
        return JSONBytes({"status": "accepted"})   # the SDK requires exactly this (else it retries forever)

    # -- model lifecycle --
    @app.post("/api/v1/create_model")
    async def create_model(request: Request):
        body = await _body(request)
        idem = request.headers.get("x-idempotency-key")
        existing = futures.find(("idem", "create_model", idem)) if idem else None
        if existing is not None:
            return JSONBytes({"request_id": existing, "model_id": futures.records[existing].model_id})
        model_id = f"model-{model_prefix}-{next(model_counter)}"
        return _submit(request, "create_model", model_id, None,
                       lambda: backend.create_model(model_id, protocol.parse_create_model(body)))

    @app.post("/api/v1/unload_model")
    async def unload_model(request: Request):
        body = await _body(request)
        model_id = _model_id(body)
        return _submit(request, "unload_model", model_id, None, lambda: backend.unload_model(model_id))

    @app.post("/api/v1/get_info")
    async def get_info(request: Request):
        body = await _body(request)
        try:
            return JSONBytes(backend.get_info(_model_id(body)))
        except UserError as e:
            return error_response(404, str(e))

    @app.get("/api/v1/get_server_capabilities")
    async def get_server_capabilities(_request: Request):
        return JSONBytes(backend.capabilities())

    @app.get("/api/v1/list_checkpoints")
    async def list_checkpoints(_request: Request):
        names = await asyncio.to_thread(backend.list_checkpoints)
        return JSONBytes({"checkpoints": names})

    # -- sequenced training operations: one entry each, run in seq_id order on the worker. The body is parsed
    # there too, so a bad body is a `user` future error (an HTTP 400 here would make the SDK retry it).
    sequenced: dict[str, Callable[[str, dict], dict]] = {
        "forward": lambda model_id, body: backend.forward(
            model_id, protocol.parse_forward_input(body.get("forward_input"), "forward_input", backend.limits)),
        "forward_backward": lambda model_id, body: backend.forward_backward(
            model_id, protocol.parse_forward_input(body.get("forward_backward_input"), "forward_backward_input",
                                                   backend.limits)),
        "optim_step": lambda model_id, body: backend.optim_step(
            model_id, protocol.parse_adam_step(body.get("adam_params"), body.get("grad_accumulation_normalization"))),
        "save_weights": lambda model_id, body: backend.save_state(model_id, protocol.parse_save_state(body)),
        "load_weights": lambda model_id, body: backend.load_state(model_id, *protocol.parse_load_state(body)),
        "save_weights_for_sampler": lambda model_id, body: backend.save_sampler(
            model_id, protocol.parse_save_sampler(body)),
        "load_adapter": lambda model_id, body: backend.load_adapter(
            model_id, protocol.parse_adapter_path(body.get("adapter_path"))),
    }

    def add_sequenced_route(op: str, handler: Callable[[str, dict], dict]) -> None:
        async def route(request: Request):
            body = await _body(request)
            model_id = _model_id(body)
            return _submit(request, op, model_id, _seq_id(body), lambda: handler(model_id, body))
        route.__name__ = op
        app.post(f"/api/v1/{op}")(route)

    for op, handler in sequenced.items():
        add_sequenced_route(op, handler)

    # -- futures --
    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request):
        body = await _body(request)
        rid = body.get("request_id")
        if not isinstance(rid, str):
            raise BadRequest("request_id is required (a string returned by the operation's POST)")
        record = futures.records.get(rid)
        if record is None:
            return error_response(404, f"unknown request_id {rid!r} (never issued by this trainer process, or "
                                       "expired)")
        if not record.done and not state["stopping"]:
            try:
                await asyncio.wait_for(record.event.wait(), timeout=long_poll_s)
            except asyncio.TimeoutError:
                pass
        if not record.done:
            return JSONBytes({"type": "try_again", "request_id": rid, "queue_state": "active"})
        record.delivered = True
        return JSONBytes(record.result)

    return app
