"""Shared pieces of the recipes (the cookbook's `training.utils`).

    from workbench.recipes.utils import InfraConfig, WeightSyncConfig, TrainingCheckpoints

Modules: `config` (InfraConfig, WeightSyncConfig, validation), `checkpoints` (TrainingCheckpoints),
`infra` (backend, trainer jobs, deployment, run.json), `data` (JSONL, chat rendering, order, shipped data),
`logging` (metrics.jsonl, progress bar), `losses` (GRPO, DPO, ORPO objectives), `loop` (start / finish a run).
"""

from .checkpoints import ResumeInfo, TrainingCheckpoints
from .config import ConfigError, InfraConfig, WeightSyncConfig
from .infra import RecipeError
from .logging import MetricsLog, read_metrics

__all__ = ["InfraConfig", "WeightSyncConfig", "TrainingCheckpoints", "ResumeInfo", "ConfigError", "RecipeError",
           "MetricsLog", "read_metrics"]
