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
from .replica import GenerationRequest, GenerationSink, WeightManagedReplica
from .weights import WeightManager


class BuiltinReplica(WeightManagedReplica):
    def __init__(self, deployment_dir: Path, config: dict, max_batch: int | None = None):
        super().__init__(WeightManager(deployment_dir, config, max_batch=max_batch), config)

    def health(self) -> dict:
        return self.engine.load() if self.engine is not None else {}

    def submit(self, request: GenerationRequest, sink: GenerationSink) -> Sequence:
        return self.engine.submit(Sequence(request.prompt_ids, request.params, sink=sink, arrival=request.arrival))

    def stop(self) -> None:
        self.weights.stop()
