"""Qwen3 causal LM in plain PyTorch: the trainer's model for full-parameter jobs, without importing transformers.

    from workbench.models import qwen3_torch
    model = qwen3_torch.load(model_dir)            # None if the directory is not a plain Qwen3 this supports
    logits = model(input_ids=ids, use_cache=False).logits
    # serving (workbench/backend/deployment/runners.py): hidden states against a KV cache, with a mask
    hidden = model.model(ids, position_ids=pos, attention_mask=bool_mask, cache=cache)   # cache.update(k, v, i)

Why: importing transformers' Qwen3 code costs a trainer ~117 MiB and seconds of start-up (it pulls in
torch.distributed.checkpoint, torch._dynamo and PIL), for a forward pass of a few dozen lines. This module
computes exactly what `transformers.Qwen3ForCausalLM` (sdpa attention, no padding mask, no KV cache) computes,
op for op in the same order, so logits and gradients are bit-identical (tests/test_qwen3_torch.py checks it
against transformers). Module and parameter names, their registration order and the weight tying are those of
transformers, so `state_dict()` keys, sampler exports and DCP checkpoints are interchangeable with a
transformers model's.

Supported: `model_type` "qwen3" with default RoPE, full attention on every layer, SiLU MLP, and no rope
scaling; anything else returns None and the caller uses transformers. LoRA jobs keep transformers (PEFT
wraps its classes).

Two ways to call it. `Qwen3ForCausalLM.forward` runs whole, unpadded sequences (the trainer's case; a
padding mask is refused). `Qwen3Model.forward` also takes explicit position ids, a boolean attention mask
`[batch, 1, q, k]` (True = attend) and a cache object whose `update(key, value, layer_idx)` stores the
step's keys/values and returns the keys/values to attend to: that is how the deployment's KV-cache runner
serves it. With a mask it computes what transformers' sdpa attention computes when handed the same mask
(keys/values repeated per query head, or, for one query token, the query heads folded onto the key/value
heads), so a deployment serving this module reports the logprobs transformers would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F


def supported_config(config: dict) -> bool:
    """True if `config` (a parsed config.json) is a Qwen3 this module computes exactly."""
    rope = config.get("rope_parameters") or {"rope_type": (config.get("rope_scaling") or {}).get("rope_type",
                                                                                               "default")}
    layer_types = config.get("layer_types") or ["full_attention"] * int(config.get("num_hidden_layers", 0))
    return (config.get("model_type") == "qwen3"
            and (config.get("architectures") or ["Qwen3ForCausalLM"]) == ["Qwen3ForCausalLM"]
            and rope.get("rope_type", "default") == "default" and not config.get("rope_scaling")
            and config.get("hidden_act", "silu") == "silu"
            and not config.get("use_sliding_window", False)
            and all(t == "full_attention" for t in layer_types))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    def __init__(self, c, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False, device=device)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False, device=device)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, kv_heads, t, d] -> [b, kv_heads * n_rep, t, d], each key/value head repeated for its query heads."""
    b, kv_heads, t, d = x.shape
    return x[:, :, None, :, :].expand(b, kv_heads, n_rep, t, d).reshape(b, kv_heads * n_rep, t, d)


class Attention(nn.Module):
    def __init__(self, c, layer_idx: int = 0, device=None):
        super().__init__()
        self.layer_idx = layer_idx           # which of the cache's layers this one reads and writes
        self.head_dim = c.head_dim
        self.num_key_value_groups = c.num_attention_heads // c.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        bias = bool(c.attention_bias)
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * self.head_dim, bias=bias, device=device)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * self.head_dim, bias=bias, device=device)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * self.head_dim, bias=bias, device=device)
        self.o_proj = nn.Linear(c.num_attention_heads * self.head_dim, c.hidden_size, bias=bias, device=device)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps, device)
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        input_shape = x.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(hidden_shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(hidden_shape)).transpose(1, 2)
        v = self.v_proj(x).view(hidden_shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        q_length = q.shape[2]
        groups = self.num_key_value_groups
        if attention_mask is None:
            # As transformers' sdpa path with no mask: grouped-query attention inside sdpa, causal above 1 token.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=self.scaling,
                                                 is_causal=q_length > 1, enable_gqa=groups > 1)
        else:
            # As transformers' sdpa path with a mask: no enable_gqa; one query token has its query heads folded
            # onto the key/value heads (their "pack_gqa"), longer queries get the key/value heads repeated.
            if groups > 1 and q_length == 1:
                q = q.reshape(q.shape[0], q.shape[1] // groups, groups, q.shape[-1])
                if attention_mask.shape[1] != 1:
                    attention_mask = attention_mask.reshape(attention_mask.shape[0], -1, groups,
                                                            attention_mask.shape[-1])
            elif groups > 1:
                k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0,
                                                 scale=self.scaling, is_causal=False)
        out = out.reshape(out.shape[0], -1, q_length, v.shape[-1]).transpose(1, 2).contiguous()
        return self.o_proj(out.reshape(*input_shape, -1).contiguous())


