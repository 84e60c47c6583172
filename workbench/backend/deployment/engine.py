"""The built-in batching generation engine: continuous batching over a KV cache, token ids in and out.

    engine = Engine(model, tokenizer)              # model: fp32 causal LM (plain-torch Qwen3 or HF), eval mode
    engine.start()                                 # the scheduler thread
    seq = Sequence([1, 2, 3], SamplingParams(max_tokens=64, temperature=1.0), sink=my_sink)
    engine.submit(seq)                             # my_sink.on_events([...]) runs on the scheduler thread
    seq.done.wait(); seq.token_ids                 # or wait in-process
    engine.swap_model(new_model, "step-3").wait()  # between two steps; in-flight sequences continue
    engine.stop()

How it works. One scheduler thread owns the model and the runner (`runners.py`: the KV cache). Each
iteration it (1) applies a pending weight swap, (2) admits waiting sequences (up to `max_batch`
active, `max_prefill_tokens` padded prompt tokens per iteration) and prefills them together in one
left-padded forward, sampling their first token from the prefill logits, and (3) runs one decode step
for every active sequence: a single batched forward of one token per sequence against the cache.
Sequences leave the batch as soon as they finish, and new ones join at the next iteration, so a
request never waits for another to complete.

The engine knows token ids only: text, detokenization and stop strings belong to the wire layer
(`protocol.py`), which cancels a sequence once its text hits a stop string. Events (`TokenEvent`,
one `FinalEvent` per sequence, also after a cancel) go to each sequence's `sink` once per step.

Sampling is vectorised over the batch: raw log-probabilities are the fp32 log-softmax of the logits
(independent of temperature); the sampling distribution applies temperature, then top-k, then top-p,
and the token is drawn by inverse CDF from a per-sequence uniform, so a seeded request samples the
same tokens whatever else shares its batch. `sampling_logprob` is the chosen token's log-probability
under that sampling distribution (0.0 for greedy decoding, where the distribution is a point mass).
One sequence's failure stays its own: a row whose logits are not finite, or whose sampling raises,
fails alone; a prefill that raises is retried one sequence at a time.

Weight swaps (hot loads) hand the engine a fully built model and its snapshot identity; the
scheduler switches between two steps, so no forward ever sees a half-loaded model. By default
sequences in flight keep their cache (computed with the previous weights) and continue with the new
ones, as a serving engine does on hot load; with `drain=True` the swap waits until the sequences in
flight have finished (no new ones are admitted meanwhile), so none mixes two snapshots. Every
sequence records the snapshot identities it was computed with (`Sequence.snapshots`).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import traceback
from typing import Any

import torch

from workbench.common import IDLE_RELEASE_S, release_free_memory
from workbench.models import qwen3_torch

from .replica import FinalEvent, SamplingParams, TokenEvent, TokenInfo
from .runners import KVRunner, RecomputeRunner, kv_runner_supported
from .threads import set_torch_threads

__all__ = ["Engine", "Sequence", "SamplingParams", "TokenInfo", "TokenEvent", "FinalEvent", "sample_batch"]

_ids = itertools.count()


class Sequence:
    """One choice being generated: the engine's handle for it. Token ids and timings only."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink=None, arrival: float | None = None):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.arrival = arrival if arrival is not None else time.perf_counter()
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(int(params.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        self.echo: list[TokenInfo] = []
        self.output: list[TokenInfo] = []
        self.snapshots: list[str | None] = []   # identities of the weights used, in order
        self.finish_reason: str | None = None
        self.cancelled = False
        self.done = threading.Event()
        self.error: str | None = None
        self.num_concurrent = 0
        self.t_prefill_start = self.t_prefill_end = self.t_first_token = self.t_done = None

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.output]

    def used(self, snapshot: str | None) -> None:
        if not self.snapshots or self.snapshots[-1] != snapshot:
            self.snapshots.append(snapshot)

    def metrics(self) -> dict[str, float | int]:
        """Measured timings, in seconds, for perf_metrics (§6.4)."""
        def d(a, b):
            return max(0.0, b - a) if a is not None and b is not None else 0.0
        done = self.t_done or time.perf_counter()
        return {
            "prefill-queue-duration": d(self.arrival, self.t_prefill_start),
            "prefill-duration": d(self.t_prefill_start, self.t_prefill_end),
            "generation-queue-duration": d(self.t_prefill_end, self.t_first_token),
            "server-time-to-first-token": d(self.arrival, self.t_first_token or self.t_prefill_end or done),
            "generation-duration": d(self.t_first_token, done),
            "server-processing-time": d(self.arrival, done),
            "num-concurrent-requests": self.num_concurrent,
            "prompt-tokens": len(self.prompt_ids),
            "cached-prompt-tokens": 0,
        }

    def final_event(self) -> FinalEvent:
        return FinalEvent(self, self.finish_reason or "error", list(self.output), list(self.echo), self.metrics(),
                          list(self.snapshots), self.error)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

def sample_batch(logits: torch.Tensor, seqs: list[Sequence], rng: torch.Generator):
    """Pick one token per row. Returns (token_ids [B], raw logprobs of them [B], sampling logprobs [B],
    raw log-softmax [B, V])."""
    logits = logits.float()
    raw = torch.log_softmax(logits, dim=-1)
    B, V = logits.shape
    temps = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32)
    greedy = temps <= 0
    chosen = torch.argmax(logits, dim=-1)
    slp = torch.zeros(B, dtype=torch.float32)
    if not bool(greedy.all()):
        idx = (~greedy).nonzero().flatten()
        sub = [seqs[i] for i in idx.tolist()]
        scaled = logits[idx] / temps[idx][:, None]
        # clamped here too (protocol.py already bounds it): a huge top_k must not overflow the tensor
        top_k = torch.tensor([min(s.params.top_k, V) if s.params.top_k > 0 else V for s in sub])
        top_p = torch.tensor([s.params.top_p for s in sub], dtype=torch.float32)
        # one uniform per row: from the sequence's own generator when seeded, so seeded sampling does
        # not depend on what else is in the batch
        u = torch.rand(len(sub), generator=rng)
        for j, s in enumerate(sub):
            if s.generator is not None:
                u[j] = torch.rand((), generator=s.generator)
        if bool((top_k < V).any()) or bool((top_p < 1).any()):
            vals, order = torch.sort(scaled, dim=-1, descending=True)
            ranks = torch.arange(V)[None, :]
            vals = vals.masked_fill(ranks >= top_k[:, None], float("-inf"))
            probs = torch.softmax(vals, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs
            drop = (before >= top_p[:, None]) & (top_p[:, None] < 1)
            drop[:, 0] = False
            vals = vals.masked_fill(drop, float("-inf"))
        else:
            vals, order = scaled, None
        lsm = torch.log_softmax(vals, dim=-1)
        cdf = torch.cumsum(lsm.exp(), dim=-1)
        pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True).clamp(max=V - 1)
        pick_lp = lsm.gather(1, pos).squeeze(1)
        # float edge: never return a token the distribution excludes
        bad = torch.isinf(pick_lp)
        if bool(bad.any()):
            best = torch.argmax(lsm, dim=-1, keepdim=True)
            pos = torch.where(bad[:, None], best, pos)
            pick_lp = lsm.gather(1, pos).squeeze(1)
        tok = order.gather(1, pos).squeeze(1) if order is not None else pos.squeeze(1)
        chosen[idx] = tok
        slp[idx] = pick_lp
    tok_lp = raw.gather(1, chosen[:, None]).squeeze(1)
    return chosen, tok_lp, slp, raw


