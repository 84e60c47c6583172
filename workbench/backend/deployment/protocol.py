"""Completions wire format (wire contract §6): request validation and response building.

    req = parse_completion_request(body, tokenizer, vocab_size, max_context, served_models)  # or raises
    entries = logprob_entries(tokens, token_text); metrics = perf_metrics(choices, tokenize_s)

Pure functions, no I/O: `server.py` calls them (parsing off the event loop: it tokenizes), tests can
call them directly. Every rejected request raises `InvalidRequest(field, message)`, which the server
turns into HTTP 400 with a JSON body naming the field (a 400 is not retried by the SDK's sampler, so
bad input fails fast instead of looping). Every number is range-checked here, so no value reaches a
replica that could overflow there. Fields the SDK may send but that workbench does not implement
(images, routing matrices, sampling masks...) are rejected when they ask for something (truthy),
accepted when they are off.

Context length (Fireworks' `context_length_exceeded_behavior`): a prompt longer than the context is
always a 400; a prompt that fits but leaves less room than `max_tokens` has `max_tokens` lowered to
fit by default ("truncate"), or answers 400 when the request says "error".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .detokenize import Choice
from .replica import SamplingParams, TokenInfo, snapshot_list

MAX_N = 128
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16
MAX_INT = 2 ** 31 - 1        # bound of max_tokens, top_k, echo_last (a value above it is a typo or an attack)
CONTEXT_BEHAVIORS = ("truncate", "error")

# accepted and ignored: they change nothing here
_IGNORED = {"prompt_cache_key", "user", "return_token_ids", "session_id", "stream_options"}
# known features workbench does not implement: fine when off, 400 when asked for
_UNSUPPORTED = {"images", "include_routing_matrix", "routing_matrix_format", "top_sampling_logprobs",
                "top_sampling_format", "sampling_mask", "logit_bias", "suffix", "best_of",
                "response_format", "tools", "speculation", "prediction", "mirostat_target", "mirostat_lr"}
_KNOWN = {"model", "prompt", "n", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
          "logprobs", "top_logprobs", "echo", "echo_last", "stream", "raw_output",
          "perf_metrics_in_response", "ignore_eos", "min_p", "frequency_penalty", "presence_penalty",
          "repetition_penalty", "context_length_exceeded_behavior"} | _IGNORED | _UNSUPPORTED


class InvalidRequest(ValueError):
    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass
class CompletionRequest:
    model: str
    prompt_ids: list[int]
    prompt_was_text: bool
    n: int
    params: SamplingParams
    stream: bool
    raw_output: bool
    perf_metrics: bool


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(body, key, default, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    if not _is_int(v):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise InvalidRequest(key, f"{key} must be an integer, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise InvalidRequest(key, f"{key} must be between {lo} and {hi}, got {v}")
    return v


def _num(body, key, default, lo, hi, lo_open=False):
    v = body.get(key, default)
    if v is None:
        return default
    if not _is_num(v):
        raise InvalidRequest(key, f"{key} must be a number, got {v!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise InvalidRequest(key, f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _bool(body, key, default=False):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InvalidRequest(key, f"{key} must be a boolean, got {v!r}")
    return v


def _text(v, key: str) -> str:
    """A JSON string must be valid Unicode: a lone surrogate ("\\udcff") cannot be tokenized or echoed."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(key, f"{key} contains an unpaired surrogate (not valid Unicode text)") from None
    return v


