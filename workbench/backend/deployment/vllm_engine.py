"""vLLM as a deployment's generation engine: token ids in, `replica` events out, over vLLM's `AsyncLLM`.

    engine = VllmEngine(model_dir, options=VllmOptions.from_env(), max_context=2048).start()   # blocks
    handle = engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=8), time.perf_counter()), sink)
    engine.cancel(handle)                          # vLLM aborts the request; its FinalEvent still comes
    engine.call(engine.llm.reset_prefix_cache())   # any AsyncLLM call, from any thread
    engine.load(); engine.stop()

Runs inside vLLM's own Python environment (scripts/install_vllm.sh), in the replica process. vLLM is not
forked or patched: `AsyncLLM` runs the engine core in its own process; this module owns one asyncio
loop in a thread ("vllm-loop") where AsyncLLM is built and every call to it runs, so AsyncLLM's
sockets and output handler live on a loop that nothing else blocks; each request's events go to its
sink (`sink.on_events`, replica.GenerationSink) from that thread, one call per vLLM output.

Sampling maps one-to-one onto `vllm.SamplingParams` (one vLLM request per choice, seeded by the wire
layer as for the built-in engine). Stop strings stay with the wire layer (protocol.py cuts the text and
cancels), as for the built-in engine, so both engines agree on where text stops. vLLM reports raw log-probabilities (`logprobs_mode="raw_logprobs"`, the model's
log-softmax before temperature/top-k/top-p, which is what the built-in engine calls `logprob`);
`sampling_logprob` is given where it is known exactly: equal to the raw value when the sampling
distribution is the model's own (temperature 1, no top-k/top-p), 0.0 for greedy decoding, else null
(the SDK then knows it is missing instead of getting a wrong number).

Timings come from vLLM's own per-request stats (`RequestOutput.metrics`, engine-core monotonic clock,
the same CLOCK_MONOTONIC as `time.perf_counter` on Linux): `prefill-queue-duration` is vLLM's
scheduler queue time (queued -> first scheduled), the signal AdaptiveConcurrencyController reads;
`cached-prompt-tokens` is vLLM's prefix-cache hit count.

Weight pushes: `collective_rpc` into the worker extension `vllm_worker.WeightPushExtension`, wrapped in
`pause_generation(mode="keep")` / `resume_generation()` so no forward step ever runs on half-loaded
weights; requests in flight keep their KV cache and continue on the new weights (the built-in engine's
ASYNC transition). LoRA: every new request is submitted with `lora_request`, the adapter the weight
pusher made current (vllm_replica.py); while it switches adapters (`switching`), new requests wait.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .replica import FinalEvent, GenerationRequest, TokenEvent, TokenInfo

WORKER_EXTENSION = "workbench.backend.deployment.vllm_worker.WeightPushExtension"


def on_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


@dataclass
class VllmOptions:
    """Engine arguments workbench sets; everything else is vLLM's default."""

    dtype: str = "auto"
    """Compute dtype. "auto": bfloat16 on CUDA; float32 on CPU, where bf16 matmuls are slow on most
    cores and fp32 computes exactly on the bf16 snapshot weights, as the built-in engine does."""
    max_model_len: int | None = None
    """Context length; None = the model config's (capped at 4096 on CPU to bound the KV cache)."""
    max_num_seqs: int = 64
    """Most sequences in one batch (vLLM's scheduler limit)."""
    kv_cache_bytes: int | None = None
    """CPU only: bytes reserved for the KV cache (vLLM's kv_cache_memory_bytes); None = 256 MiB.
    vLLM's CPU default reserves a fraction of all RAM, which a shared machine may not have."""
    enable_prefix_caching: bool = True
    """vLLM's automatic prefix caching (a hot load with reset_prompt_cache clears it)."""
    seed: int = 0
    """Engine seed (requests without a seed draw from it)."""
    enforce_eager: bool = True
    """No torch.compile / CUDA graphs: startup in seconds instead of minutes; the tiny CPU models gain nothing."""
    enable_lora: bool = True
    """vLLM's LoRA support, so the deployment serves a LoRA trainer's adapter snapshots (vllm_lora.py).
    Off: LoRA snapshots are refused (422), and base-weight decoding skips vLLM's LoRA kernels."""
    max_lora_rank: int = 64
    """Largest adapter rank served (vLLM's max_lora_rank: one of 1, 8, 16, 32, 64, 128, 256, 320, 512);
    vLLM reserves its LoRA buffers for this rank."""

    @classmethod
    def from_env(cls) -> "VllmOptions":
        """WORKBENCH_VLLM_DTYPE, WORKBENCH_VLLM_MAX_MODEL_LEN, WORKBENCH_VLLM_MAX_NUM_SEQS,
        WORKBENCH_VLLM_KV_CACHE_BYTES, WORKBENCH_VLLM_PREFIX_CACHING (0/1), WORKBENCH_VLLM_EAGER (0/1),
        WORKBENCH_VLLM_LORA (0/1), WORKBENCH_VLLM_MAX_LORA_RANK."""
        env = os.environ.get
        return cls(
            dtype=env("WORKBENCH_VLLM_DTYPE", "auto"),
            max_model_len=int(env("WORKBENCH_VLLM_MAX_MODEL_LEN")) if env("WORKBENCH_VLLM_MAX_MODEL_LEN") else None,
            max_num_seqs=int(env("WORKBENCH_VLLM_MAX_NUM_SEQS", "64")),
            kv_cache_bytes=int(env("WORKBENCH_VLLM_KV_CACHE_BYTES")) if env("WORKBENCH_VLLM_KV_CACHE_BYTES") else None,
            enable_prefix_caching=env("WORKBENCH_VLLM_PREFIX_CACHING", "1") != "0",
            enforce_eager=env("WORKBENCH_VLLM_EAGER", "1") != "0",
            enable_lora=env("WORKBENCH_VLLM_LORA", "1") != "0",
            max_lora_rank=int(env("WORKBENCH_VLLM_MAX_LORA_RANK", "64")),
        )


