"""HTTP surface of a deployment replica (FastAPI): completions, hot load, health.

    app = create_app(weight_manager, api_key="...")    # served by uvicorn from __main__.py

Routes (wire contract §5, §6; the control plane proxies to them verbatim):
    POST /inference/v1/completions, POST /v1/completions   JSON, or SSE when "stream": true
    POST /hot_load/v1/models/hot_load                      load a snapshot; answers when it is served
    GET  /hot_load/v1/models/hot_load                      {"replicas": [...]} (always truthful)
    GET  /healthz                                          200 {"status": "ok", "ready": bool, ...}
    GET  /readyz                                           200 once weights are loaded, else 503

Every request must carry the API key (env WORKBENCH_API_KEY) as `X-Api-Key` or
`Authorization: Bearer`; otherwise 401 with a JSON error body.

Completions run on the batching engine (engine.py): the handler validates the body (protocol.py; 400
naming the field), submits one `Sequence` per choice, and awaits events that the engine thread posts
to the event loop (one `call_soon_threadsafe` per engine step for all of that step's events). Before
the weights are loaded it answers 425, which the SDK's sampler retries as "deployment not ready".
A client that disconnects cancels its sequences, so they leave the batch at the next step.

Hot-load POST waits (up to HOTLOAD_WAIT_S) for the load to finish before answering, so the SDK's
first status poll already sees the new identity instead of sleeping 5 s; a load still running then
answers 200 "accepted" and finishes in the background. Failures answer 4xx with
{"error": {"message": ...}} and the GET shows stage "error" for that target (see weights.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import FinalEvent, Sequence, TokenEvent
from .protocol import (InvalidRequest, echo_text, logprob_entries, parse_completion_request, perf_metrics,
                       raw_output, usage)
from .weights import HotloadError, WeightManager

HOTLOAD_WAIT_S = 50.0   # below the SDK's 60 s POST timeout
_HOTLOAD_FIELDS = {"identity", "reset_prompt_cache", "incremental_snapshot_metadata"}


def error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "code": status,
                      "type": "invalid_request_error" if status == 400 else "error"}}
    if field:
        body["error"]["param"] = field
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(wm: WeightManager, api_key: str | None) -> FastAPI:
    app = FastAPI(title="workbench deployment replica", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.wm = wm
    app.state.inflight = 0
    deployment_name = f"accounts/{wm.config.get('account', 'workbench')}/deployments/{wm.deployment_id}"
    served = {deployment_name, wm.base_model}

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key:
            given = request.headers.get("x-api-key") or ""
            bearer = request.headers.get("authorization") or ""
            if bearer.lower().startswith("bearer "):
                bearer = bearer[7:].strip()
            if not (hmac.compare_digest(given.encode(), api_key.encode())
                    or hmac.compare_digest(bearer.encode(), api_key.encode())):
                return error(401, "missing or invalid API key (send X-Api-Key or Authorization: Bearer)")
        return await call_next(request)

    @app.get("/healthz")
    async def healthz():
        load = wm.engine.load() if wm.engine is not None else {}
        return {"status": "ok", "ready": wm.ready, "deployment": deployment_name,
                "current_snapshot_identity": wm.current_identity, "startup_error": wm.startup_error, **load}

    @app.get("/readyz")
    async def readyz():
        if wm.ready:
            return {"ready": True}
        return error(503, wm.startup_error or "weights are still loading")

    # ---- hot load ----------------------------------------------------------------------------------
    def misrouted(request: Request) -> JSONResponse | None:
        # the control plane routes by this header; a different name here means a routing bug
        name = request.headers.get("fireworks-deployment")
        if name and name.split("/")[-1] != wm.deployment_id:
            return error(400, f"this replica serves {deployment_name}, not {name}")
        return None

    @app.get("/hot_load/v1/models/hot_load")
    async def hotload_status(request: Request):
        return misrouted(request) or wm.status()

    @app.post("/hot_load/v1/models/hot_load")
    async def hotload(request: Request):
        if (bad := misrouted(request)) is not None:
            return bad
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            return error(400, "hot-load body must be JSON")
        if not isinstance(body, dict):
            return error(400, "hot-load body must be a JSON object")
        extra = sorted(set(body) - _HOTLOAD_FIELDS)
        if extra:
            # pydantic's wording, which the SDK matches for its reset_prompt_cache fallback (§5.1)
            return error(400, f"{extra[0]}: Extra inputs are not permitted", field=extra[0])
        reset = body.get("reset_prompt_cache", False)
        if not isinstance(reset, bool):
            return error(400, "reset_prompt_cache must be a boolean", field="reset_prompt_cache")
        root = request.headers.get("x-workbench-snapshot-root")
        source = request.headers.get("x-fireworks-hot-load-source-url")
        fut = asyncio.get_running_loop().run_in_executor(
            None, lambda: wm.hotload(body.get("identity"), body.get("incremental_snapshot_metadata"),
                                     snapshot_root=root, source_url=source, reset_prompt_cache=reset))
        try:
            result = await asyncio.wait_for(asyncio.shield(fut), HOTLOAD_WAIT_S)
        except asyncio.TimeoutError:
            return {"status": "accepted", "identity": body.get("identity"),
                    "message": "still loading; poll GET /hot_load/v1/models/hot_load"}
        except HotloadError as e:
            return error(e.status, e.message)
        return {**result, "replicas": wm.status()["replicas"]}

    # ---- completions -------------------------------------------------------------------------------
    @app.post("/inference/v1/completions")
    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.perf_counter()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error(400, "request body must be JSON")
        if not wm.ready:
            if wm.startup_error:
                return error(503, f"replica failed to start: {wm.startup_error}")
            return error(425, "deployment weights are still loading; retry", headers={"Retry-After": "1"})
        t_tok = time.perf_counter()
        try:
            req = parse_completion_request(body, wm.tokenizer, wm.vocab_size, wm.max_context, served)
        except InvalidRequest as e:
            return error(400, e.message, field=e.field)
        tokenize_s = time.perf_counter() - t_tok if req.prompt_was_text else 0.0

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seqs = []
        for i in range(req.n):
            params = req.params
            if req.n > 1 and params.seed is not None:   # n choices with one seed must still differ
                params = replace(params, seed=params.seed + i * 1_000_003)
            s = Sequence(req.prompt_ids, params, arrival=arrival)
            s.index = i
            s.queue = queue
            s.loop = loop
            seqs.append(s)
        for s in seqs:
            wm.engine.submit(s)
        cmpl_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        headers = {"x-request-id": request_id, "fireworks-deployment": deployment_name,
                   "fireworks-backend-host": f"{wm.deployment_id}-0",
                   "fireworks-prompt-tokens": str(len(req.prompt_ids)),
                   "fireworks-cached-prompt-tokens": "0"}
        if wm.current_identity:   # informative: what was served when the request arrived
            headers["fireworks-snapshot-identity"] = wm.current_identity
        token_text = wm.engine.token_text

        def choice_final(s: Sequence) -> dict:
            c = {"index": s.index, "text": echo_text(s, wm.tokenizer) + s.text,
                 "finish_reason": s.finish_reason}
            c["logprobs"] = ({"content": logprob_entries(s.echo + s.output, token_text)}
                             if s.params.logprobs else None)
            if req.raw_output:
                c["raw_output"] = raw_output(s)
            return c

        if not req.stream:
            try:
                remaining = req.n
                while remaining:
                    ev = await queue.get()
                    if isinstance(ev, FinalEvent):
                        remaining -= 1
                        if ev.error:
                            return error(500, f"generation failed: {ev.error}")
            finally:
                for s in seqs:
                    if not s.done.is_set():
                        wm.engine.cancel(s)
            metrics = perf_metrics(seqs, tokenize_s)
            out = {"id": cmpl_id, "object": "text_completion", "created": created, "model": req.model,
                   "choices": [choice_final(s) for s in seqs], "usage": usage(seqs)}
            if req.perf_metrics:
                out["perf_metrics"] = metrics
            headers.update({f"fireworks-{k}": v for k, v in metrics.items()})
            return JSONResponse(out, headers=headers)

        async def sse():
            def chunk(choices, **extra):
                return "data: " + json.dumps({"id": cmpl_id, "object": "text_completion", "created": created,
                                              "model": req.model, "choices": choices, **extra}) + "\n\n"
            remaining = req.n
            finished = []
            try:
                while remaining:
                    ev = await queue.get()
                    s = ev.seq
                    if isinstance(ev, TokenEvent):
                        c = {"index": s.index, "text": ev.text, "finish_reason": None}
                        if ev.first and s.params.echo_count:
                            c["text"] = echo_text(s, wm.tokenizer) + c["text"]
                        if s.params.logprobs:
                            c["logprobs"] = {"content": logprob_entries(ev.tokens, token_text)}
                        yield chunk([c])
                    elif isinstance(ev, FinalEvent):
                        remaining -= 1
                        finished.append(s)
                        if ev.error:
                            # no raw_output/finish_reason and no [DONE]: the SDK treats it as a truncated
                            # stream and retries (§6.3)
                            yield f": generation failed: {ev.error}\n\n"
                            return
                        c = {"index": s.index, "text": s.text[s.emitted:], "finish_reason": s.finish_reason}
                        if req.raw_output:
                            c["raw_output"] = raw_output(s)
                        extra = {}
                        if remaining == 0:
                            extra["usage"] = usage(seqs)
                            if req.perf_metrics:
                                extra["perf_metrics"] = perf_metrics(seqs, tokenize_s)
                        yield chunk([c], **extra)
                yield "data: [DONE]\n\n"
            finally:
                for s in seqs:
                    if not s.done.is_set():
                        wm.engine.cancel(s)

        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

    return app


def make_deliver():
    """The engine's delivery hook: group one step's events by event loop and post each group with a
    single call_soon_threadsafe (one wake-up per step, not one per sequence)."""
    def put_all(items):
        for q, ev in items:
            q.put_nowait(ev)

    def deliver(events):
        groups: dict = {}
        for seq, ev in events:
            loop = getattr(seq, "loop", None)
            if loop is None:
                if seq.callback is not None:
                    seq.callback(ev)
                continue
            groups.setdefault(loop, []).append((seq.queue, ev))
        for loop, items in groups.items():
            try:
                loop.call_soon_threadsafe(put_all, items)
            except RuntimeError:   # loop closed (shutting down): nobody is waiting any more
                pass
    return deliver
