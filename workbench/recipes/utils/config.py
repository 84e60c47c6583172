"""Configuration shared by every recipe: the common fields, infrastructure, weight sync, validation.

    from workbench.recipes.utils import InfraConfig, WeightSyncConfig
    cfg = Config(log_path="./run", weight_sync=WeightSyncConfig(dcp_save_interval=10),
                 infra=InfraConfig(training_shape_id="accounts/workbench/trainingShapes/qwen3-tiny-cpu"))

`RecipeConfig` holds the fields every recipe has (run directory, model, optimizer, schedule, checkpoints,
promotion, infrastructure); each recipe's `Config` subclasses it, adds its own fields and overrides only
the defaults that differ (e.g. SFT's `epochs=3`).

Every recipe validates its whole config with `check_common` (plus its own checks, written with
`check_integer` / `check_number`) BEFORE it connects to a backend, creates a trainer or reads a
checkpoint, and raises `ConfigError` naming every offending field at once, so a bad config never leaves
half-provisioned jobs behind.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BASE_MODEL = "accounts/workbench/models/qwen3-tiny"
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

# A job id or checkpoint name: what the trainer accepts (lowercase DNS label).
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ConfigError(ValueError):
    """A recipe config is invalid or contradicts itself; raised before any work is done."""


@dataclass
class InfraConfig:
    """Where and how the recipe's trainer (and, for RL, its deployment) run."""

    training_shape_id: str | None = None
    """Training shape of the policy trainer, e.g. `accounts/workbench/trainingShapes/qwen3-tiny-cpu`.
    None: for an embedded workbench model, its local shape (`<model>-cpu`, or `<model>-lora-cpu` when
    lora_rank > 0); for any other model the manual path (no shape; the backend's defaults)."""

    ref_training_shape_id: str | None = None
    """Training shape of a separate reference trainer (RL with kl_beta > 0 from a warm start).
    None: the policy's shape."""

    deployment_id: str | None = None
    """RL only: an existing deployment to sample from (it must hot-load from this run's trainer).
    None: the recipe creates `<trainer-job-id>-rollout` and deletes it when the run completes."""

    trainer_timeout_s: float = 900
    """Seconds to wait for a trainer job to become ready (created, resumed or reconnected)."""

    deployment_timeout_s: float = 900
    """Seconds to wait for the RL deployment to become ready."""

    poll_interval_s: float = 1.0
    """Polling interval while waiting for trainers and deployments."""

    cleanup_on_success: bool = True
    """Delete the trainer job(s) and the deployment the recipe created once the run has completed
    (checkpoint rows and files stay: promotion and `init_from_checkpoint` still work). A run that fails
    or is killed keeps its trainer, so rerunning with the same log_path reconnects to it."""


@dataclass
class WeightSyncConfig:
    """Checkpoint cadence and weight sync (the seeds' `WeightSyncConfig`)."""

    weight_sync_interval: int = 1
    """RL: hot-load the policy into the deployment every N optimizer steps (1 = on-policy)."""

    dcp_save_interval: int = 0
    """Save a resumable (DCP) checkpoint `step-N` every N steps. 0 = off: the run can only be resumed
    from its final checkpoint."""

    dcp_timeout: int = 2700
    """Seconds to wait for one DCP save or load."""

    first_checkpoint_type: str = "base"
    """Type of the first weight-sync snapshot ("base" or "delta"); later ones follow the SDK's
    base-then-delta chain."""

    weight_sync_before_training: bool = False
    """RL: hot-load the current policy before the first step even on a fresh start from the base
    model (a resumed or warm-started run always syncs first, so sampling never uses stale weights)."""

    weight_sync_timeout: int = 600
    """Seconds to wait for one hot-load."""