def _top(raw_row: torch.Tensor, n: int) -> list[tuple[int, float]]:
    if n <= 0:
        return []
    v, i = torch.topk(raw_row, min(n, raw_row.shape[-1]))
    return list(zip(i.tolist(), v.tolist()))


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------

class Engine:
    def __init__(self, model, tokenizer=None, max_batch: int = 64, max_prefill_tokens: int = 8192,
                 eos_token_ids: list[int] | None = None, force_recompute: bool = False,
                 snapshot: str | None = None):
        self.model = model
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        pad = getattr(model.config, "pad_token_id", None)
        pad = pad if isinstance(pad, int) else 0
        self.use_kv = kv_runner_supported(model) and not force_recompute
        if not self.use_kv and isinstance(model, qwen3_torch.Qwen3ForCausalLM):
            raise ValueError("the plain-torch Qwen3 is served with the KV cache only (it takes no padding mask); "
                             "load the model with transformers for force_recompute")
        self.runner = KVRunner(model, pad) if self.use_kv else RecomputeRunner(model, pad)
        self.eos = set(eos_token_ids if eos_token_ids is not None else eos_ids(model, tokenizer))
        self.snapshot = snapshot                  # identity of the weights in use (None: base model)
        self.rng = torch.Generator().manual_seed(int(time.time_ns() % (2 ** 62)))
        self.cond = threading.Condition()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []          # row order == runner row order
        self._swap: dict | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.max_batch_seen = 0
        self.last_step_end = time.perf_counter()
        self.step_started: float | None = None     # perf_counter at the start of the working step under way
        self._pause_watch: float | None = None    # longest step gap while a hot load runs (None: off)

    # -- public API (any thread) ------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        if self._thread:
            self._thread.join(10)

    def submit(self, seq: Sequence) -> Sequence:
        with self.cond:
            if self._stop:
                raise RuntimeError("engine stopped")
            self.waiting.append(seq)
            self.cond.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        with self.cond:
            self.cond.notify_all()

    def swap_model(self, model, snapshot: str | None = None, drain: bool = False) -> threading.Event:
        """Switch to `model` (holding snapshot `snapshot`) between two steps; with `drain`, only once
        the sequences in flight have finished. The returned event is set once the switch happened."""
        done = threading.Event()
        with self.cond:
            if self._thread is None or not self._thread.is_alive():
                self._apply_swap(model, snapshot)
                done.set()
            else:
                self._swap = {"model": model, "snapshot": snapshot, "drain": drain, "done": done,
                              "t": time.perf_counter()}
                self.cond.notify_all()
        return done

    def retract_swap(self, done: threading.Event) -> bool:
        """Withdraw a swap that has not happened yet; False if it already happened (or is not pending)."""
        with self.cond:
            if self._swap is not None and self._swap["done"] is done:
                self._swap = None
                return True
            return False

    def watch_pauses(self) -> None:
        """Start recording the longest gap between two steps that had work (see pauses_seen)."""
        with self.cond:
            self._pause_watch = 0.0

    def pauses_seen(self) -> float:
        """The longest gap (s) between two working steps since watch_pauses(), including the time
        sequences waited for a draining swap; stops watching."""
        with self.cond:
            worst, self._pause_watch = self._pause_watch or 0.0, None
        return worst

    def wait_for_step_window(self, window_s: float, timeout_s: float) -> None:
        """Return at once unless a working step has been running for more than `window_s`; then wait
        until that step ends (at most `timeout_s`). A hot-load
        thread calls it between slices of its work: it then computes only in the first `window_s` of
        each decode step, and a step it competes with for a core is lengthened by about that much at
        most, whatever the load's size (see weights.py, _StepWindowPacer)."""
        deadline = time.perf_counter() + timeout_s
        with self.cond:
            while True:
                started, now = self.step_started, time.perf_counter()
                if started is None or now - started <= window_s or now >= deadline:
                    return
                self.cond.wait(deadline - now)

    def load(self) -> dict:
        """Counters for /healthz: current load, decode steps run, largest batch seen, runner kind, and
        which model code computes ("workbench.models.qwen3_torch" or the model's transformers module)."""
        with self.cond:
            return {"active": len(self.active), "waiting": len(self.waiting), "decode_steps": self.steps,
                    "max_batch_seen": self.max_batch_seen, "kv_cache": self.use_kv,
                    "model_code": type(self.model).__module__}

    # -- scheduler thread ---------------------------------------------------------------------------
    def _apply_swap(self, model, snapshot) -> None:
        self.model = model
        self.runner.model = model
        self.snapshot = snapshot

    def _loop(self) -> None:
        set_torch_threads()                    # OpenMP thread counts are per OS thread
        had_work = False
        worked = False                         # steps ran since memory was last given back
        while True:
            with self.cond:
                if not (self._stop or self.waiting or self.active or self._swap):
                    self.runner.trim()
                idle_since = time.monotonic()
                while not (self._stop or self.waiting or self.active or self._swap):
                    had_work = False
                    left = IDLE_RELEASE_S - (time.monotonic() - idle_since)
                    if worked and left <= 0:
                        self._release_memory()
                        worked = False
                    self.cond.wait(left if worked else None)
                if self._stop:
                    break
                self.step_started = time.perf_counter()      # a working step (see wait_for_step_window)
                swap = self._swap
                if swap is not None and (not swap["drain"] or not self.active):
                    self._swap = None
                    held = time.perf_counter() - swap["t"] if swap["drain"] and self.waiting else 0.0
                    self._apply_swap(swap["model"], swap["snapshot"])
                    swap["done"].set()
                    if self._pause_watch is not None:
                        self._pause_watch = max(self._pause_watch, held)
                # a draining swap admits nothing new until the batch has emptied
                admit = [] if self._swap is not None and self._swap["drain"] else self._take_admissions()
            try:
                self._drop_cancelled()
                if admit:
                    self._prefill_or_split(admit)
                if self.active:
                    self._decode()
            except Exception as e:  # a bug or OOM must fail the requests, not kill the replica
                traceback.print_exc()
                self._fail_all(f"{type(e).__name__}: {e}")
            now = time.perf_counter()
            with self.cond:
                self.step_started = None
                self.cond.notify_all()                      # a hot-load thread waits for this step's end
                if had_work and self._pause_watch is not None:
                    self._pause_watch = max(self._pause_watch, now - self.last_step_end)
            had_work = bool(self.active or self.waiting)
            worked = True
            self.last_step_end = now
        self._fail_all("deployment replica shutting down")

    def _release_memory(self) -> None:
        """Idle for IDLE_RELEASE_S after work: drop the KV cache and give the C heap's free pages back to
        the OS (glibc keeps what torch frees: the last batch's activations, a retired cache, a hot load's
        temporaries). Once per idle spell, not per step: the next request faults its pages back in."""
        self.runner.trim(keep_bytes=0)
        release_free_memory()

    def _take_admissions(self) -> list[Sequence]:
        room = self.max_batch - len(self.active)
        admit: list[Sequence] = []
        pmax = 0
        while self.waiting and len(admit) < room:
            s = self.waiting[0]
            if s.cancelled:
                self.waiting.popleft()
                self._finish(s, "cancelled")
                continue
            p = max(pmax, len(s.prompt_ids))
            if admit and p * (len(admit) + 1) > self.max_prefill_tokens:
                break
            pmax = p
            admit.append(self.waiting.popleft())
        return admit

    def _finish(self, s: Sequence, reason: str, error: str | None = None, events: list | None = None) -> None:
        """Mark `s` finished and send its FinalEvent (with `events` if given, else now)."""
        s.finish_reason = s.finish_reason or reason
        if error is not None:
            s.finish_reason, s.error = "error", error
        s.t_done = time.perf_counter()
        ev = (s, s.final_event())
        if events is None:
            self._deliver([ev])
            s.done.set()
        else:
            events.append(ev)

    def _drop_cancelled(self) -> None:
        for row in range(len(self.active) - 1, -1, -1):
            s = self.active[row]
            if s.cancelled:
                self._remove_row(row)
                self._finish(s, "cancelled")

    def _remove_row(self, row: int) -> None:
        self.runner.remove(row)
        last = self.active.pop()
        if row < len(self.active):
            self.active[row] = last

    def _fail_all(self, message: str) -> None:
        with self.cond:
            victims = self.active + list(self.waiting)
            self.active, self.waiting = [], collections.deque()
        self.runner.clear()
        events: list = []
        for s in victims:
            self._finish(s, "error", message, events)
        self._deliver(events)

    def _deliver(self, events) -> None:
        """One on_events call per sink per step, in event order; then wake in-process waiters."""
        if not events:
            return
        by_sink: dict[int, tuple[Any, list]] = {}
        for seq, ev in events:
            if seq.sink is not None:
                by_sink.setdefault(id(seq.sink), (seq.sink, []))[1].append(ev)
        for sink, evs in by_sink.values():
            try:
                sink.on_events(evs)
            except Exception:
                traceback.print_exc()
        for seq, ev in events:
            if isinstance(ev, FinalEvent):
                seq.done.set()

    def _prefill_or_split(self, admit: list[Sequence]) -> None:
        try:
            self._prefill(admit)
        except Exception as e:
            if len(admit) == 1:
                traceback.print_exc()
                self._finish(admit[0], "error", f"prefill failed: {type(e).__name__}: {e}")
                return
            for s in admit:                    # find the one that fails; the others go on
                self._prefill_or_split([s])

    def _prefill(self, admit: list[Sequence]) -> None:
        t0 = time.perf_counter()
        concurrent = len(self.active) + len(admit) + len(self.waiting)
        prompts = [s.prompt_ids for s in admit]
        want_full = [s.params.echo_count > 0 and s.params.logprobs and len(s.prompt_ids) > 1 for s in admit]
        last, full = self.runner.prefill(prompts, want_full)
        t1 = time.perf_counter()
        base_row = len(self.active)
        self.active.extend(admit)
        events: list = []
        failed: list[int] = []
        for i, (s, fl) in enumerate(zip(admit, full)):
            s.t_prefill_start, s.t_prefill_end, s.num_concurrent = t0, t1, concurrent
            s.used(self.snapshot)
            try:
                s.echo = self._echo_infos(s, fl)
            except Exception as e:
                s.error = f"{type(e).__name__}: {e}"
                failed.append(base_row + i)
        self.max_batch_seen = max(self.max_batch_seen, len(self.active))
        # sequences that want no new token (max_tokens=0) finish on their prefill alone
        gen = [i for i, s in enumerate(admit) if s.params.max_tokens > 0 and s.error is None]
        finished: list[int] = [base_row + i for i, s in enumerate(admit) if s.params.max_tokens <= 0 and s.error is None]
        if gen:
            self._sample_and_append([admit[i] for i in gen], [base_row + i for i in gen], last[gen],
                                    events, finished, failed, prefill=True)
        for s in admit:
            if s.params.max_tokens <= 0 and s.error is None:
                s.finish_reason = "length"
                if s.params.stream and s.echo:
                    events.append((s, TokenEvent(s, list(s.echo), first=True, snapshot=self.snapshot)))
        self._finish_rows(finished, failed, events)

    def _echo_infos(self, s: Sequence, full_logits) -> list[TokenInfo]:
        k = s.params.echo_count
        if k <= 0:
            return []
        p = s.prompt_ids
        infos = []
        want_lp = s.params.logprobs
        lsm = torch.log_softmax(full_logits, dim=-1) if full_logits is not None else None
        if lsm is not None and not bool(torch.isfinite(lsm).all()):
            raise FloatingPointError("the model produced non-finite logits for this prompt")
        for pos in range(len(p) - k, len(p)):
            t = p[pos]
            if pos == 0 or not want_lp:
                # the first prompt token has no context: a numeric 0.0 keeps the SDK's null rule happy (§6.3)
                infos.append(TokenInfo(t, 0.0, None, [(t, 0.0)] if s.params.top_logprobs > 0 else []))
            else:
                row = lsm[pos - 1]
                infos.append(TokenInfo(t, float(row[t]), None, _top(row, s.params.top_logprobs)))
        return infos

    def _decode(self) -> None:
        last = [s.output[-1].token_id for s in self.active]
        logits = self.runner.decode(last)
        self.steps += 1
        events: list = []
        finished: list[int] = []
        failed: list[int] = []
        self._sample_and_append(self.active, list(range(len(self.active))), logits, events, finished, failed)
        self._finish_rows(finished, failed, events)

    def _sample_and_append(self, seqs, rows, logits, events, finished, failed, prefill=False) -> None:
        """Sample one token for each of `seqs` (at runner `rows`) and record it; rows whose logits are
        not finite or whose sampling raises go to `failed` with their own error, the rest go on."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        ok = [j for j, f in enumerate(finite) if f]
        for j, f in enumerate(finite):
            if not f:
                seqs[j].error = "the model produced non-finite logits (NaN or inf) for this sequence"
                failed.append(rows[j])
        results: dict[int, tuple] = {}
        if ok:
            try:
                tok, lp, slp, raw = sample_batch(logits[ok], [seqs[j] for j in ok], self.rng)
                toks, lps, slps = tok.tolist(), lp.tolist(), slp.tolist()
                for n, j in enumerate(ok):
                    results[j] = (toks[n], lps[n], slps[n], raw[n])
            except Exception:                  # find the row that fails; the others keep their token
                for j in ok:
                    try:
                        tok, lp, slp, raw = sample_batch(logits[j:j + 1], [seqs[j]], self.rng)
                        results[j] = (int(tok[0]), float(lp[0]), float(slp[0]), raw[0])
                    except Exception as e:
                        seqs[j].error = f"sampling failed: {type(e).__name__}: {e}"
                        failed.append(rows[j])
        now = time.perf_counter()
        for j, r in results.items():
            s = seqs[j]
            if prefill:
                s.t_first_token = now
            else:
                s.used(self.snapshot)
            try:
                if self._append(s, *r, events, prefill=prefill):
                    finished.append(rows[j])
            except Exception as e:
                s.error = f"{type(e).__name__}: {e}"
                failed.append(rows[j])

    def _append(self, s: Sequence, token: int, lp: float, slp: float, raw_row, events, prefill=False) -> bool:
        """Record a sampled token; emit its event; return True when the sequence is finished."""
        p = s.params
        info = TokenInfo(token, lp, slp, _top(raw_row, p.top_logprobs) if p.logprobs else [])
        s.output.append(info)
        if token in self.eos and not p.ignore_eos:
            s.finish_reason = "stop"
        elif len(s.output) >= p.max_tokens:
            s.finish_reason = "length"
        if p.stream:
            tokens = ([*s.echo] if prefill else []) + [info]
            events.append((s, TokenEvent(s, tokens, first=prefill, snapshot=self.snapshot)))
        return s.finish_reason is not None

    def _finish_rows(self, rows: list[int], failed: list[int], events) -> None:
        """Remove finished and failed rows (highest first, so row numbers stay valid) and deliver."""
        err = set(failed)
        for row in sorted(set(rows) | err, reverse=True):
            s = self.active[row]
            self._remove_row(row)
            if row in err:
                self._finish(s, "error", s.error or "generation failed", events)
            else:
                self._finish(s, s.finish_reason or "length", None, events)
        self._deliver(events)


def eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    e = getattr(model.config, "eos_token_id", None)
    if isinstance(e, int):
        ids.add(e)
    elif isinstance(e, (list, tuple)):
        ids.update(int(x) for x in e)
    t = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if isinstance(t, int):
        ids.add(t)
    gc = getattr(model, "generation_config", None)
    g = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(g, int):
        ids.add(g)
    elif isinstance(g, (list, tuple)):
        ids.update(int(x) for x in g)
    return sorted(ids)
