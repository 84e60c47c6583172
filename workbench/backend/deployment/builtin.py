"""The built-in replica: the batching engine (engine.py) plus the weight manager (weights.py).

    replica = BuiltinReplica(deployment_dir, {"deployment_id": "d", "account": "a", "base_model": "qwen3-tiny"})
    replica.start()                          # base model (+ the snapshot in state.json) loads in the background
    handle = replica.submit(GenerationRequest(ids, SamplingParams(max_tokens=8), time.perf_counter()), sink)
    replica.hotload(HotloadRequest("step-3", snapshot_root=...))

The default engine of a deployment: real PyTorch on the CPU, made for the small embedded models. It
implements `replica.Replica`, which is all the HTTP server sees; `__main__.py` picks it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .engine import Sequence
from .replica import GenerationRequest, GenerationSink, WeightManagedReplica
from .weights import WeightManager


# Modules a replica imports only once it needs them, each for its resident memory (bench/cold_start.py):
# the delta codec (zstandard) at the first hot load; uvloop never (__main__.py serves on asyncio's loop).
OPTIONAL_MODULES = ("workbench.checkpoints.delta_codec", "zstandard", "uvloop")


class BuiltinReplica(WeightManagedReplica):
    def __init__(self, deployment_dir: Path, config: dict, max_batch: int | None = None):
        super().__init__(WeightManager(deployment_dir, config, max_batch=max_batch), config)

    def health(self) -> dict:
        """The engine's counters, plus whether this process has imported transformers (a plain Qwen3 is
        served without it: runners.py; the import alone costs the process ~100 MiB) and which of the
        other modules a replica loads only when it needs them it has imported (`OPTIONAL_MODULES`)."""
        return {**(self.engine.load() if self.engine is not None else {}),
                "transformers_imported": "transformers" in sys.modules,
                "optional_modules_imported": [m for m in OPTIONAL_MODULES if m in sys.modules]}

    def submit(self, request: GenerationRequest, sink: GenerationSink) -> Sequence:
        return self.engine.submit(Sequence(request.prompt_ids, request.params, sink=sink, arrival=request.arrival))

    def stop(self) -> None:
        self.weights.stop()
