"""The `Replica` protocol: the whole surface the deployment HTTP server (`server.py`) uses.

    replica = BuiltinReplica(deployment_dir, config)     # builtin.py: batching engine + weight manager
    replica.start()                                      # load weights in the background
    app = create_app(replica, api_key)                   # server.py speaks only this protocol

An engine plugs into the deployment by implementing `Replica` (the built-in CPU engine in
`builtin.py`; a vLLM-backed one lives beside it). Everything wire-shaped — JSON parsing, validation,
detokenization, stop strings, SSE chunks, perf_metrics — stays in `protocol.py`/`server.py`, so a
replica deals in token ids only:

* readiness: `ready`, `startup_error`, `model_info()` (tokenizer, vocab size, context length once
  ready), `current_identity`, `health()` (extra /healthz counters);
* hot loads: `hotload(HotloadRequest) -> dict` (blocking; the server runs it off the event loop;
  raises `HotloadError` with the HTTP status to answer) and `status()` (the hot-load GET body,
  wire contract §5.2);
* generation: `submit(GenerationRequest, sink) -> handle` and `cancel(handle)`. The replica reports
  progress by calling `sink.on_events([...])` from its own thread with `TokenEvent`s (new tokens with
  their logprobs) and exactly one `FinalEvent` per submitted request — also after a cancel, and
  with `error` set when generation failed for that request alone.

The types below are shared by every replica and by the protocol code; they carry no HTTP state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence as Seq, runtime_checkable

# finish reasons a replica reports; "stop" for a stop *string* is decided by protocol.py, which then
# cancels the request (the replica answers that cancel with FinalEvent(finish_reason="cancelled"))
FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass
class SamplingParams:
    """What one choice asks of the replica (validated by protocol.py before it gets here)."""
    max_tokens: int = 16
    """New tokens to generate at most (already lowered to fit the context by protocol.py)."""
    temperature: float = 1.0
    """0 = greedy; else logits are divided by it before top-k/top-p."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 = off."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = off (never above the vocabulary size)."""
    seed: int | None = None
    """Per-request seed: the same seed samples the same tokens whatever else shares the batch."""
    stop: list[str] = field(default_factory=list)
    """Stop strings. Handled by protocol.py (text level); replicas may ignore them."""
    ignore_eos: bool = False
    """Keep generating past an end-of-sequence token."""
    logprobs: bool = False
    """Report each token's raw log-probability (and the sampling one)."""
    top_logprobs: int = 0
    """Also report this many most likely alternatives per position."""
    echo_count: int = 0
    """How many trailing prompt tokens to echo back (scored when logprobs is set)."""
    stream: bool = False
    """The client streams: the replica must send a TokenEvent per generated token."""


@dataclass
class TokenInfo:
    token_id: int
    logprob: float
    sampling_logprob: float | None
    top: list[tuple[int, float]]   # top-N (token_id, raw logprob), best first


@dataclass
class GenerationRequest:
    """One choice to generate: a prompt of token ids and its sampling parameters."""
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    """time.perf_counter() when the HTTP request arrived (for prefill-queue-duration)."""


@dataclass
class TokenEvent:
    handle: Any
    tokens: list[TokenInfo]        # echoed prompt tokens (first event only) and/or new tokens
    first: bool = False            # the request's first event (its tokens start with the echo)
    snapshot: str | None = None    # identity of the weights these tokens were computed with


@dataclass
class FinalEvent:
    handle: Any
    finish_reason: str             # one of FINISH_REASONS
    output: list[TokenInfo]        # every generated token
    echo: list[TokenInfo]          # the echoed prompt tokens (with logprobs when asked)
    timings: dict                  # perf_metrics figures (protocol.PERF_KEYS), seconds / counts
    snapshots: list[str | None]    # every snapshot identity the request was computed with, in order
    error: str | None = None       # set when generation failed for this request


class GenerationSink(Protocol):
    def on_events(self, events: list) -> None:
        """Called from the replica's thread with this request's new TokenEvents/FinalEvent, in order.
        Must be quick and must not block (it may call `replica.cancel`)."""


