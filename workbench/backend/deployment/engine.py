"""The batching generation engine of a deployment replica: continuous batching over a KV cache.

    engine = Engine(model, tokenizer)              # model: fp32 HF causal LM, eval mode
    engine.start()                                 # the scheduler thread
    seq = Sequence(prompt_ids, SamplingParams(max_tokens=64, temperature=1.0), callback=fn)
    engine.submit(seq)                             # fn(event) is called from the scheduler thread
    engine.swap_model(new_model).wait()            # between two steps; in-flight sequences continue
    engine.stop()

How it works. One scheduler thread owns the model and the cache. Each iteration it (1) applies a pending
weight swap, (2) admits waiting sequences (up to `max_batch` active, `max_prefill_tokens` padded prompt
tokens per iteration) and prefills them together in one left-padded forward, sampling their first token
from the prefill logits, and (3) runs one decode step for every active sequence: a single batched
forward of one token per sequence against the cache. Sequences leave the batch as soon as they finish,
and new ones join at the next iteration, so a request never waits for another to complete.

The KV cache (`KVRunner`) is one preallocated buffer per layer, `[rows, kv_heads, columns, head_dim]`.
All active sequences share the column axis and write their new key/value at the same column each step;
a sequence's prompt is right-aligned to the current column when it is admitted, so a row's valid
history is the columns `[start_row, cur)` and a boolean mask hides everything left of `start_row`.
Rows are kept dense (a finished row is replaced by the last one), so every forward works on plain
slices of the buffers, with no gather. The decoder layers themselves are Hugging Face's own modules
(called one by one with our cache object and mask), so the numerics are those of `transformers`;
only the model-level glue (embedding, rotary positions, mask, final norm, LM head) is ours. That glue
fits the Llama family (Llama, Mistral, Qwen2, Qwen3) without sliding-window layers; any other
architecture falls back to `RecomputeRunner`, which re-runs the whole left-padded batch through the
stock HF forward each step: slow, but correct for every causal LM.

Sampling is vectorised over the batch: raw log-probabilities are the fp32 log-softmax of the logits
(independent of temperature); the sampling distribution applies temperature, then top-k, then top-p,
and the token is drawn by inverse CDF from a per-sequence uniform, so a seeded request samples the
same tokens whatever else shares its batch. `sampling_logprob` is the chosen token's log-probability
under that sampling distribution (0.0 for greedy decoding, where the distribution is a point mass).

Weight swaps (hot loads) hand the engine a fully built model; the scheduler switches to it between two
steps, so no forward ever sees a half-loaded model. Sequences in flight keep their cache (computed
with the previous weights) and continue with the new ones, as a serving engine does on hot load.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# Architectures whose decoder layers take (hidden, attention_mask, position_ids, past_key_values,
# position_embeddings) and whose model-level forward is embed -> layers -> norm -> lm_head.
_KV_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    echo_count: int = 0           # how many trailing prompt tokens to echo (with logprobs if asked)
    stream: bool = False          # emit a TokenEvent per step (else only the final event)


@dataclass
class TokenInfo:
    token_id: int
    logprob: float
    sampling_logprob: float | None
    top: list[tuple[int, float]]  # top-N (token_id, raw logprob), best first


@dataclass
class TokenEvent:
    seq: "Sequence"
    tokens: list[TokenInfo]       # echoed prompt tokens (first event only) and/or the new token
    text: str                     # new completion text that is safe to emit
    first: bool = False           # the sequence's first event (carries the echo)


@dataclass
class FinalEvent:
    seq: "Sequence"
    error: str | None = None


_ids = itertools.count()


class Sequence:
    """One completion being generated. The engine fills in tokens, text and timings."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams,
                 callback: Callable[[Any], None] | None = None, arrival: float | None = None):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.callback = callback
        self.arrival = arrival if arrival is not None else time.perf_counter()
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(int(params.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        self.echo: list[TokenInfo] = []
        self.output: list[TokenInfo] = []
        self.text = ""            # completion text so far (stop strings cut off)
        self.emitted = 0          # characters of `text` already sent in TokenEvents
        self.finish_reason: str | None = None
        self.cancelled = False
        self.done = threading.Event()
        self.error: str | None = None
        self.num_concurrent = 0
        self.t_prefill_start = self.t_prefill_end = self.t_first_token = self.t_done = None
        self._detok: IncrementalDetokenizer | None = None
        # set by the HTTP layer: choice index, and where to post events (see server.make_deliver)
        self.index = 0
        self.queue = None
        self.loop = None

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.output]

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


class IncrementalDetokenizer:
    """Streams text for a growing token list without splitting multi-byte characters (vLLM's scheme:
    decode a short window, emit only what is stable, never a trailing U+FFFD)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is left undecoded (possibly a lone replacement character) at the end."""
        rest = self._decode(self.ids[self.prefix:])
        done = self._decode(self.ids[self.prefix:self.read])
        self.prefix = self.read = len(self.ids)
        return rest[len(done):] if rest.startswith(done) else rest


class _TokenText:
    """token_id -> its text (special tokens included), cached: used for logprob entries."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.tok.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self.cache[token_id] = s
        return s


# ---------------------------------------------------------------------------------------------
# Model runners: own the cache, run prefill / decode forwards, return fp32 logits.
# ---------------------------------------------------------------------------------------------

def kv_runner_supported(model) -> bool:
    cfg = model.config
    if getattr(cfg, "model_type", None) not in _KV_MODEL_TYPES:
        return False
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        return False
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return False
    if getattr(cfg, "model_type", None) == "mistral" and getattr(cfg, "sliding_window", None):
        return False
    inner = getattr(model, "model", None)
    return all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) and \
        hasattr(model, "lm_head")


class _CacheView:
    """Stands in for HF's `past_key_values` inside the decoder layers: `update` writes the step's new
    keys/values into the runner's buffers and returns the window of history the step attends to."""

    def __init__(self, k, v, rows: slice, write: slice, window: slice):
        self.k, self.v, self.rows, self.write, self.window = k, v, rows, write, window

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        kb[self.rows, :, self.write] = key_states
        vb[self.rows, :, self.write] = value_states
        return kb[self.rows, :, self.window], vb[self.rows, :, self.window]


class KVRunner:
    """Dense-row KV cache over HF decoder layers (see the module docstring for the layout)."""

    def __init__(self, model, pad_id: int = 0):
        self.model = model
        self.pad_id = pad_id
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.dtype = next(model.parameters()).dtype
        self.rows_cap = 0
        self.cols_cap = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.n = 0                                   # active rows
        self.cur = 0                                 # next column every row writes
        self.starts: list[int] = []                  # first valid column of each row

    # -- buffer management ----------------------------------------------------------------------
    def _alloc(self, rows: int, cols: int) -> None:
        rows, cols = max(rows, self.rows_cap), max(cols, self.cols_cap)
        if rows == self.rows_cap and cols == self.cols_cap:
            return
        shape = (rows, self.kv_heads, cols, self.head_dim)
        # zeros, not empty: masked columns are multiplied by 0 attention weight, and 0 * NaN garbage
        # would poison a row
        new_k = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        if self.n and self.k:
            c0 = min(self.starts)
            for dst, src in zip(new_k + new_v, self.k + self.v):
                dst[:self.n, :, c0:self.cur] = src[:self.n, :, c0:self.cur]
        self.k, self.v = new_k, new_v
        self.rows_cap, self.cols_cap = rows, cols

    def _shift(self, delta: int) -> None:
        """Move every row's history `delta` columns to the right (delta > 0) or left (< 0)."""
        if delta == 0:
            return
        c0 = min(self.starts) if self.n else self.cur
        if self.n:
            for buf in self.k + self.v:
                buf[:self.n, :, c0 + delta:self.cur + delta] = buf[:self.n, :, c0:self.cur].clone()
        self.starts = [s + delta for s in self.starts]
        self.cur += delta

    def _ensure(self, rows: int, need_left: int, need_right: int) -> None:
        """Room for `rows` rows, `need_left` columns before `cur` and `need_right` from `cur` on."""
        if rows > self.rows_cap:
            self._alloc(max(rows, 2 * self.rows_cap, 8), self.cols_cap)
        if self.n == 0:
            self.starts = []
            self.cur = need_left
        elif need_left > self.cur:
            self._ensure_cols(need_left + need_right)
            self._shift(need_left - self.cur)
        if self.cur + need_right > self.cols_cap:
            c0 = min(self.starts) if self.n else self.cur
            keep_left = max(need_left, self.cur - c0)
            if self.cur - keep_left > 0:                 # reclaim dead columns on the left first
                self._shift(keep_left - self.cur)
            self._ensure_cols(self.cur + need_right)

    def _ensure_cols(self, cols: int) -> None:
        if cols > self.cols_cap:
            self._alloc(self.rows_cap, max(cols, 2 * self.cols_cap, 64))

    # -- forwards -------------------------------------------------------------------------------
    def _layers(self, input_ids, position_ids, mask, cache):
        inner = self.model.model
        h = inner.embed_tokens(input_ids)
        pe = inner.rotary_emb(h, position_ids)
        for layer in inner.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                      use_cache=True, position_embeddings=pe)
            if isinstance(h, tuple):
                h = h[0]
        return inner.norm(h)

    def prefill(self, prompts: list[list[int]], full_logits: list[bool]) -> tuple[torch.Tensor, list]:
        """Append rows for `prompts`; return last-position logits [m, V] and, for rows with
        full_logits[i], the logits of every prompt position [P_i, V] (else None)."""
        m = len(prompts)
        pmax = max(len(p) for p in prompts)
        self._ensure(self.n + m, pmax, 1)
        lens = torch.tensor([len(p) for p in prompts])
        ids = torch.full((m, pmax), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, pmax - len(p):] = torch.tensor(p, dtype=torch.long)
        offs = (pmax - lens)[:, None]
        ar = torch.arange(pmax)
        pos = (ar[None, :] - offs).clamp(min=0)
        valid = ar[None, :] >= offs                                    # [m, pmax]
        causal = ar[None, :, None] >= ar[None, None, :]                # [1, q, k]
        # a pad query attends to itself only, so no attention row is empty (an empty row is NaN)
        mask = (causal & (valid[:, None, :] | torch.eye(pmax, dtype=torch.bool)[None]))[:, None]
        rows = slice(self.n, self.n + m)
        cols = slice(self.cur - pmax, self.cur)
        cache = _CacheView(self.k, self.v, rows, cols, cols)
        with torch.inference_mode():
            h = self._layers(ids, pos, mask, cache)
            last = self.model.lm_head(h[:, -1]).float()
            full = [self.model.lm_head(h[i, pmax - len(p):]).float() if want else None
                    for i, (p, want) in enumerate(zip(prompts, full_logits))]
        self.starts += [self.cur - len(p) for p in prompts]
        self.n += m
        return last, full

    def decode(self, last_tokens: list[int]) -> torch.Tensor:
        """One step for all active rows (in row order); returns logits [n, V]."""
        n = self.n
        assert len(last_tokens) == n
        self._ensure(n, 0, 1)
        c0 = min(self.starts)
        starts = torch.tensor(self.starts)
        ids = torch.tensor(last_tokens, dtype=torch.long)[:, None]
        pos = (self.cur - starts)[:, None]
        cols = torch.arange(c0, self.cur + 1)
        mask = (cols[None, :] >= starts[:, None])[:, None, None, :]  # [n, 1, 1, W]
        cache = _CacheView(self.k, self.v, slice(0, n), slice(self.cur, self.cur + 1),
                           slice(c0, self.cur + 1))
        with torch.inference_mode():
            h = self._layers(ids, pos, mask, cache)
            logits = self.model.lm_head(h[:, -1]).float()
        self.cur += 1
        return logits

    def remove(self, row: int) -> None:
        """Drop a row; the last row moves into its place (callers must mirror that move)."""
        last = self.n - 1
        if row != last:
            c0 = self.starts[last]
            for buf in self.k + self.v:
                buf[row, :, c0:self.cur] = buf[last, :, c0:self.cur]
            self.starts[row] = self.starts[last]
        self.starts.pop()
        self.n -= 1
        if self.n == 0:
            self.cur = 0

    def clear(self) -> None:
        self.n, self.cur, self.starts = 0, 0, []

    def trim(self, keep_bytes: int = 64 << 20) -> None:
        """When idle, give back buffers a burst of long or many sequences grew past `keep_bytes`."""
        if self.n == 0 and self.k and 2 * sum(b.numel() * b.element_size() for b in self.k) > keep_bytes:
            self.k, self.v, self.rows_cap, self.cols_cap = [], [], 0, 0