def max_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token covers (its vocabulary spelling is at least as long:
    byte-level BPE spells each byte as one character); 0 if the tokenizer cannot say."""
    try:
        return max((len(k) for k in tokenizer.get_vocab()), default=0)
    except Exception:
        return 0


def parse_completion_request(body, tokenizer, vocab_size: int, max_context: int,
                             served_models: set[str] | None = None, max_prompt_chars: int = 0) -> CompletionRequest:
    """Validate a completions body and tokenize its prompt. `max_prompt_chars` (when > 0): a text
    prompt longer than this cannot fit the context (max_context x max_token_chars) and is refused
    before it is tokenized, so a huge prompt costs nothing."""
    if not isinstance(body, dict):
        raise InvalidRequest(None, "request body must be a JSON object")
    for key in body:
        if key not in _KNOWN:
            raise InvalidRequest(_safe(key), f"unknown field {key!r}: workbench deployments do not support it")
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, False, [], {}, "", 0):
            raise InvalidRequest(key, f"field {key!r} is not supported by workbench deployments")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise InvalidRequest(key, f"{key} is not supported (only 0)")
    if body.get("repetition_penalty") not in (None, 1, 1.0):
        raise InvalidRequest("repetition_penalty", "repetition_penalty is not supported (only 1.0)")
    if body.get("min_p") not in (None, 0, 0.0):
        raise InvalidRequest("min_p", "min_p is not supported (only 0)")

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model", "model is required: accounts/<account>/deployments/<id>")
    _text(model, "model")
    if served_models is not None and model.split("#")[0] not in served_models:
        raise InvalidRequest("model", f"model {model!r} is not served by this replica "
                                      f"(it serves {sorted(served_models)})")

    behavior = body.get("context_length_exceeded_behavior")
    if behavior is None:
        behavior = "truncate"
    if behavior not in CONTEXT_BEHAVIORS:
        raise InvalidRequest("context_length_exceeded_behavior",
                             f"context_length_exceeded_behavior must be one of {list(CONTEXT_BEHAVIORS)}, "
                             f"got {behavior!r}")
    n = _int(body, "n", 1, 1, MAX_N)
    max_tokens = _int(body, "max_tokens", 16, 0, MAX_INT)
    temperature = _num(body, "temperature", 1.0, 0.0, 100.0)
    top_p = _num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", 0, -1, MAX_INT)
    top_k = 0 if top_k < 0 else min(top_k, vocab_size)   # at or above the vocabulary: no cut
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise InvalidRequest("seed", f"seed must be an integer, got {seed!r}")
        if not -2 ** 63 <= seed < 2 ** 64:
            raise InvalidRequest("seed", f"seed must be in [-2**63, 2**64), got {seed}")

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise InvalidRequest("stop", f"stop must be a non-empty string or a list of at most {MAX_STOP} "
                                     "non-empty strings")
    stop = [_text(s, "stop") for s in stop]

    lp = body.get("logprobs")
    top_n = 0
    if lp is None or lp is False:
        want_lp = False
    elif lp is True:
        want_lp = True
    elif _is_int(lp) and 0 <= lp <= MAX_TOP_LOGPROBS:   # legacy completions: logprobs=N means top-N
        want_lp, top_n = True, lp
    else:
        raise InvalidRequest("logprobs", f"logprobs must be a boolean or an integer in [0, {MAX_TOP_LOGPROBS}]")
    tl = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if tl is not None:
        top_n = tl
        want_lp = want_lp or tl > 0
    top_n = min(top_n, vocab_size)

    echo = _bool(body, "echo")
    echo_last = _int(body, "echo_last", None, 0, MAX_INT)
    stream = _bool(body, "stream")
    raw = _bool(body, "raw_output")
    perf = _bool(body, "perf_metrics_in_response")
    ignore_eos = _bool(body, "ignore_eos")

    # the prompt last: everything cheap is checked before the (possibly long) tokenization
    prompt = body.get("prompt")
    was_text = False
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt", "prompt must not be empty")
        if max_prompt_chars and len(prompt) > max_prompt_chars:
            raise InvalidRequest("prompt", f"prompt of {len(prompt)} characters cannot fit the model's context "
                                           f"length {max_context} tokens")
        ids = tokenizer.encode(_text(prompt, "prompt"), add_special_tokens=False)
        was_text = True
    elif isinstance(prompt, list) and len(prompt) > max_context:
        raise InvalidRequest("prompt", f"prompt ({len(prompt)} tokens) exceeds the model's context length "
                                       f"{max_context}")
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if t < 0 or t >= vocab_size]
        if bad:
            raise InvalidRequest("prompt", f"prompt token ids must be in [0, {vocab_size}); got {bad[:5]}")
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (list, str)) for p in prompt):
        raise InvalidRequest("prompt", "batched prompts are not supported: send one request per prompt")
    else:
        raise InvalidRequest("prompt", "prompt must be a non-empty string or a non-empty list of token ids")
    if not ids:
        raise InvalidRequest("prompt", "prompt tokenizes to no tokens")
    if len(ids) > max_context:
        raise InvalidRequest("prompt", f"prompt ({len(ids)} tokens) exceeds the model's context length "
                                       f"{max_context}")
    if len(ids) + max_tokens > max_context:
        if behavior == "error":
            raise InvalidRequest("max_tokens", f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                                               f"the model's context length {max_context} "
                                               "(context_length_exceeded_behavior is 'error')")
        max_tokens = max_context - len(ids)
    echo_count = min(echo_last, len(ids)) if echo_last is not None else (len(ids) if echo else 0)

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=stop, ignore_eos=ignore_eos, logprobs=want_lp,
                            top_logprobs=top_n, echo_count=echo_count,
                            stream=stream or bool(stop))     # stop strings need the tokens as they come
    return CompletionRequest(model=model, prompt_ids=ids, prompt_was_text=was_text, n=n, params=params,
                             stream=stream, raw_output=raw, perf_metrics=perf)


def _safe(v) -> str:
    """A client-supplied name made safe to put in a JSON error body (lone surrogates escaped)."""
    return str(v).encode("utf-8", "backslashreplace").decode("utf-8")


# ---- responses -----------------------------------------------------------------------------------

_LOWEST = -3.4028234663852886e38   # float32's lowest: what -inf becomes, JSON having no infinities


def _finite(x: float) -> float:
    # the engine fails any row whose logits are not finite, so only a log-softmax underflow to -inf
    # can get here; JSON has no -inf and the SDK drops a whole logprob array with a null in it
    return x if math.isfinite(x) else _LOWEST


def logprob_entries(tokens: list[TokenInfo], token_text) -> list[dict]:
    return [{
        "token": token_text(t.token_id),
        "token_id": t.token_id,
        "logprob": _finite(t.logprob),
        "sampling_logprob": None if t.sampling_logprob is None else _finite(t.sampling_logprob),
        "top_logprobs": [{"token": token_text(i), "token_id": i, "logprob": _finite(v)} for i, v in t.top],
    } for t in tokens]


def echo_text(c: Choice, tokenizer) -> str:
    k = c.params.echo_count
    if k <= 0:
        return ""
    return tokenizer.decode(c.prompt_ids[-k:], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def raw_output(c: Choice) -> dict:
    k = c.params.echo_count
    echoed = c.prompt_ids[len(c.prompt_ids) - k:] if k else []
    return {"prompt_token_ids": list(c.prompt_ids),
            "completion_token_ids": echoed + c.token_ids,
            "completion": c.text}


def snapshots_of(choices: list[Choice]) -> list[str | None]:
    """Every snapshot identity the request's choices were computed with, in order of first use."""
    out: list[str | None] = []
    for c in choices:
        for s in c.snapshots:
            if s not in out:
                out.append(s)
    return out


def perf_metrics(choices: list[Choice], tokenize_s: float = 0.0) -> dict[str, str]:
    """§6.4 keys as strings: durations in seconds; counts as plain ints. With n > 1 the request's
    figures are the worst over its choices (they are queued and prefilled together). Also
    `snapshot-identity`: the snapshot(s) the completion was sampled from (replica.snapshot_list)."""
    per = [c.timings for c in choices]
    out: dict[str, str] = {}
    for key in per[0]:
        vals = [m.get(key, 0) for m in per]
        if key in ("num-concurrent-requests", "prompt-tokens", "cached-prompt-tokens"):
            out[key] = str(int(max(vals)))
        else:
            out[key] = f"{max(vals):.6f}"
    out["tokenizer-queue-duration"] = "0.000000"
    out["tokenizer-duration"] = f"{tokenize_s:.6f}"
    out["snapshot-identity"] = snapshot_list(snapshots_of(choices))
    return out


def usage(choices: list[Choice]) -> dict:
    p = len(choices[0].prompt_ids)
    c = sum(len(ch.output) for ch in choices)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