@dataclass(frozen=True)
class ModelInfo:
    base_model: str
    tokenizer: Any                 # a Hugging Face tokenizer (encode / decode)
    vocab_size: int
    max_context: int               # prompt + generated tokens at most


@dataclass
class HotloadRequest:
    """A validated hot-load POST (wire contract §5.1) plus where the snapshot may be read from."""
    identity: str
    metadata: dict | None = None   # incremental_snapshot_metadata (delta loads)
    snapshot_root: str | None = None   # x-workbench-snapshot-root (set by the control plane)
    source_url: str | None = None      # x-fireworks-hot-load-source-url
    reset_prompt_cache: bool = False
    drain: bool | None = None
    """Let in-flight requests finish on the old weights before the swap (None: the replica's default)."""


class HotloadError(Exception):
    """A hot load that failed; `status` is the HTTP status to answer (4xx: the SDK does not retry)."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


@runtime_checkable
class Replica(Protocol):
    deployment_id: str
    account: str
    base_model: str

    @property
    def ready(self) -> bool:
        """Weights are loaded: completions may run (before: 425, or 503 with startup_error)."""

    @property
    def startup_error(self) -> str | None:
        """Why the replica could not start, if it could not."""

    @property
    def current_identity(self) -> str | None:
        """The snapshot served now (None: the base model)."""

    def model_info(self) -> ModelInfo | None:
        """Tokenizer and limits; None until ready."""

    def health(self) -> dict:
        """Extra /healthz fields (load counters); never blocks."""

    def status(self) -> dict:
        """The hot-load GET body: {"replicas": [{replica_id, current_snapshot_identity, readiness,
        loading_state, ...}]}; never blocks on a running load."""

    def hotload(self, request: HotloadRequest) -> dict:
        """Load and serve a snapshot; blocks until it is served. Raises HotloadError."""

    def submit(self, request: GenerationRequest, sink: GenerationSink) -> Any:
        """Queue one choice; returns a handle for cancel() (events name it as `handle`)."""

    def cancel(self, handle: Any) -> None:
        """Stop a submitted request soon; its FinalEvent still comes (finish_reason "cancelled")."""

    def start(self) -> None:
        """Begin loading weights in the background (returns at once)."""

    def stop(self) -> None:
        """Fail what is in flight and release the engine."""


def snapshot_list(snapshots: Seq[str | None]) -> str:
    """How a completion names the snapshots it was sampled from (header and perf_metrics): the
    identities in order, comma-separated; the base model (no snapshot loaded) is "base"."""
    return ",".join(s if s is not None else "base" for s in snapshots)


class WeightManagedReplica:
    """The part every replica that keeps its snapshots in a weight manager shares (weights.WeightManager or a
    subclass of it): readiness, model info, hot-load status and hot loads delegate to `self.weights`;
    generation goes to `self.engine`. Subclasses (BuiltinReplica, VllmReplica) pass their weight manager to
    this __init__ and add `submit`, `health` and `stop`, which differ by engine."""

    def __init__(self, weights, config: dict):
        self.weights = weights
        self.deployment_id = weights.deployment_id
        self.account = config.get("account", "workbench")
        self.base_model = weights.base_model
        self._info: ModelInfo | None = None

    @property
    def ready(self) -> bool:
        return self.weights.ready

    @property
    def startup_error(self) -> str | None:
        return self.weights.startup_error

    @property
    def current_identity(self) -> str | None:
        return self.weights.current_identity

    @property
    def engine(self):
        """The generation engine (None until the weights are loaded)."""
        return self.weights.engine

    def model_info(self) -> ModelInfo | None:
        if not self.weights.ready:
            return None
        if self._info is None:
            w = self.weights
            self._info = ModelInfo(w.base_model, w.tokenizer, w.vocab_size, w.max_context)
        return self._info

    def status(self) -> dict:
        return self.weights.status()

    def hotload(self, request: HotloadRequest) -> dict:
        return self.weights.hotload(request.identity, request.metadata, snapshot_root=request.snapshot_root,
                                    source_url=request.source_url, reset_prompt_cache=request.reset_prompt_cache,
                                    drain=request.drain)

    def cancel(self, handle) -> None:
        self.engine.cancel(handle)

    def start(self) -> None:
        self.weights.start()
