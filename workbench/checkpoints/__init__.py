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

# Lazy: the control plane imports this package for names, manifests and detection and must not pay for
# torch and torch.distributed.checkpoint (~15 s and ~200 MiB) that the train-state and codec modules import.
_LAZY = {
    'DeltaError': 'delta_codec',
    'DEFAULT_DELTA_FORMAT': 'formats',
    'DELTA_FORMATS': 'formats',
    'WORKBENCH_DELTA_FORMAT': 'formats',
    'DeltaFormatError': 'formats',
    'check_format': 'formats',
    'choose_job_format': 'formats',
    'CHECKPOINT_TYPES': 'detect',
    'INFERENCE_ARC_V2': 'detect',
    'INFERENCE_BASE': 'detect',
    'INFERENCE_LORA': 'detect',
    'TRAINING': 'detect',
    'TRAINING_LORA': 'detect',
    'detect_checkpoint_type': 'detect',
    'is_promotable': 'detect',
    'is_resumable': 'detect',
    'list_checkpoints': 'detect',
    'MANIFEST_FILE': 'manifest',
    'read_manifest': 'manifest',
    'write_manifest': 'manifest',
    'NAME_RE': 'names',
    'CheckpointNameError': 'names',
    'validate_checkpoint_name': 'names',
    'apply_delta': 'sampler',
    'bf16_state': 'sampler',
    'delta_format_of': 'sampler',
    'load_base_weights': 'sampler',
    'reconstruct': 'sampler',
    'save_sampler_base': 'sampler',
    'save_sampler_delta': 'sampler',
    'save_sampler_lora': 'sampler',
    'snapshot_identity': 'sampler',
    'snapshot_kind': 'sampler',
    'cleanup_partial': 'staging',
    'load_train_state': 'train_state',
    'save_train_state': 'train_state',
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "CHECKPOINT_TYPES", "INFERENCE_ARC_V2", "INFERENCE_BASE", "INFERENCE_LORA", "TRAINING", "TRAINING_LORA",
    "MANIFEST_FILE", "NAME_RE", "CheckpointNameError", "DeltaError", "DeltaFormatError",
    "DEFAULT_DELTA_FORMAT", "DELTA_FORMATS", "WORKBENCH_DELTA_FORMAT", "check_format", "choose_job_format",
    "delta_format_of", "apply_delta", "bf16_state", "cleanup_partial", "detect_checkpoint_type", "is_promotable", "is_resumable",
    "list_checkpoints", "load_base_weights", "load_train_state", "read_manifest", "reconstruct",
    "save_sampler_base", "save_sampler_delta", "save_sampler_lora", "save_train_state", "snapshot_identity",
    "snapshot_kind", "validate_checkpoint_name", "write_manifest",
]
