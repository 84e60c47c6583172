"""HTTP surface of a deployment replica (Starlette, `workbench.backend.asgi`): completions, hot load, health.

    app = create_app(replica, api_key="...")    # any `Replica` (replica.py); served by uvicorn (__main__.py)

Routes (wire contract §5, §6; the control plane proxies to them verbatim):
    POST /inference/v1/completions, POST /v1/completions   JSON, or SSE when "stream": true
    POST /hot_load/v1/models/hot_load                      load a snapshot; answers when it is served
    GET  /hot_load/v1/models/hot_load                      {"replicas": [...]} (always truthful)
    GET  /healthz                                          200 {"status": "ok", "ready": bool, ...}
    GET  /readyz                                           200 once weights are loaded, else 503

The `Replica` protocol is all this module uses: an engine plugs in by implementing it. Every request
must carry the API key (env WORKBENCH_API_KEY) as `X-Api-Key` or `Authorization: Bearer`; otherwise
401 with a JSON error body. Bodies are limited to `max_body_bytes` (413 naming the limit); malformed
JSON, invalid UTF-8, lone surrogates and deep nesting are 400s, so the keep-alive connection survives.

Completions: the body is validated and tokenized off the event loop when it is large (protocol.py;
400 naming the field), one `GenerationRequest` per choice goes to the replica, and a
`ChoiceSink` per choice (detokenize.py) turns the replica's token events into text in the replica's thread
and posts results to the event loop (at most one wake-up per batch of events). So /healthz answers
during any request. Before the weights are loaded the answer is 425, which the SDK's sampler retries
as "deployment not ready". Every completion names the snapshot(s) it was sampled from in
`perf_metrics["snapshot-identity"]` and the `fireworks-snapshot-identity` header (a streamed one's
header is sent with its first token, so it names the snapshot its prompt was read with; the final
perf_metrics names all of them). A client that disconnects mid-stream cancels its choices.

Hot-load POST waits (up to HOTLOAD_WAIT_S) for the load to finish before answering, so the SDK's
first status poll already sees the new identity instead of sleeping 5 s; a load still running then
answers 200 "accepted" and finishes in the background. Failures answer 4xx (507 for a full disk)
with {"error": {"message": ...}} and the GET shows stage "error" for that target. Header
`x-workbench-hotload-drain: true` lets in-flight requests finish on the old weights before the swap.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from workbench.backend.asgi import RouteApp
from workbench.common import ApiKeyMiddleware

from .detokenize import Choice, ChoiceSink, TokenText
from .protocol import (InvalidRequest, _safe, echo_text, logprob_entries, max_token_chars, parse_completion_request,
                       perf_metrics, raw_output, usage)
from .replica import GenerationRequest, HotloadError, HotloadRequest, Replica, snapshot_list
from .sources import ROOT_HEADER, SOURCE_HEADER

HOTLOAD_WAIT_S = 50.0   # below the SDK's 60 s POST timeout
DEFAULT_MAX_BODY_BYTES = 4 << 20
"""Request body limit (env WORKBENCH_MAX_REQUEST_BYTES): a 128k-token prompt as ids is ~1 MB of JSON."""
INLINE_PARSE_BYTES = 16 << 10   # smaller bodies are parsed on the event loop (a thread hop costs more)
_HOTLOAD_FIELDS = {"identity", "reset_prompt_cache", "incremental_snapshot_metadata"}


class BodyError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": _safe(message), "code": status,
                      "type": "invalid_request_error" if status == 400 else "error"}}
    if field:
        body["error"]["param"] = _safe(field)
    return JSONResponse(body, status_code=status, headers=headers)


async def read_json(request: Request, limit: int, pool: ThreadPoolExecutor) -> tuple[object, int]:
    """(the body as JSON, its size): at most `limit` bytes (BodyError 413), decoded off the loop when
    large; BodyError 400 for anything that is not JSON (bad UTF-8, too deeply nested included)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes "
                             "(WORKBENCH_MAX_REQUEST_BYTES)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyError(413, f"request body exceeds the limit of {limit} bytes (WORKBENCH_MAX_REQUEST_BYTES)")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        return None, 0
    try:
        if len(raw) > INLINE_PARSE_BYTES:
            return await asyncio.get_running_loop().run_in_executor(pool, json.loads, raw), len(raw)
        return json.loads(raw), len(raw)
    except RecursionError:
        raise BodyError(400, "request body is nested too deeply") from None
    except ValueError as e:   # JSONDecodeError and UnicodeDecodeError both
        raise BodyError(400, f"request body must be JSON: {e}") from None


