"""Training shapes: named trainer configurations that `resolve_training_profile` looks up.

On the Fireworks service a shape pins accelerators, image tags and sharding for a base model. Locally a
shape names a base model, a context length and the trainer mode, so seed code that starts from
`rlor_mgr.resolve_training_profile(shape_id)` runs unchanged. Modes, as the SDK knows them:

    POLICY_TRAINER   full-parameter training                        <model>-cpu
    LORA_TRAINER     LoRA training (loraRank > 0), or a frozen rank-0  <model>-lora-cpu
                     reference (forwardOnly) -- the SDK's preferred reference shape
    FORWARD_ONLY     frozen reference trainers only (forwardOnly)     <model>-ref-cpu

`workbench.common.default_training_shape` names the right one for a model, rank and role.
"""

from __future__ import annotations

from workbench.common import ACCOUNT_ID
from workbench.models import DEFAULT_MODEL, SMALL_MODEL

# shape id -> (base model, trainer mode, max context length)
SHAPES = {
    "qwen3-tiny-cpu": (DEFAULT_MODEL, "POLICY_TRAINER", 2048),
    "qwen3-tiny-lora-cpu": (DEFAULT_MODEL, "LORA_TRAINER", 2048),
    "qwen3-small-cpu": (SMALL_MODEL, "POLICY_TRAINER", 2048),
    "qwen3-small-lora-cpu": (SMALL_MODEL, "LORA_TRAINER", 2048),
    "qwen3-tiny-cpu-2r": (DEFAULT_MODEL, "POLICY_TRAINER", 2048),
    "qwen3-tiny-lora-cpu-2r": (DEFAULT_MODEL, "LORA_TRAINER", 2048),
    "qwen3-small-cpu-2r": (SMALL_MODEL, "POLICY_TRAINER", 2048),
    "qwen3-tiny-ref-cpu": (DEFAULT_MODEL, "FORWARD_ONLY", 2048),
    "qwen3-small-ref-cpu": (SMALL_MODEL, "FORWARD_ONLY", 2048),
}
# Shapes whose trainer runs as several torch.distributed ranks (FSDP2) on this machine: shape id ->
# ranks, advertised as acceleratorCount (CPU ranks here, one per accelerator on a GPU machine).
RANKS = {"qwen3-tiny-cpu-2r": 2, "qwen3-tiny-lora-cpu-2r": 2, "qwen3-small-cpu-2r": 2}
VERSION = "v1"


def shape_version(shape_id: str, account: str = ACCOUNT_ID) -> dict | None:
    if shape_id not in SHAPES:
        return None
    base_model, mode, context = SHAPES[shape_id]
    return {
        "name": f"accounts/{account}/trainingShapes/{shape_id}/versions/{VERSION}",
        "validated": True,
        "latestValidated": True,
        "snapshot": {
            "baseModel": base_model,
            "trainerImageTag": "workbench",
            "maxSupportedContextLength": context,
            "nodeCount": 1,
            "deploymentShapeVersion": f"accounts/{account}/deploymentShapes/{shape_id}/versions/1",
            "deploymentImageTag": "workbench",
            "acceleratorType": "CPU",
            "acceleratorCount": RANKS.get(shape_id, 0),
            "baseModelWeightPrecision": "BF16",
            "trainerShardingScheme": {"pipelineParallelism": 1},
            "trainerMode": mode,
        },
    }


def shape_for_ref(ref: str) -> tuple[str, dict] | None:
    """`accounts/<a>/trainingShapes/<s>[/versions/<v>]` -> (shape id, version object)."""
    parts = ref.split("/")
    if len(parts) >= 4 and parts[0] == "accounts" and parts[2] == "trainingShapes":
        version = shape_version(parts[3], parts[1])
        if version is not None:
            return parts[3], version
    return None
