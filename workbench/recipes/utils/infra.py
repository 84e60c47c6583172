"""Provisioning for the recipes: the backend, trainer jobs and the RL deployment, all through the official SDK.

    infra = RecipeInfra(cfg, recipe="sft")            # connect(): FIREWORKS_* variables or the local backend
    policy = infra.trainer("policy", lora_rank=cfg.lora_rank, learning_rate=cfg.learning_rate, seed=cfg.seed)
    policy.client.forward_backward(...)               # an SDK FiretitanTrainingClient
    ...
    infra.finish(summary)                              # marks run.json completed, deletes what the run created

`<log_path>/run.json` records what the run uses, so a rerun with the same log_path finds it again:

    {"recipe": "sft", "base_model": ..., "lora_rank": 0,
     "trainers": {"policy": "sft-1a2b3c4d", "reference": "..."}, "deployment_id": "...",
     "deployment_created": true, "training_started": true, "status": "running" | "completed",
     "summary": {...}}

The trainer job id is chosen client-side (the SDK's `requested_job_id`) and written to run.json BEFORE
the create request, so a run killed at any point reconnects to the same job: `reconnect_and_wait`
returns at once for a running trainer and resumes a stopped one (FAILED, PAUSED, ...).
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench import records

from .config import ConfigError, default_training_shape

logger = logging.getLogger("workbench.recipes")

RUN_FILE = records.RUN_FILE


class RecipeError(RuntimeError):
    """The run cannot continue (e.g. its recorded trainer job was deleted); the message says what to do."""


class RunRecord:
    """`<log_path>/run.json` as the recipe sees it: the typed `workbench.records.RunRecord`, saved atomically
    field by field on every change (so a notebook `Run` viewing the same directory keeps its own fields)."""

    def __init__(self, log_path: str | os.PathLike):
        self.dir = Path(log_path).expanduser()
        self.path = self.dir / RUN_FILE
        try:
            self.record = records.RunRecord.load(self.dir)
        except records.RecordError as e:
            raise RecipeError(str(e)) from None

    @property
    def exists(self) -> bool:
        return self.path.exists() and self.record.recipe is not None

    def get(self, key: str, default=None):
        value = getattr(self.record, key, None)
        return default if value is None else value

    def update(self, **values) -> None:
        self.record.update(self.dir, **values)

    def trainer_id(self, role: str) -> str | None:
        return self.record.trainers.get(role)

    def set_trainer_id(self, role: str, job_id: str | None) -> None:
        trainers = dict(self.record.trainers)
        if job_id is None:
            trainers.pop(role, None)
        else:
            trainers[role] = job_id
        self.update(trainers=trainers)


def check_run_record(cfg, recipe: str) -> list[str]:
    """Config fields that contradict the run already recorded in log_path (reruns must match)."""
    try:
        rec = records.RunRecord.load(cfg.log_path)
    except records.RecordError as e:
        return [str(e)]
    errors = []
    for key, value in (("recipe", recipe), ("base_model", cfg.base_model), ("lora_rank", cfg.lora_rank)):
        held = getattr(rec, key)
        if rec.recipe is not None and held is not None and held != value:
            errors.append(f"{key}={value!r} but log_path {str(cfg.log_path)!r} holds a run with {key}={held!r}: "
                          "use a new log_path (optionally with init_from_checkpoint) or the original config")
    return errors


@dataclass
class Trainer:
    role: str
    job_id: str
    endpoint: Any          # TrainerServiceEndpoint
    service: Any           # FiretitanServiceClient
    client: Any            # FiretitanTrainingClient
    created: bool          # this invocation created the job (a fresh trainer, base weights)

    @property
    def max_context_length(self) -> int | None:
        return getattr(self.endpoint, "max_context_length", None)


class RecipeInfra:
    """The backend connection and the jobs one recipe run uses."""

    def __init__(self, cfg, recipe: str):
        from fireworks.training.sdk import DeploymentManager, TrainerJobManager

        from workbench.connect import connect

        self.cfg = cfg
        self.recipe = recipe
        self.backend = connect()
        self.api_key = self.backend.api_key
        self.base_url = self.backend.base_url
        self.rlor_mgr = TrainerJobManager(api_key=self.api_key, base_url=self.base_url)
        self.deploy_mgr = DeploymentManager(api_key=self.api_key, base_url=self.base_url)
        self.run = RunRecord(cfg.log_path)
        if not self.run.exists:
            self.run.update(recipe=recipe, base_model=cfg.base_model, lora_rank=cfg.lora_rank, status="running")
        self.trainers: dict[str, Trainer] = {}
        self._profiles: dict[str, Any] = {}

    @property
    def account_id(self) -> str:
        return self.rlor_mgr.account_id

    # ---- trainers ------------------------------------------------------------------------------
    def shape_for(self, role: str) -> str | None:
        infra = self.cfg.infra
        if role != "policy" and infra.ref_training_shape_id:
            return infra.ref_training_shape_id
        return infra.training_shape_id or default_training_shape(self.cfg.base_model, self.cfg.lora_rank)

    def profile(self, shape: str):
        if shape not in self._profiles:
            self._profiles[shape] = self.rlor_mgr.resolve_training_profile(shape)
        return self._profiles[shape]

    def max_context_length(self) -> int | None:
        shape = self.shape_for("policy")
        if not shape:
            return None
        return getattr(self.profile(shape), "max_supported_context_length", None)

    def trainer(self, role: str = "policy", *, learning_rate: float, seed: int | None = None,
                lora_rank: int | None = None, new: bool = False) -> Trainer:
        """Create, or reconnect to, the trainer job recorded for `role`; connect a training client.

        `new=True` replaces the recorded job with a fresh one (the old one is deleted)."""
        from fireworks.training.sdk import FiretitanServiceClient

        lora_rank = self.cfg.lora_rank if lora_rank is None else lora_rank
        job_id = self.run.trainer_id(role)
        if new and job_id:
            self.delete_trainer(job_id)
            previous = list(self.run.get("previous_trainers") or []) + [job_id]
            self.run.update(previous_trainers=previous)
            job_id = None
        created = False
        if job_id:
            job = self.rlor_mgr.try_get(job_id)
            if job is None:   # recorded but the create request never landed: create it now
                endpoint = self._create(job_id, role, learning_rate, lora_rank)
                created = True
            else:
                state = job.get("state", "")
                if state in ("JOB_STATE_DELETED", "JOB_STATE_ARCHIVED"):
                    raise RecipeError(
                        f"the {role} trainer job {job_id!r} recorded in {self.run.path} is {state}: this run cannot "
                        "be resumed. Use a new log_path (to continue from one of its checkpoints, set "
                        f"init_from_checkpoint='{job_id}:<checkpoint-name>').")
                logger.info("reconnecting to %s trainer %s (%s)", role, job_id, state)
                endpoint = self.rlor_mgr.reconnect_and_wait(
                    job_id, poll_interval_s=self.cfg.infra.poll_interval_s, timeout_s=self.cfg.infra.trainer_timeout_s)
        else:
            job_id = f"{self.recipe}-{role[:3]}-{uuid.uuid4().hex[:8]}" if role != "policy" \
                else f"{self.recipe}-{uuid.uuid4().hex[:8]}"
            self.run.set_trainer_id(role, job_id)   # before the request: a kill from here on reconnects
            endpoint = self._create(job_id, role, learning_rate, lora_rank)
            created = True
        service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=self.api_key)
        client = service.create_training_client(base_model=self.cfg.base_model, lora_rank=lora_rank,
                                                seed=seed if lora_rank else None)
        trainer = Trainer(role, job_id, endpoint, service, client, created)
        self.trainers[role] = trainer
        return trainer

    def _create(self, job_id: str, role: str, learning_rate: float, lora_rank: int):
        from fireworks.training.sdk import TrainerJobConfig

        shape = self.shape_for(role)
        kwargs: dict[str, Any] = {}
        if shape:
            kwargs["training_shape_ref"] = self.profile(shape).training_shape
        config = TrainerJobConfig(base_model=self.cfg.base_model, lora_rank=lora_rank, learning_rate=learning_rate,
                                  display_name=f"{self.recipe} {role} ({Path(self.cfg.log_path).name})",
                                  requested_job_id=job_id, **kwargs)
        logger.info("creating %s trainer %s (shape %s)", role, job_id, shape)
        created = self.rlor_mgr.create(config)
        return self.rlor_mgr.wait_for_ready(created.job_id, poll_interval_s=self.cfg.infra.poll_interval_s,
                                            timeout_s=self.cfg.infra.trainer_timeout_s)

    def delete_trainer(self, job_id: str) -> None:
        for role, t in list(self.trainers.items()):
            if t.job_id == job_id:
                self._close(t)
                del self.trainers[role]
        self.rlor_mgr.delete(job_id)

    @staticmethod
    def _close(trainer: Trainer) -> None:
        try:
            trainer.service.close()
        except Exception as e:  # closing is best effort
            logger.debug("closing the service client of %s: %s", trainer.job_id, e)

    # ---- deployment (RL) ---------------------------------------------------------------------------
    def deployment(self, policy: Trainer) -> str:
        """Create (or get) the rollout deployment hot-loading from `policy`'s trainer and wait for it."""
        from fireworks.training.sdk import DeploymentConfig

        created_here = self.cfg.infra.deployment_id is None
        deployment_id = self.cfg.infra.deployment_id or f"{policy.job_id}-rollout"[:63]
        recorded = self.run.get("deployment_id")
        if recorded and recorded != deployment_id and self.run.get("deployment_created"):
            # the policy moved to a new trainer job: the old deployment hot-loads from the old one
            try:
                self.deploy_mgr.delete(recorded)
            except Exception as e:
                logger.warning("could not delete the previous rollout deployment %s: %s", recorded, e)
        self.run.update(deployment_id=deployment_id, deployment_created=created_here)
        self.deploy_mgr.create_or_get(DeploymentConfig(
            deployment_id=deployment_id, base_model=self.cfg.base_model, hot_load_trainer_job=policy.endpoint.job_name,
            min_replica_count=0, max_replica_count=1))
        self.deploy_mgr.wait_for_ready(deployment_id, timeout_s=self.cfg.infra.deployment_timeout_s,
                                       poll_interval_s=self.cfg.infra.poll_interval_s)
        return deployment_id

    def deployment_model(self, deployment_id: str) -> str:
        return f"accounts/{self.deploy_mgr.account_id}/deployments/{deployment_id}"

    # ---- models --------------------------------------------------------------------------------
    def get_model(self, model_id: str) -> dict | None:
        """The model `accounts/<account>/models/<model_id>`, or None (plain REST GET)."""
        import httpx

        r = httpx.get(f"{self.base_url}/v1/accounts/{self.account_id}/models/{model_id}",
                      headers={"Authorization": f"Bearer {self.api_key}"}, timeout=30)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.json()

    # ---- end of run ------------------------------------------------------------------------------
    def finish(self, summary: dict) -> None:
        """Mark the run completed and, with `cleanup_on_success`, delete the jobs it created."""
        self.run.update(status="completed", summary=summary)
        if self.cfg.infra.cleanup_on_success:
            if self.run.get("deployment_id") and self.run.get("deployment_created"):
                try:
                    self.deploy_mgr.delete(self.run.get("deployment_id"))
                except Exception as e:
                    logger.warning("could not delete deployment %s: %s", self.run.get("deployment_id"), e)
            for t in list(self.trainers.values()):
                self._close(t)
                try:
                    self.rlor_mgr.delete(t.job_id)
                except Exception as e:
                    logger.warning("could not delete trainer %s: %s", t.job_id, e)
            self.trainers.clear()
        self.close()

    def close(self) -> None:
        for t in self.trainers.values():
            self._close(t)


def completed_summary(log_path) -> dict | None:
    """The summary of a run that already completed in log_path (a rerun returns it without any work)."""
    try:
        rec = records.RunRecord.load(log_path)
    except records.RecordError:
        return None
    if rec.status == "completed":
        logger.info("the run in %s already completed: returning its summary (to train further, start a new "
                    "log_path with init_from_checkpoint='<job>:<checkpoint>')", log_path)
        return dict(rec.summary or {}, already_completed=True)
    return None


__all__ = ["RecipeInfra", "RunRecord", "Trainer", "RecipeError", "ConfigError", "check_run_record",
           "completed_summary"]