class LoopPoster:
    """Posts items from other threads onto one event loop with at most one pending wake-up: a
    replica step that finishes tokens of 64 requests costs one call_soon_threadsafe, not 64."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list = []
        self.scheduled = False

    def post(self, queue: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:   # loop closed (shutting down): nobody is waiting any more
            pass

    def _drain(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for q, item in items:
            q.put_nowait(item)


def create_app(replica: Replica, api_key: str, max_body_bytes: int | None = None) -> RouteApp:
    app = RouteApp()
    app.state.replica = replica
    limit = int(max_body_bytes or os.environ.get("WORKBENCH_MAX_REQUEST_BYTES") or DEFAULT_MAX_BODY_BYTES)
    deployment_name = f"accounts/{replica.account}/deployments/{replica.deployment_id}"
    served = {deployment_name, replica.base_model}
    # separate pools: a slow tokenization never queues a hot load behind it, nor the reverse
    parse_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="parse")
    hotload_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hotload")
    posters: dict[int, LoopPoster] = {}
    token_texts: dict[int, TokenText] = {}
    chars_per_token: dict[int, int] = {}

    def poster() -> LoopPoster:
        loop = asyncio.get_running_loop()
        p = posters.get(id(loop))
        if p is None or p.loop is not loop:
            p = posters[id(loop)] = LoopPoster(loop)
        return p

    def token_chars(tokenizer) -> int:
        if id(tokenizer) not in chars_per_token:
            chars_per_token[id(tokenizer)] = max_token_chars(tokenizer)
        return chars_per_token[id(tokenizer)]

    def token_text(tokenizer) -> TokenText:
        t = token_texts.get(id(tokenizer))
        if t is None or t.tok is not tokenizer:
            t = token_texts[id(tokenizer)] = TokenText(tokenizer)
        return t

    app.add_middleware(ApiKeyMiddleware, api_key=api_key,
                       reject=error(401, "missing or invalid API key (send X-Api-Key or Authorization: Bearer)"))

    async def http_error(request: Request, exc: HTTPException):   # unknown path, wrong method: JSON too
        if exc.status_code == 404:
            return error(404, f"no replica endpoint {request.method} {request.url.path}")
        return error(exc.status_code, str(exc.detail), headers=exc.headers)
    app.add_exception_handler(HTTPException, http_error)

    @app.get("/healthz")
    async def healthz(_request: Request):
        return {"status": "ok", "ready": replica.ready, "deployment": deployment_name,
                "current_snapshot_identity": replica.current_identity, "startup_error": replica.startup_error,
                **replica.health()}

    @app.get("/readyz")
    async def readyz(_request: Request):
        if replica.ready:
            return {"ready": True}
        return error(503, replica.startup_error or "weights are still loading")

    # ---- hot load ----------------------------------------------------------------------------------
    def misrouted(request: Request) -> JSONResponse | None:
        # the control plane routes by this header; a different name here means a routing bug
        name = request.headers.get("fireworks-deployment")
        if name and name.split("/")[-1] != replica.deployment_id:
            return error(400, f"this replica serves {deployment_name}, not {name}")
        return None

    @app.get("/hot_load/v1/models/hot_load")
    async def hotload_status(request: Request):
        return misrouted(request) or replica.status()

    @app.post("/hot_load/v1/models/hot_load")
    async def hotload(request: Request):
        if (bad := misrouted(request)) is not None:
            return bad
        try:
            body, _ = await read_json(request, limit, parse_pool)
        except BodyError as e:
            return error(e.status, e.message)
        if not isinstance(body, dict):
            return error(400, "hot-load body must be a JSON object")
        extra = sorted(set(body) - _HOTLOAD_FIELDS)
        if extra:
            # pydantic's wording, which the SDK matches for its reset_prompt_cache fallback (§5.1)
            return error(400, f"{extra[0]}: Extra inputs are not permitted", field=extra[0])
        reset = body.get("reset_prompt_cache", False)
        if not isinstance(reset, bool):
            return error(400, "reset_prompt_cache must be a boolean", field="reset_prompt_cache")
        drain_header = (request.headers.get("x-workbench-hotload-drain") or "").strip().lower()
        if drain_header not in ("", "true", "false", "1", "0"):
            return error(400, "header x-workbench-hotload-drain must be true or false",
                         field="x-workbench-hotload-drain")
        req = HotloadRequest(identity=body.get("identity"), metadata=body.get("incremental_snapshot_metadata"),
                             snapshot_root=request.headers.get(ROOT_HEADER),
                             source_url=request.headers.get(SOURCE_HEADER), reset_prompt_cache=reset,
                             drain=None if not drain_header else drain_header in ("true", "1"))
        fut = asyncio.get_running_loop().run_in_executor(hotload_pool, replica.hotload, req)
        try:
            result = await asyncio.wait_for(asyncio.shield(fut), HOTLOAD_WAIT_S)
        except asyncio.TimeoutError:
            return {"status": "accepted", "identity": body.get("identity"),
                    "message": "still loading; poll GET /hot_load/v1/models/hot_load"}
        except HotloadError as e:
            return error(e.status, e.message, field=e.field)
        return {**result, "replicas": replica.status()["replicas"]}

    # ---- completions -------------------------------------------------------------------------------
    @app.post("/inference/v1/completions")
    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.perf_counter()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            body, size = await read_json(request, limit, parse_pool)
        except BodyError as e:
            return error(e.status, e.message)
        info = replica.model_info() if replica.ready else None
        if info is None:
            if replica.startup_error:
                return error(503, f"replica failed to start: {replica.startup_error}")
            return error(425, "deployment weights are still loading; retry", headers={"Retry-After": "1"})
        t_tok = time.perf_counter()
        try:
            args = (body, info.tokenizer, info.vocab_size, info.max_context, served,
                    info.max_context * token_chars(info.tokenizer))
            if size > INLINE_PARSE_BYTES:     # tokenizing (and checking a long id list) is CPU work
                req = await asyncio.get_running_loop().run_in_executor(parse_pool, parse_completion_request, *args)
            else:
                req = parse_completion_request(*args)
        except InvalidRequest as e:
            return error(400, e.message, field=e.field)
        tokenize_s = time.perf_counter() - t_tok if req.prompt_was_text else 0.0
        tok = info.tokenizer
        texts = token_text(tok)

        queue: asyncio.Queue = asyncio.Queue()
        post = poster()
        choices = []
        for i in range(req.n):
            params = req.params
            if req.n > 1 and params.seed is not None:   # n choices with one seed must still differ
                params = replace(params, seed=params.seed + i * 1_000_003)
            choices.append(Choice(i, req.prompt_ids, params, tok))
        try:
            for c in choices:
                sink = ChoiceSink(replica, c, tok, lambda item: post.post(queue, item), stream_text=req.stream)
                sink.bind(replica.submit(GenerationRequest(req.prompt_ids, c.params, arrival), sink))
        except RuntimeError as e:      # the replica is stopping
            for c in choices:
                if c.handle is not None:
                    replica.cancel(c.handle)
            return error(503, f"replica is not accepting requests: {e}")

        def cancel_unfinished():
            for c in choices:
                if not c.done and c.handle is not None:
                    replica.cancel(c.handle)

        cmpl_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        headers = {"x-request-id": request_id, "fireworks-deployment": deployment_name,
                   "fireworks-backend-host": f"{replica.deployment_id}-0",
                   "fireworks-prompt-tokens": str(len(req.prompt_ids)),
                   "fireworks-cached-prompt-tokens": "0"}

        def choice_final(c: Choice) -> dict:
            out = {"index": c.index, "text": echo_text(c, tok) + c.text, "finish_reason": c.finish_reason}
            out["logprobs"] = ({"content": logprob_entries(c.echo + c.output, texts)}
                               if c.params.logprobs else None)
            if req.raw_output:
                out["raw_output"] = raw_output(c)
            return out

        if not req.stream:
            try:
                remaining = req.n
                while remaining:
                    kind, c, *_ = await queue.get()
                    if kind == "final":
                        remaining -= 1
                        if c.error:
                            return error(500, f"generation failed: {c.error}")
            finally:
                cancel_unfinished()
            metrics = perf_metrics(choices, tokenize_s)
            out = {"id": cmpl_id, "object": "text_completion", "created": created, "model": req.model,
                   "choices": [choice_final(c) for c in choices], "usage": usage(choices)}
            if req.perf_metrics:
                out["perf_metrics"] = metrics
            headers.update({f"fireworks-{k}": v for k, v in metrics.items()})
            return JSONResponse(out, headers=headers)

        def chunk(choices_, **extra):
            return "data: " + json.dumps({"id": cmpl_id, "object": "text_completion", "created": created,
                                          "model": req.model, "choices": choices_, **extra}) + "\n\n"

        # the first event fixes the snapshot the prompt was read with: send the headers with it
        try:
            first = await queue.get()
        except BaseException:
            cancel_unfinished()
            raise
        if first[0] == "final" and first[1].error and req.n == 1:
            return error(500, f"generation failed: {first[1].error}")
        headers["fireworks-snapshot-identity"] = snapshot_list(first[1].snapshots) or "base"

        async def sse():
            remaining = req.n
            item = first
            try:
                while True:
                    kind, c = item[0], item[1]
                    if kind == "chunk":
                        _, _, tokens, delta, is_first = item
                        ch = {"index": c.index, "text": delta, "finish_reason": None}
                        if is_first and c.params.echo_count:
                            ch["text"] = echo_text(c, tok) + ch["text"]
                        if c.params.logprobs:
                            ch["logprobs"] = {"content": logprob_entries(tokens, texts)}
                        yield chunk([ch])
                    else:
                        remaining -= 1
                        if c.error:
                            # no raw_output/finish_reason and no [DONE]: the SDK treats it as a truncated
                            # stream and retries (§6.3)
                            yield f": generation failed: {_safe(c.error)}\n\n"
                            return
                        ch = {"index": c.index, "text": c.text[c.emitted:], "finish_reason": c.finish_reason}
                        if req.raw_output:
                            ch["raw_output"] = raw_output(c)
                        extra = {}
                        if remaining == 0:
                            extra["usage"] = usage(choices)
                            if req.perf_metrics:
                                extra["perf_metrics"] = perf_metrics(choices, tokenize_s)
                        yield chunk([ch], **extra)
                        if remaining == 0:
                            break
                    item = await queue.get()
                yield "data: [DONE]\n\n"
            finally:
                cancel_unfinished()

        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

    return app
