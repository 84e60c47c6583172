"""On-disk checkpoint formats: train states (DCP), sampler snapshots (base / delta / LoRA), type detection.

Layout of one trainer job's checkpoints (the run store's "bucket"):

    <job_dir>/
      checkpoints/<name>/              train state (save_state): DCP + manifest
          .metadata                    DCP index (state-dict keys, tensor shapes, storage offsets)
          __0_0.distcp                 tensor data: "model.*" (+ "optim.*"); LoRA: adapter params only
          workbench_checkpoint.json    manifest, written last = commit marker
      sampler/<name>/                  sampler snapshot (save_weights_for_sampler); <name> is its identity
          base:  model.safetensors (bf16) + config.json + tokenizer files   -> a Hugging Face model dir
          delta: the new weights over the previous snapshot, in the job's delta format (formats.py,
                 docs/delta-format.md): delta.safetensors (arc_v2 default, arc_v1, arc_v3: written by
                 fireworks_delta_compression) or delta.wbd (workbench_v1, workbench's own codec)
          lora:  adapter_config.json + adapter_model.safetensors (+ tokenizer files) -> a PEFT adapter dir
          workbench_checkpoint.json
      checkpoints/.tmp-<name>-<rand>/  staging directory of a save in progress (or of a crashed one)

Every directory is staged beside its destination and renamed into place after its manifest is
written, so a directory with a manifest is complete; readers skip the rest. Checkpoint types and
promotability come from the files (detect.py), never from what a client claimed.

    from workbench import checkpoints as ck
    ck.save_train_state(job / "checkpoints" / "step-4", model, optimizer, {"step": 4})
    ck.save_sampler_base(job / "sampler" / "step-4-ab12cd34", ck.bf16_state(model), model_dir, {})
    rows = ck.list_checkpoints(job)
"""

from .delta_codec import DeltaError
from .formats import (
    DEFAULT_DELTA_FORMAT,
    DELTA_FORMATS,
    WORKBENCH_DELTA_FORMAT,
    DeltaFormatError,
    check_format,
    choose_job_format,
)
from .detect import (
    CHECKPOINT_TYPES,
    INFERENCE_ARC_V2,
    INFERENCE_BASE,
    INFERENCE_LORA,
    TRAINING,
    TRAINING_LORA,
    detect_checkpoint_type,
    is_promotable,
    is_resumable,
    list_checkpoints,
)
from .manifest import MANIFEST_FILE, read_manifest, write_manifest
from .names import NAME_RE, CheckpointNameError, validate_checkpoint_name
from .sampler import (
    apply_delta,
    bf16_state,
    delta_format_of,
    load_base_weights,
    reconstruct,
    save_sampler_base,
    save_sampler_delta,
    save_sampler_lora,
    snapshot_identity,
    snapshot_kind,
)
from .staging import cleanup_partial
from .train_state import load_train_state, save_train_state

__all__ = [
    "CHECKPOINT_TYPES", "INFERENCE_ARC_V2", "INFERENCE_BASE", "INFERENCE_LORA", "TRAINING", "TRAINING_LORA",
    "MANIFEST_FILE", "NAME_RE", "CheckpointNameError", "DeltaError", "DeltaFormatError",
    "DEFAULT_DELTA_FORMAT", "DELTA_FORMATS", "WORKBENCH_DELTA_FORMAT", "check_format", "choose_job_format",
    "delta_format_of", "apply_delta", "bf16_state", "cleanup_partial", "detect_checkpoint_type", "is_promotable", "is_resumable",
    "list_checkpoints", "load_base_weights", "load_train_state", "read_manifest", "reconstruct",
    "save_sampler_base", "save_sampler_delta", "save_sampler_lora", "save_train_state", "snapshot_identity",
    "snapshot_kind", "validate_checkpoint_name", "write_manifest",
]