@dataclass
class RecipeConfig:
    """The fields every recipe's `Config` shares. A recipe subclasses it, adds its own fields (its
    `dataset` first) and redeclares a field here only to change its default."""

    log_path: str
    """Directory of this run: run.json (trainer jobs), dataloader.json (data cursors), metrics.jsonl and any
    file of the recipe's own (DPO: reference_logprobs.json). Rerunning with the same log_path resumes the run."""

    base_model: str = DEFAULT_BASE_MODEL
    """Model to train (a name the backend knows; RL's deployment serves the same base)."""

    evaluation_dataset: str | None = None
    """Held-out JSONL in the same format as `dataset`. None: a seeded carve-out of min(10%, 100) training rows."""

    tokenizer_model: str | None = None
    """Tokenizer for the chat template: a catalog model name or a local HF directory. None: base_model's."""

    learning_rate: float = 3e-3
    """Adam learning rate (after warmup). The default suits the embedded 1M-parameter model; real models
    want ~1e-6 to 1e-5 (SFT: ~1e-5 to 1e-4)."""

    warmup_steps: int = 0
    """Linear learning-rate warmup over this many optimizer steps."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    grad_clip_norm: float = 0.0
    """Clip the (normalized) gradient to this global norm; 0 = no clipping."""

    epochs: int = 1
    """Passes over the training data."""

    max_steps: int | None = None
    """Stop after this many optimizer steps in total (None: epochs x steps per epoch)."""

    lora_rank: int = 0
    """0 = full-parameter training; > 0 = LoRA of that rank."""

    seed: int = 0
    """Seeds the data order (epoch e shuffles with seed + e), the eval carve-out and LoRA init (RL: also
    the rollout and evaluation sampling)."""

    output_model_id: str | None = None
    """Promote the final checkpoint to `accounts/<account>/models/<output_model_id>` at the end."""

    init_from_checkpoint: str | None = None
    """"job-id:checkpoint-name": start from another job's DCP checkpoint (weights + optimizer); step and
    data cursor start at 0. Only for the run's first start: a rerun resumes its own progress. For DPO and
    RL these weights are also the reference."""

    warm_start_from_adapter: str | None = None
    """LoRA only: a PEFT adapter (`accounts/<a>/models/<id>` or a local directory) to start from (weights
    only). For DPO and RL it is also the reference."""

    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """Checkpoint cadence: `dcp_save_interval` > 0 saves a resumable `step-N` every N steps (RL: also the
    weight-sync interval and hot-load timeouts)."""

    infra: InfraConfig = field(default_factory=InfraConfig)
    """Training shape(s), the RL deployment, timeouts, cleanup."""


def default_training_shape(base_model: str, lora_rank: int) -> str | None:
    """The local shape of an embedded workbench model, or None (manual path) for any other model."""
    prefix = "accounts/workbench/models/"
    if not base_model.startswith(prefix):
        return None
    short = base_model[len(prefix):]
    return f"accounts/workbench/trainingShapes/{short}-{'lora-' if lora_rank > 0 else ''}cpu"


def parse_checkpoint_ref(ref: str, field: str = "init_from_checkpoint") -> tuple[str, str]:
    """`"job-id:checkpoint-name"` -> (job id, checkpoint name), or ConfigError."""
    job_id, sep, name = (ref or "").strip().partition(":")
    if not sep or not _LABEL.match(job_id) or not _LABEL.match(name):
        raise ConfigError(f"{field}={ref!r} must look like 'job-id:checkpoint-name' (e.g. 'sft-1a2b3c4d:step-8'): "
                          "both parts lowercase letters, digits and hyphens")
    return job_id, name


def check_integer(errors: list[str], name: str, value, low: int = 1) -> None:
    """Appends a problem unless `value` is an int (not a bool) >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        errors.append(f"{name} must be an integer >= {low} (got {value!r})")


