"""`import tinker` for the seeds' code: the Fireworks SDK's native Tinker-compatible types.

The Fireworks docs (seeds 003, 004) write `import tinker` and `tinker.AdamParams(...)`; the pinned SDK
ships those types itself ("use `from fireworks.training import sdk` or the equivalent native `tinker`
name", its TINKER_COMPATIBILITY.md). This module is that name: it re-exports the SDK's own classes,
so `tinker.AdamParams is fireworks.training.sdk.AdamParams`. It is not the PyPI `tinker` client; do not
install both in one environment.
"""

from fireworks.training.sdk import (  # noqa: F401
    AdamParams,
    APIFuture,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    LoraConfig,
    ModelInput,
    ModelInputChunk,
    OptimStepResponse,
    SamplingParams,
    ServiceClient,
    TensorData,
    TrainingClient,
)
