"""Configuration shared by every recipe: infrastructure, weight sync and checkpoint cadence, validation.

    from workbench.recipes.utils import InfraConfig, WeightSyncConfig
    cfg = Config(log_path="./run", weight_sync=WeightSyncConfig(dcp_save_interval=10),
                 infra=InfraConfig(training_shape_id="accounts/workbench/trainingShapes/qwen3-tiny-cpu"))

Every recipe validates its whole config with `check_common` (plus its own checks) BEFORE it connects
to a backend, creates a trainer or reads a checkpoint, and raises `ConfigError` naming the offending
fields, so a bad config never leaves half-provisioned jobs behind.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
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


def _positive_int(errors: list[str], name: str, value, *, zero_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        errors.append(f"{name} must be an integer >= {0 if zero_ok else 1} (got {value!r})")


def _number(errors: list[str], name: str, value, *, low: float | None = None, low_open: bool = False,
            high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        errors.append(f"{name} must be a finite number (got {value!r})")
        return
    if low is not None and (value <= low if low_open else value < low):
        errors.append(f"{name} must be {'>' if low_open else '>='} {low} (got {value!r})")
    if high is not None and value > high:
        errors.append(f"{name} must be <= {high} (got {value!r})")


def check_common(cfg, *, datasets: tuple[str, ...] = ("dataset",)) -> list[str]:
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
    _number(errors, "learning_rate", cfg.learning_rate, low=0)
    _positive_int(errors, "lora_rank", cfg.lora_rank, zero_ok=True)
    _positive_int(errors, "epochs", cfg.epochs)
    _positive_int(errors, "seed", cfg.seed, zero_ok=True)
    if cfg.max_steps is not None:
        _positive_int(errors, "max_steps", cfg.max_steps, zero_ok=True)
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
        _positive_int(errors, "weight_sync.weight_sync_interval", ws.weight_sync_interval)
        _positive_int(errors, "weight_sync.dcp_save_interval", ws.dcp_save_interval, zero_ok=True)
        _positive_int(errors, "weight_sync.dcp_timeout", ws.dcp_timeout)
        _positive_int(errors, "weight_sync.weight_sync_timeout", ws.weight_sync_timeout)
        if ws.first_checkpoint_type not in ("base", "delta"):
            errors.append(f"weight_sync.first_checkpoint_type must be 'base' or 'delta' "
                          f"(got {ws.first_checkpoint_type!r})")
    if not isinstance(cfg.infra, InfraConfig):
        errors.append(f"infra must be an InfraConfig (got {type(cfg.infra).__name__})")
    return errors


def raise_if(errors: list[str], recipe: str) -> None:
    if errors:
        raise ConfigError(f"invalid {recipe} config:\n  - " + "\n  - ".join(errors))