def check_number(errors: list[str], name: str, value, *, low: float, low_open: bool = False,
                 high: float | None = None) -> None:
    """Appends a problem unless `value` is a number (not a bool) >= low (> low when low_open), <= high.
    Written as `not (value >= low)` so that NaN fails too."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        errors.append(f"{name} must be a number {bound} (got {value!r})")


def _finite_number(errors: list[str], name: str, value, *, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        errors.append(f"{name} must be a finite number (got {value!r})")
    elif value < low:
        errors.append(f"{name} must be >= {low} (got {value!r})")


def check_batching(errors: list[str], cfg) -> None:
    """`batch_size` and `max_seq_len`, for the recipes that train on fixed-size batches of rendered rows."""
    check_integer(errors, "batch_size", cfg.batch_size)
    if cfg.max_seq_len is not None:
        check_integer(errors, "max_seq_len", cfg.max_seq_len, 2)


def check_common(cfg, *, datasets: tuple[str, ...] = ("dataset", "evaluation_dataset")) -> list[str]:
    """Checks every recipe shares; returns the problems found (the recipe adds its own, then raises)."""
    from fireworks.training.sdk import validate_output_model_id

    errors: list[str] = []
    if not cfg.log_path or not str(cfg.log_path).strip():
        errors.append("log_path is required (the run's directory: run.json, dataloader.json, metrics.jsonl)")
    if not isinstance(cfg.base_model, str) or not cfg.base_model.strip():
        errors.append("base_model is required")
    for field in datasets:
        path = getattr(cfg, field, None)
        if path is None:
            continue
        if not str(path).strip():
            errors.append(f"{field} is required (a JSONL file)")
        elif not Path(path).expanduser().is_file():
            errors.append(f"{field}={str(path)!r}: file not found")
    _finite_number(errors, "learning_rate", cfg.learning_rate, low=0)
    check_integer(errors, "lora_rank", cfg.lora_rank, 0)
    check_integer(errors, "epochs", cfg.epochs)
    check_integer(errors, "seed", cfg.seed, 0)
    if cfg.max_steps is not None:
        check_integer(errors, "max_steps", cfg.max_steps, 0)
    check_integer(errors, "warmup_steps", cfg.warmup_steps, 0)
    if cfg.output_model_id is not None:
        problems = validate_output_model_id(cfg.output_model_id)
        errors.extend(f"output_model_id: {p}" for p in problems)
    if cfg.init_from_checkpoint and cfg.warm_start_from_adapter:
        errors.append("init_from_checkpoint and warm_start_from_adapter are mutually exclusive: "
                      "init_from_checkpoint loads another job's full train state, warm_start_from_adapter "
                      "only LoRA adapter weights; set one of them")
    if cfg.warm_start_from_adapter and not cfg.lora_rank:
        errors.append("warm_start_from_adapter requires lora_rank > 0 (it loads LoRA adapter weights); for a "
                      "full-parameter warm start use init_from_checkpoint='job-id:checkpoint-name' or set "
                      "base_model to a promoted model")
    if cfg.init_from_checkpoint:
        try:
            parse_checkpoint_ref(cfg.init_from_checkpoint)
        except ConfigError as e:
            errors.append(str(e))
    ws = cfg.weight_sync
    if not isinstance(ws, WeightSyncConfig):
        errors.append(f"weight_sync must be a WeightSyncConfig (got {type(ws).__name__})")
    else:
        check_integer(errors, "weight_sync.weight_sync_interval", ws.weight_sync_interval)
        check_integer(errors, "weight_sync.dcp_save_interval", ws.dcp_save_interval, 0)
        check_integer(errors, "weight_sync.dcp_timeout", ws.dcp_timeout)
        check_integer(errors, "weight_sync.weight_sync_timeout", ws.weight_sync_timeout)
        if ws.first_checkpoint_type not in ("base", "delta"):
            errors.append(f"weight_sync.first_checkpoint_type must be 'base' or 'delta' "
                          f"(got {ws.first_checkpoint_type!r})")
    if not isinstance(cfg.infra, InfraConfig):
        errors.append(f"infra must be an InfraConfig (got {type(cfg.infra).__name__})")
    return errors


def raise_if(errors: list[str], recipe: str) -> None:
    if errors:
        raise ConfigError(f"invalid {recipe} config:\n  - " + "\n  - ".join(errors))