class RecomputeRunner:
    """Fallback for architectures KVRunner does not know: no cache, every step re-runs the whole
    left-padded batch through the stock HF forward. Same interface as KVRunner."""

    def __init__(self, model, pad_id: int = 0):
        self.model = model
        self.pad_id = pad_id
        self.seqs: list[list[int]] = []

    @property
    def n(self) -> int:
        return len(self.seqs)

    def _run(self, seqs: list[list[int]]) -> torch.Tensor:
        tmax = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), tmax), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(seqs), tmax), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, tmax - len(s):] = torch.tensor(s)
            att[i, tmax - len(s):] = 1
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            return self.model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False).logits.float()

    def prefill(self, prompts, full_logits):
        logits = self._run(prompts)
        tmax = logits.shape[1]
        full = [logits[i, tmax - len(p):] if want else None for i, (p, want) in enumerate(zip(prompts, full_logits))]
        self.seqs += [list(p) for p in prompts]
        return logits[:, -1], full

    def decode(self, last_tokens):
        for s, t in zip(self.seqs, last_tokens):
            s.append(t)
        return self._run(self.seqs)[:, -1]

    def remove(self, row):
        self.seqs[row] = self.seqs[-1]
        self.seqs.pop()

    def clear(self):
        self.seqs = []

    def trim(self, keep_bytes: int = 0):
        pass


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
        top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else V for s in sub])
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
    v, i = torch.topk(raw_row, n)
    return list(zip(i.tolist(), v.tolist()))


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------

