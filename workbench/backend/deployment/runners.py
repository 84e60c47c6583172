"""Model runners of the built-in engine: they own the model's cache and turn token ids into logits.

    runner = KVRunner(model, pad_id) if kv_runner_supported(model) else RecomputeRunner(model, pad_id)
    last, full = runner.prefill([[1, 2, 3], [4, 5]], full_logits=[False, True])   # adds rows 0 and 1
    logits = runner.decode([next_a, next_b])                                      # one step, every row
    runner.remove(0)                                                              # row 1 moves to row 0

`Runner` below is the whole interface the scheduler (`engine.py`) uses; both runners implement it.
Rows are dense: row i is the i-th active sequence, and `remove(row)` moves the last row into the hole
(the scheduler mirrors that move in its own list).

The KV cache (`KVRunner`) is one preallocated buffer per layer, `[rows, kv_heads, columns, head_dim]`.
All active sequences share the column axis and write their new key/value at the same column each step;
a sequence's prompt is right-aligned to the current column when it is admitted, so a row's valid
history is the columns `[start_row, cur)` and a boolean mask hides everything left of `start_row`.
Rows are kept dense, so every forward works on plain slices of the buffers, with no gather.

Which model code computes. A plain Qwen3 is served by workbench's own plain-torch Qwen3
(`workbench.models.qwen3_torch`, loaded by `models.load_model(name, plain=True)`): its `Qwen3Model`
takes our positions, mask and cache object directly and computes what transformers' sdpa attention
computes with them, so the replica never imports transformers. For other models the decoder layers
are Hugging Face's own modules (called one by one with our cache object and mask), so the numerics are
those of `transformers`; only the model-level glue (embedding, rotary positions, mask, final norm, LM
head) is ours. That glue fits the Llama family (Llama, Mistral, Qwen2, Qwen3) without sliding-window
layers; any other architecture falls back to `RecomputeRunner`, which re-runs the whole left-padded
batch through the stock HF forward each step: slow, but correct for every causal LM (not for the
plain-torch Qwen3, which takes no padding mask: it always gets the KV cache).
"""

from __future__ import annotations

from typing import Protocol

import torch

from workbench.models import qwen3_torch

# Architectures whose decoder layers take (hidden, attention_mask, position_ids, past_key_values,
# position_embeddings) and whose model-level forward is embed -> layers -> norm -> lm_head.
_KV_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


class Runner(Protocol):
    """What the scheduler needs from a model runner. `model` is swapped in place on hot load (same
    architecture, new weights); rows computed before the swap keep their cache."""

    model: object

    @property
    def n(self) -> int:
        """Active rows."""

    def prefill(self, prompts: list[list[int]], full_logits: list[bool]) -> tuple[torch.Tensor, list]:
        """Append one row per prompt; return the last position's fp32 logits [m, V] and, where
        full_logits[i], the logits of every prompt position [P_i, V] (else None)."""

    def decode(self, last_tokens: list[int]) -> torch.Tensor:
        """Feed one token per active row (row order); return fp32 logits [n, V]. Idempotent on failure:
        a decode that raises leaves the rows as they were, so the step can be retried."""

    def remove(self, row: int) -> None:
        """Drop a row; the last row moves into its place."""

    def clear(self) -> None:
        """Drop every row."""

    def trim(self, keep_bytes: int = 64 << 20) -> None:
        """Called when idle: give back memory grown for a burst (buffers past `keep_bytes`; 0: all)."""


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
    """Dense-row KV cache over a plain-torch Qwen3 or HF decoder layers (the `Runner` protocol; layout and
    model code in the module docstring)."""

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
        if isinstance(inner, qwen3_torch.Qwen3Model):       # takes positions, mask and cache itself
            return inner(input_ids, position_ids=position_ids, attention_mask=mask, cache=cache)
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
    left-padded batch through the stock HF forward (the `Runner` protocol)."""

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
        grown = [s + [t] for s, t in zip(self.seqs, last_tokens)]
        logits = self._run(grown)[:, -1]
        self.seqs = grown              # only once the forward succeeded (decode is retryable)
        return logits

    def remove(self, row):
        self.seqs[row] = self.seqs[-1]
        self.seqs.pop()

    def clear(self):
        self.seqs = []

    def trim(self, keep_bytes: int = 0):
        pass                           # nothing grows between requests