class DecoderLayer(nn.Module):
    def __init__(self, c, layer_idx: int = 0, device=None):
        super().__init__()
        self.self_attn = Attention(c, layer_idx, device)
        self.mlp = MLP(c, device)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, device)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class RotaryEmbedding(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.base, self.dim = float(c.rope_theta), int(c.head_dim)
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * 1.0).to(dtype=x.dtype), (emb.sin() * 1.0).to(dtype=x.dtype)


class Qwen3Model(nn.Module):
    def __init__(self, c, device=None):
        super().__init__()
        # _weight: no random init (on the meta device it would go through torch._refs, importing torch._dynamo).
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id,
                                         _weight=torch.empty(c.vocab_size, c.hidden_size, device=device))
        self.layers = nn.ModuleList(DecoderLayer(c, i, device) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, device)
        self.rotary_emb = RotaryEmbedding(c)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Final-norm hidden states [b, t, hidden]. Without arguments: whole causal sequences at positions
        0..t-1. `position_ids` [b, t]; `attention_mask` boolean, broadcastable to [b, heads, t, keys]
        (True = attend; required once `cache` returns more keys than queries); `cache.update(k, v, layer)`
        stores each layer's new keys/values and returns those to attend to (see the module docstring)."""
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        cos, sin = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, attention_mask, cache)
        return self.norm(x)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor


class Qwen3ForCausalLM(nn.Module):
    """`model(input_ids=ids).logits`, as transformers' class of the same name computes it (no cache, no mask)."""

    def __init__(self, config: SimpleNamespace, device=None):
        """Parameters are created on `device`; "meta" builds the skeleton that `load` fills."""
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config, device)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool | None = None) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("this plain-torch Qwen3 runs unpadded sequences only (attention_mask must be all ones)")
        return CausalLMOutput(logits=self.lm_head(self.model(input_ids)))


def _config(raw: dict) -> SimpleNamespace:
    heads = int(raw["num_attention_heads"])
    rope = raw.get("rope_parameters") or {}
    return SimpleNamespace(**{**raw,
                              "head_dim": int(raw.get("head_dim") or raw["hidden_size"] // heads),
                              "num_key_value_heads": int(raw.get("num_key_value_heads") or heads),
                              "attention_bias": bool(raw.get("attention_bias", False)),
                              "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
                              "rope_theta": float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
                              "pad_token_id": raw.get("pad_token_id"),
                              "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
                              "architectures": raw.get("architectures") or ["Qwen3ForCausalLM"]})


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


def load(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Qwen3ForCausalLM | None:
    """The model in `model_dir` (a Hugging Face directory: config.json + safetensors) as a plain-torch
    Qwen3ForCausalLM in `dtype` on CPU, or None if this module does not support it (other architectures,
    RoPE scaling, sliding windows, weights not in safetensors). Raises if the weights do not fit the config."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    files = _weight_files(model_dir)
    if not isinstance(raw, dict) or not supported_config(raw) or not files:
        return None
    config = _config(raw)
    # Factory kwargs, not a `with torch.device("meta")` block: that mode routes nn.init through torch._refs,
    # which imports torch._dynamo (~0.5 s and tens of MiB) for nothing.
    model = Qwen3ForCausalLM(config, device="meta")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    state = {k: v.to(dtype) for k, v in state.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)   # tied: the embedding is the head
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights do not match the Qwen3 config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight   # assign=True replaced the tied Parameter
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.compute_inv_freq()   # a non-persistent buffer: still on the meta device
    try:    # as transformers' `model.generation_config`: a deployment reads its end-of-sequence ids
        generation = json.loads((model_dir / "generation_config.json").read_text())
        model.generation_config = SimpleNamespace(**generation) if isinstance(generation, dict) else None
    except (OSError, json.JSONDecodeError):
        model.generation_config = None
    return model.eval()