class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 64, max_prefill_tokens: int = 8192,
                 eos_token_ids: list[int] | None = None, force_recompute: bool = False,
                 deliver: Callable[[list[tuple[Sequence, Any]]], None] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        pad = getattr(model.config, "pad_token_id", None)
        pad = pad if isinstance(pad, int) else 0
        self.use_kv = kv_runner_supported(model) and not force_recompute
        self.runner = KVRunner(model, pad) if self.use_kv else RecomputeRunner(model, pad)
        self.eos = set(eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer))
        self.token_text = _TokenText(tokenizer)
        self.deliver = deliver or _deliver_direct
        self.rng = torch.Generator().manual_seed(int(time.time_ns() % (2 ** 62)))
        self.cond = threading.Condition()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []          # row order == runner row order
        self._swap: tuple[Any, threading.Event] | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.max_batch_seen = 0
        self.last_step_end = time.perf_counter()

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

    def submit(self, seq: Sequence) -> None:
        with self.cond:
            if self._stop:
                raise RuntimeError("engine stopped")
            self.waiting.append(seq)
            self.cond.notify_all()

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        with self.cond:
            self.cond.notify_all()

    def swap_model(self, model) -> threading.Event:
        """Switch to `model` between two steps; the returned event is set once the switch happened."""
        done = threading.Event()
        with self.cond:
            if self._thread is None or not self._thread.is_alive():
                self._apply_swap(model)
                done.set()
            else:
                self._swap = (model, done)
                self.cond.notify_all()
        return done

    def load(self) -> dict:
        """Counters for /healthz: current load, decode steps run, largest batch seen, runner kind."""
        with self.cond:
            return {"active": len(self.active), "waiting": len(self.waiting), "decode_steps": self.steps,
                    "max_batch_seen": self.max_batch_seen, "kv_cache": self.use_kv}

    # -- scheduler thread ---------------------------------------------------------------------------
    def _apply_swap(self, model) -> None:
        self.model = model
        self.runner.model = model

    def _loop(self) -> None:
        from .weights import set_torch_threads
        set_torch_threads()                    # OpenMP thread counts are per OS thread
        while True:
            with self.cond:
                if not (self._stop or self.waiting or self.active or self._swap):
                    self.runner.trim()
                while not (self._stop or self.waiting or self.active or self._swap):
                    self.cond.wait()
                if self._stop:
                    break
                swap, self._swap = self._swap, None
                admit = self._take_admissions()
            if swap is not None:
                self._apply_swap(swap[0])
                swap[1].set()
            try:
                self._drop_cancelled()
                if admit:
                    self._prefill(admit)
                if self.active:
                    self._decode()
            except Exception as e:  # a bug or OOM must fail the requests, not kill the replica
                traceback.print_exc()
                self._fail_all(f"{type(e).__name__}: {e}")
            self.last_step_end = time.perf_counter()
        self._fail_all("deployment replica shutting down")

    def _take_admissions(self) -> list[Sequence]:
        room = self.max_batch - len(self.active)
        admit: list[Sequence] = []
        pmax = 0
        while self.waiting and len(admit) < room:
            s = self.waiting[0]
            if s.cancelled:
                self.waiting.popleft()
                s.finish_reason = "cancelled"
                s.t_done = time.perf_counter()
                s.done.set()
                continue
            p = max(pmax, len(s.prompt_ids))
            if admit and p * (len(admit) + 1) > self.max_prefill_tokens:
                break
            pmax = p
            admit.append(self.waiting.popleft())
        return admit

    def _drop_cancelled(self) -> None:
        for row in range(len(self.active) - 1, -1, -1):
            s = self.active[row]
            if s.cancelled:
                s.finish_reason = s.finish_reason or "cancelled"
                self._remove_row(row)
                s.t_done = time.perf_counter()
                s.done.set()

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
        events = []
        for s in victims:
            s.error = message
            s.finish_reason = "error"
            s.t_done = time.perf_counter()
            events.append((s, FinalEvent(s, error=message)))
        self._deliver(events)
        for s in victims:
            s.done.set()

    def _deliver(self, events) -> None:
        if events:
            try:
                self.deliver(events)
            except Exception:
                traceback.print_exc()

    def _prefill(self, admit: list[Sequence]) -> None:
        t0 = time.perf_counter()
        concurrent = len(self.active) + len(admit) + len(self.waiting)
        for s in admit:
            s.t_prefill_start = t0
            s.num_concurrent = concurrent
        prompts = [s.prompt_ids for s in admit]
        want_full = [s.params.echo_count > 0 and s.params.logprobs and len(s.prompt_ids) > 1 for s in admit]
        last, full = self.runner.prefill(prompts, want_full)
        t1 = time.perf_counter()
        base_row = len(self.active)
        self.active.extend(admit)
        events = []
        for s, fl in zip(admit, full):
            s.t_prefill_end = t1
            s._detok = IncrementalDetokenizer(self.tokenizer) if (s.params.stream or s.params.stop) else None
            s.echo = self._echo_infos(s, fl)
        self.max_batch_seen = max(self.max_batch_seen, len(self.active))
        # sequences that want no new token (max_tokens=0) finish on their prefill alone
        gen_rows = [i for i, s in enumerate(admit) if s.params.max_tokens > 0]
        finished: list[int] = [base_row + i for i, s in enumerate(admit) if s.params.max_tokens <= 0]
        if gen_rows:
            sub = [admit[i] for i in gen_rows]
            tok, lp, slp, raw = sample_batch(last[gen_rows], sub, self.rng)
            t2 = time.perf_counter()
            for j, (i, s) in enumerate(zip(gen_rows, sub)):
                s.t_first_token = t2
                if self._append(s, int(tok[j]), float(lp[j]), float(slp[j]), raw[j], events, prefill=True):
                    finished.append(base_row + i)
        for i, s in enumerate(admit):
            if s.params.max_tokens <= 0:
                s.finish_reason = "length"
                if s.params.stream and s.echo:
                    events.append((s, TokenEvent(s, list(s.echo), "", first=True)))
        self._finish_rows(finished, events)
        self._deliver(events)

    def _echo_infos(self, s: Sequence, full_logits) -> list[TokenInfo]:
        k = s.params.echo_count
        if k <= 0:
            return []
        p = s.prompt_ids
        infos = []
        want_lp = s.params.logprobs
        lsm = torch.log_softmax(full_logits, dim=-1) if full_logits is not None else None
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
        tok, lp, slp, raw = sample_batch(logits, self.active, self.rng)
        events = []
        finished = []
        toks, lps, slps = tok.tolist(), lp.tolist(), slp.tolist()
        for row, s in enumerate(self.active):
            if self._append(s, toks[row], lps[row], slps[row], raw[row], events):
                finished.append(row)
        self._finish_rows(finished, events)
        self._deliver(events)

    def _append(self, s: Sequence, token: int, lp: float, slp: float, raw_row, events, prefill=False) -> bool:
        """Record a sampled token; emit its event; return True when the sequence is finished."""
        p = s.params
        info = TokenInfo(token, lp, slp, _top(raw_row, p.top_logprobs) if p.logprobs else [])
        s.output.append(info)
        is_eos = token in self.eos and not p.ignore_eos
        if s._detok is not None:
            s.text += s._detok.push(token)
            if p.stop:
                cut = _find_stop(s.text, p.stop, max(0, s.emitted - max(len(x) for x in p.stop)))
                if cut is not None:
                    s.text = s.text[:cut]
                    s.finish_reason = "stop"
        if s.finish_reason is None:
            if is_eos:
                s.finish_reason = "stop"
            elif len(s.output) >= p.max_tokens:
                s.finish_reason = "length"
        if p.stream:
            if s.finish_reason is None:
                hold = max((len(x) for x in p.stop), default=1) - 1
                safe = max(s.emitted, len(s.text) - hold)
            else:
                safe = len(s.text)
            delta = s.text[s.emitted:safe]
            s.emitted = safe
            tokens = ([*s.echo] if prefill else []) + [info]
            events.append((s, TokenEvent(s, tokens, delta, first=prefill)))
        return s.finish_reason is not None

    def _finish_rows(self, rows: list[int], events) -> None:
        now = time.perf_counter()
        for row in sorted(rows, reverse=True):
            s = self.active[row]
            self._remove_row(row)
            if s._detok is None:
                s.text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True,
                                               clean_up_tokenization_spaces=False)
            elif s.finish_reason != "stop" or not s.params.stop:
                s.text += s._detok.flush()
                if s.params.stop:
                    cut = _find_stop(s.text, s.params.stop, 0)
                    if cut is not None:
                        s.text, s.finish_reason = s.text[:cut], "stop"
            s.t_done = now
            events.append((s, FinalEvent(s)))
        # mark done after delivery order is fixed (FinalEvent carries everything)
        for _, ev in events:
            if isinstance(ev, FinalEvent):
                ev.seq.done.set()


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    best = None
    for st in stops:
        i = text.find(st, start)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    e = getattr(model.config, "eos_token_id", None)
    if isinstance(e, int):
        ids.add(e)
    elif isinstance(e, (list, tuple)):
        ids.update(int(x) for x in e)
    t = getattr(tokenizer, "eos_token_id", None)
    if isinstance(t, int):
        ids.add(t)
    gc = getattr(model, "generation_config", None)
    g = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(g, int):
        ids.add(g)
    elif isinstance(g, (list, tuple)):
        ids.update(int(x) for x in g)
    return sorted(ids)


def _deliver_direct(events) -> None:
    for seq, ev in events:
        if seq.callback is not None:
            seq.callback(ev)
