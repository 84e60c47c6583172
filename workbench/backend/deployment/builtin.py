"""The built-in replica: the batching engine (engine.py) plus the weight manager (weights.py).

    replica = BuiltinReplica(deployment_dir, {"deployment_id": "d", "account": "a", "base_model": "qwen3-tiny"})
    replica.start()                          # base model (+ the snapshot in state.json) loads in the background
    handle = replica.submit(GenerationRequest(ids, SamplingParams(max_tokens=8), time.perf_counter()), sink)
    replica.hotload(HotloadRequest("step-3", snapshot_root=...))

The default engine of a deployment: real PyTorch on the CPU, made for the small embedded models. It
implements `replica.Replica`, which is all the HTTP server sees; `__main__.py` picks it.
"""

from __future__ import annotations

from pathlib import Path

from .engine import Sequence
from .replica import GenerationRequest, GenerationSink, HotloadRequest, ModelInfo
from .weights import WeightManager


class BuiltinReplica:
    def __init__(self, deployment_dir: Path, config: dict, max_batch: int | None = None):
        self.weights = WeightManager(deployment_dir, config, max_batch=max_batch)
        self.deployment_id = self.weights.deployment_id
        self.account = config.get("account", "workbench")
        self.base_model = self.weights.base_model
        self._info: ModelInfo | None = None

    # readiness and model
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
        """The batching engine (None until the weights are loaded)."""
        return self.weights.engine

    def model_info(self) -> ModelInfo | None:
        if not self.weights.ready:
            return None
        if self._info is None:
            w = self.weights
            self._info = ModelInfo(w.base_model, w.tokenizer, w.vocab_size, w.max_context)
        return self._info

    def health(self) -> dict:
        return self.engine.load() if self.engine is not None else {}

    # hot loads
    def status(self) -> dict:
        return self.weights.status()

    def hotload(self, request: HotloadRequest) -> dict:
        return self.weights.hotload(request.identity, request.metadata, snapshot_root=request.snapshot_root,
                                    source_url=request.source_url, reset_prompt_cache=request.reset_prompt_cache,
                                    drain=request.drain)

    # generation
    def submit(self, request: GenerationRequest, sink: GenerationSink) -> Sequence:
        return self.engine.submit(Sequence(request.prompt_ids, request.params, sink=sink, arrival=request.arrival))

    def cancel(self, handle: Sequence) -> None:
        self.engine.cancel(handle)

    def start(self) -> None:
        self.weights.start()

    def stop(self) -> None:
        self.weights.stop()