class _Request:
    """The engine's handle for one submitted choice."""

    def __init__(self, request: GenerationRequest, sink):
        self.request = request
        self.params = request.params
        self.prompt_ids = list(request.prompt_ids)
        self.sink = sink
        self.task: asyncio.Task | None = None
        self.cancelled = False
        self.echo: list[TokenInfo] = []
        self.output: list[TokenInfo] = []
        self.snapshots: list[str | None] = []
        self.num_concurrent = 0
        self.cached = 0
        self.t_prefill_start = self.t_first_token = self.t_done = None

    def used(self, snapshot: str | None) -> None:
        if not self.snapshots or self.snapshots[-1] != snapshot:
            self.snapshots.append(snapshot)

    def timings(self) -> dict:
        arrival = self.request.arrival
        done = self.t_done or time.perf_counter()

        def d(a, b):
            return max(0.0, b - a) if a is not None and b is not None else 0.0
        return {
            "prefill-queue-duration": d(arrival, self.t_prefill_start),
            "prefill-duration": d(self.t_prefill_start, self.t_first_token),
            "generation-queue-duration": 0.0,
            "server-time-to-first-token": d(arrival, self.t_first_token or done),
            "generation-duration": d(self.t_first_token, done),
            "server-processing-time": d(arrival, done),
            "num-concurrent-requests": self.num_concurrent,
            "prompt-tokens": len(self.prompt_ids),
            "cached-prompt-tokens": self.cached,
        }


class VllmEngine:
    """Generation on vLLM's AsyncLLM for a `replica.Replica` (see vllm_replica.VllmReplica)."""

    def __init__(self, model_dir: Path, options: VllmOptions | None = None, max_context: int | None = None):
        self.model_dir = Path(model_dir)
        self.options = options or VllmOptions.from_env()
        self.max_context = max_context
        self.llm = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.snapshot: str | None = None   # identity of the weights vLLM holds (set by the weight pusher)
        # the adapter every new request runs with (a vllm LoRARequest; None: the dense weights alone)
        self.lora_request = None
        # set (on the loop) while the weight pusher switches adapters: requests arriving meanwhile wait
        # for it, so none is submitted with an adapter that is being retired
        self.switching: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._live: set[_Request] = set()
        self._ids = itertools.count()
        self.requests_done = 0
        self.pushes = 0

    # ---- lifecycle ---------------------------------------------------------------------------------
    def engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs

        o = self.options
        cuda = on_cuda()
        dtype = o.dtype if o.dtype != "auto" else ("bfloat16" if cuda else "float32")
        max_len = o.max_model_len or (min(self.max_context, 4096) if (self.max_context and not cuda)
                                      else self.max_context)
        kw = dict(model=str(self.model_dir), tokenizer=str(self.model_dir), dtype=dtype,
                  max_model_len=max_len, max_num_seqs=o.max_num_seqs, seed=o.seed,
                  enforce_eager=o.enforce_eager, enable_prefix_caching=o.enable_prefix_caching,
                  worker_extension_cls=WORKER_EXTENSION, disable_log_stats=False,
                  logprobs_mode="raw_logprobs")
        if o.enable_lora:
            # one adapter at a time: a LoRA hot load retires the previous one (vllm_replica.py)
            kw.update(enable_lora=True, max_lora_rank=o.max_lora_rank, max_loras=1)
        if not cuda:
            kw["kv_cache_memory_bytes"] = o.kv_cache_bytes or (256 << 20)
        return AsyncEngineArgs(**kw)

    def start(self) -> "VllmEngine":
        """Build AsyncLLM on the engine's own loop thread and run one warm-up request; blocks until
        vLLM serves (or raises). The warm-up matters: vLLM's first forward on a CPU pays one-off
        kernel setup (measured ~100 s on a loaded 2-core machine), which must not land on a client."""
        ready = threading.Event()
        box: dict = {}

        def run():
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self.loop = loop
            try:
                from vllm.v1.engine.async_llm import AsyncLLM
                self.llm = AsyncLLM.from_engine_args(self.engine_args())
                loop.run_until_complete(self._warm_up())
            except BaseException as e:   # reported to start()'s caller
                box["error"] = e
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="vllm-loop", daemon=True)
        self._thread.start()
        ready.wait()
        if "error" in box:
            raise box["error"]
        return self

    async def _warm_up(self) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        async for _ in self.llm.generate(TokensPrompt(prompt_token_ids=[0, 1]),
                                         SamplingParams(max_tokens=2, temperature=0, logprobs=1),
                                         request_id="wb-warmup"):
            pass

    def call(self, coro, timeout: float | None = None):
        """Run a coroutine on the engine loop from any other thread; returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        for r in list(self._live):
            self.cancel(r)
        if self.llm is not None:
            try:
                self.llm.shutdown()
            except Exception:
                traceback.print_exc()
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)

    # ---- generation --------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink) -> _Request:
        r = _Request(request, sink)
        self._live.add(r)
        r.num_concurrent = len(self._live)

        def start():
            if not r.cancelled:
                r.task = self.loop.create_task(self._run(r))
            else:
                self._finish(r, "cancelled", None)
        self.loop.call_soon_threadsafe(start)
        return r

    def cancel(self, r: _Request) -> None:
        if r.cancelled:
            return
        r.cancelled = True

        def stop():
            if r.task is not None and not r.task.done():
                r.task.cancel()   # AsyncLLM.generate aborts the vLLM request on cancellation
        self.loop.call_soon_threadsafe(stop)

    def load(self) -> dict:
        return {"engine": "vllm", "active": len(self._live), "requests_done": self.requests_done,
                "weight_pushes": self.pushes}

    def sampling_params(self, r: _Request):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = r.params
        echo_lp = p.echo_count > 0 and p.logprobs and len(r.prompt_ids) > 1
        return SamplingParams(
            n=1, max_tokens=max(1, p.max_tokens), temperature=p.temperature, top_p=p.top_p,
            top_k=p.top_k if p.top_k > 0 else 0, seed=p.seed, ignore_eos=p.ignore_eos,
            logprobs=p.top_logprobs if p.logprobs else None,
            prompt_logprobs=p.top_logprobs if echo_lp else None,
            detokenize=False, output_kind=RequestOutputKind.DELTA)

    def _sampling_logprob(self, r: _Request, raw: float) -> float | None:
        p = r.params
        if p.temperature == 0:
            return 0.0
        if p.temperature == 1.0 and p.top_p >= 1.0 and p.top_k <= 0:
            return raw
        return None

    async def _run(self, r: _Request) -> None:
        from vllm.inputs import TokensPrompt

        p = r.params
        first = True
        reason, error = None, None
        try:
            while self.switching is not None:
                await self.switching.wait()
            gen = self.llm.generate(TokensPrompt(prompt_token_ids=r.prompt_ids), self.sampling_params(r),
                                    request_id=f"wb-{next(self._ids)}", lora_request=self.lora_request)
            async for out in gen:
                c = out.outputs[0] if out.outputs else None
                if first:
                    r.echo = self._echo_infos(r, out.prompt_logprobs)
                    r.cached = int(out.num_cached_tokens or 0)
                infos = []
                if c is not None and p.max_tokens > 0:
                    room = p.max_tokens - len(r.output)
                    for j, tok in enumerate(c.token_ids[:room]):
                        infos.append(self._token_info(r, tok, c.logprobs[j] if c.logprobs else None))
                    r.output.extend(infos)
                if infos or first:
                    r.used(self.snapshot)
                if out.metrics is not None:
                    self._timings(r, out.metrics)
                if out.finished:
                    reason = _finish_reason(c.finish_reason if c is not None else None)
                    if p.max_tokens <= 0:   # vLLM needs max_tokens >= 1: that extra token was dropped
                        reason = "length"
                if p.stream and (infos or (first and r.echo)):
                    r.sink.on_events([TokenEvent(r, ([*r.echo] if first else []) + infos, first=first,
                                                 snapshot=self.snapshot)])
                first = False
        except asyncio.CancelledError:
            reason = "cancelled"
        except Exception as e:
            traceback.print_exc()
            reason, error = "error", f"{type(e).__name__}: {e}"
        self._finish(r, reason or "error", error)

    def _finish(self, r: _Request, reason: str, error: str | None) -> None:
        self._live.discard(r)
        self.requests_done += 1
        r.t_done = time.perf_counter()
        r.sink.on_events([FinalEvent(r, reason, list(r.output), list(r.echo), r.timings(), list(r.snapshots),
                                     error)])

    def _token_info(self, r: _Request, token: int, lp_entry) -> TokenInfo:
        if lp_entry is None:
            return TokenInfo(token, 0.0, None, [])
        own = lp_entry.get(token)
        raw = float(own.logprob) if own is not None else 0.0
        return TokenInfo(token, raw, self._sampling_logprob(r, raw), _top(lp_entry, r.params.top_logprobs))

    def _echo_infos(self, r: _Request, prompt_logprobs) -> list[TokenInfo]:
        k = r.params.echo_count
        if k <= 0:
            return []
        ids, n = r.prompt_ids, r.params.top_logprobs
        infos = []
        for pos in range(len(ids) - k, len(ids)):
            t = ids[pos]
            entry = prompt_logprobs[pos] if (prompt_logprobs is not None and pos < len(prompt_logprobs)) else None
            if pos == 0 or entry is None or not r.params.logprobs:
                # the first prompt token has no context: 0.0, as the built-in engine reports it (§6.3)
                infos.append(TokenInfo(t, 0.0, None, [(t, 0.0)] if n > 0 else []))
            else:
                own = entry.get(t)
                infos.append(TokenInfo(t, float(own.logprob) if own is not None else 0.0, None, _top(entry, n)))
        return infos

    def _timings(self, r: _Request, m) -> None:
        """vLLM's per-request stats -> our timestamps (engine-core CLOCK_MONOTONIC = time.perf_counter)."""
        if m.scheduled_ts and r.t_prefill_start is None:
            # prefill-queue-duration is vLLM's own scheduler queue time (queued -> first scheduled)
            queue = max(0.0, m.scheduled_ts - m.queued_ts) if m.queued_ts else 0.0
            r.t_prefill_start = r.request.arrival + queue
            r._offset = r.t_prefill_start - m.scheduled_ts
        if m.first_token_ts and r.t_first_token is None and r.t_prefill_start is not None:
            r.t_first_token = m.first_token_ts + r._offset


def _top(entry, n: int) -> list[tuple[int, float]]:
    if n <= 0:
        return []
    ranked = [(tid, float(l.logprob)) for tid, l in entry.items() if l.rank is not None and l.rank <= n]
    return sorted(ranked, key=lambda x: -x[1])[:n]


def _finish_reason(reason: str | None) -> str | None:
    if reason in ("stop", "length"):
        return reason
    if reason == "abort":
        return "cancelled"
    return reason or "stop"
