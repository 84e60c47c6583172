"""The parts every recipe's main() shares, so that a recipe file holds only its own loop body.

    validate_or_raise(cfg, "sft", errors)                # + run.json checks; ConfigError listing all problems
    tokenizer, train_rows, eval_rows = read_datasets(cfg, "sft")
    with provision(cfg, "sft") as infra:                 # connect; fail fast when output_model_id is taken
        run = TrainingRun(infra, cfg, "sft", n_items=len(train), batch_size=cfg.batch_size)   # create / resume
        run.begin(evaluate)                              # step-0 evaluation of a fresh run
        run.train(train_step, desc="sft", postfix_keys=(...), evaluate=evaluate, eval_due=...)
        run.final_eval(evaluate, "eval/loss")
        return run.finish({...recipe's summary keys...})   # final save, promotion, run.json, cleanup

Lower-level pieces (used by TrainingRun, and by recipes that need them directly): `start_policy`,
`check_output_model`, `mark_training_started`, `finish_run`, `adam_params`, `scheduled_lr`.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from . import data as D
from .checkpoints import ResumeInfo, TrainingCheckpoints
from .config import ADAM_BETAS, ADAM_EPS, ConfigError, raise_if
from .infra import RecipeError, RecipeInfra, Trainer, check_run_record
from .logging import MetricsLog, read_metrics

logger = logging.getLogger("workbench.recipes")


def adam_params(learning_rate: float, *, weight_decay: float = 0.0, grad_clip_norm: float = 0.0):
    from fireworks.training.sdk import AdamParams

    return AdamParams(learning_rate=learning_rate, beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1], eps=ADAM_EPS,
                      weight_decay=weight_decay, grad_clip_norm=grad_clip_norm)


def scheduled_lr(base_lr: float, step: int, warmup_steps: int) -> float:
    """Linear warmup over `warmup_steps` optimizer steps (step is 1-based), then constant."""
    if warmup_steps and step <= warmup_steps:
        return base_lr * step / warmup_steps
    return base_lr


def validate_or_raise(cfg, recipe: str, errors: list[str]) -> None:
    """Adds the checks against the run already recorded in log_path to `errors` (a recipe's
    `check_common` + own checks), then raises one ConfigError listing them all, if any."""
    if cfg.log_path:
        errors += check_run_record(cfg, recipe)
    raise_if(errors, recipe)


def read_datasets(cfg, kind: str):
    """(tokenizer, train rows, eval rows): the chat tokenizer, `cfg.dataset` checked as `kind` rows ("sft",
    "rl" or "preference"), and `cfg.evaluation_dataset` or else a seeded carve-out of the training rows."""
    tokenizer = D.load_recipe_tokenizer(cfg.tokenizer_model, cfg.base_model)
    rows = D.read_jsonl(cfg.dataset)
    D.check_rows(rows, kind, cfg.dataset)
    eval_given = None
    if cfg.evaluation_dataset:
        eval_given = D.read_jsonl(cfg.evaluation_dataset)
        D.check_rows(eval_given, kind, cfg.evaluation_dataset)
    train_rows, eval_rows = D.split_eval(rows, cfg.seed, eval_given)
    return tokenizer, train_rows, eval_rows


@contextmanager
def provision(cfg, recipe: str) -> Iterator[RecipeInfra]:
    """The backend connection and run.json of one invocation; its trainer clients are closed on the way out
    (also on failure: the jobs themselves stay, so a rerun reconnects to them)."""
    infra = RecipeInfra(cfg, recipe)
    try:
        check_output_model(infra, cfg)
        yield infra
    finally:
        infra.close()


def check_output_model(infra: RecipeInfra, cfg) -> None:
    """output_model_id must be free, or already promoted from this very run (a rerun after completion)."""
    if not cfg.output_model_id:
        return
    model = infra.get_model(cfg.output_model_id)
    if model is None:
        return
    source = model.get("sourceCheckpoint") or ""
    mine = [f"/rlorTrainerJobs/{job}/" for job in (infra.run.get("trainers") or {}).values()]
    if not any(m in source for m in mine):
        raise ConfigError(f"output_model_id={cfg.output_model_id!r}: model {model.get('name')} already exists "
                          f"(promoted from {source or 'elsewhere'}); choose another output_model_id")


def start_policy(infra: RecipeInfra, cfg) -> tuple[Trainer, TrainingCheckpoints, ResumeInfo | None]:
    """Create or reconnect to the policy trainer and load what the run continues from.

    A reconnected trainer that already trained in an earlier invocation but has no resumable checkpoint
    of this run (dcp_save_interval=0, or killed before the first save) holds weights that match no
    recorded data cursor: the run then starts over on a NEW trainer job (the old one is deleted), so a
    fresh start really starts from the base model."""
    policy = infra.trainer("policy", learning_rate=cfg.learning_rate, seed=cfg.seed)
    ckpt = _checkpoints(infra, cfg, policy)
    info = ckpt.resume(init_from_checkpoint=cfg.init_from_checkpoint,
                       warm_start_from_adapter=cfg.warm_start_from_adapter)
    if info is None and not policy.created and infra.run.get("training_started"):
        logger.warning("trainer %s trained in an earlier attempt but has no resumable checkpoint of this run: "
                       "starting over on a new trainer job (set weight_sync.dcp_save_interval to resume mid-run)",
                       policy.job_id)
        policy = infra.trainer("policy", learning_rate=cfg.learning_rate, seed=cfg.seed, new=True)
        ckpt = _checkpoints(infra, cfg, policy)
        ckpt.reset_dataloader()
        infra.run.update(training_started=False)
        info = ckpt.resume(init_from_checkpoint=cfg.init_from_checkpoint,
                           warm_start_from_adapter=cfg.warm_start_from_adapter)
    return policy, ckpt, info


def _checkpoints(infra: RecipeInfra, cfg, policy: Trainer) -> TrainingCheckpoints:
    return TrainingCheckpoints(policy.client, infra.rlor_mgr, trainer_id=policy.job_id, log_path=cfg.log_path,
                               lora_rank=cfg.lora_rank, save_every=cfg.weight_sync.dcp_save_interval,
                               dcp_timeout=cfg.weight_sync.dcp_timeout)


def mark_training_started(infra: RecipeInfra) -> None:
    """Recorded before the first gradient reaches the trainer (see start_policy)."""
    if not infra.run.get("training_started"):
        infra.run.update(training_started=True)


def finish_run(infra: RecipeInfra, ckpt: TrainingCheckpoints, cfg, *, step: int, data_consumed: int,
               summary: dict) -> dict:
    """Final save (resumable + promotable), promotion when output_model_id is set, run.json completed,
    cleanup. Returns the summary with `final_checkpoint`, `sampler_checkpoint` and `model` filled in."""
    saved = ckpt.save(f"step-{step}", resumable=True, promotable=True, data_consumed=data_consumed)
    summary["final_checkpoint"] = saved["resumable"]
    summary["sampler_checkpoint"] = saved["promotable"]
    summary["model"] = None
    if cfg.output_model_id:
        existing = infra.get_model(cfg.output_model_id)
        if existing is not None and f"/rlorTrainerJobs/{ckpt.trainer_id}/" in (existing.get("sourceCheckpoint") or ""):
            summary["model"] = existing        # promoted by an earlier attempt of this run
        elif existing is not None:
            raise RecipeError(f"output_model_id={cfg.output_model_id!r} was taken while the run was training")
        else:
            summary["model"] = ckpt.promote_latest(cfg.output_model_id, cfg.base_model)
    infra.finish(summary)
    return summary


class TrainingRun:
    """One invocation of a recipe's optimizer loop, from the (created or resumed) policy trainer to the
    final summary: the data cursor, the step counter, metrics.jsonl, periodic checkpoints and evaluations.

    The recipe supplies what is its own: `train_step(idx, lr, step)` (one optimizer step on the rows
    `idx` of its training data, returning that step's metrics) and `evaluate()` (held-out metrics).
    `step` counts optimizer steps, `consumed` the training rows (or pairs, prompts) used so far; both are
    restored from the checkpoint a resumed run continues from."""

    def __init__(self, infra: RecipeInfra, cfg, recipe: str, *, n_items: int, batch_size: int):
        self.infra, self.cfg, self.recipe = infra, cfg, recipe
        self.policy, self.ckpt, self.info = start_policy(infra, cfg)
        self.client = self.policy.client
        info = self.info
        self.step, self.consumed = (info.step, info.data_consumed) if info else (0, 0)
        self.start_step = self.step
        self.schedule = D.EpochSchedule(n_items, batch_size, cfg.epochs, cfg.seed)
        self.total = self.schedule.total_steps if cfg.max_steps is None else min(self.schedule.total_steps,
                                                                                 cfg.max_steps)
        self.log = MetricsLog(cfg.log_path)
        self.log.truncate_after(self.step)   # a resumed run redoes the steps after its checkpoint
        self.first_eval: dict | None = None
        self.last_eval: dict | None = None
        self.t_start = time.time()

    def begin(self, evaluate: Callable[[], dict] | None) -> None:
        """The step-0 evaluation of a fresh run (a resumed one already logged it), then record in run.json
        that gradients are about to reach the trainer (see start_policy)."""
        if self.step == 0 and evaluate is not None:
            self.first_eval = self.log.write(0, evaluate())
        mark_training_started(self.infra)

    def train(self, train_step: Callable[[list[int], float, int], dict], *, desc: str, postfix_keys: tuple[str, ...],
              evaluate: Callable[[], dict] | None, eval_due: Callable[[int, int], bool]) -> None:
        """Steps until `total`: each one train_step, its metrics line, an evaluation when eval_due(step,
        consumed) or at the last step, and a resumable `step-N` checkpoint at the save cadence."""
        cfg = self.cfg
        self.t_start = time.time()
        with self.log.progress(total=self.total, initial=min(self.step, self.total), desc=desc,
                               postfix_keys=postfix_keys) as bar:
            while self.step < self.total:
                epoch, idx = self.schedule.next_batch(self.consumed)
                if not idx:
                    break
                t0 = time.time()
                lr = scheduled_lr(cfg.learning_rate, self.step + 1, cfg.warmup_steps)
                metrics = train_step(idx, lr, self.step + 1)
                self.step += 1
                self.consumed += len(idx)
                metrics.update({"epoch": epoch, "data_consumed": self.consumed, "learning_rate": lr,
                                "time/step_s": time.time() - t0})
                if evaluate is not None and (eval_due(self.step, self.consumed) or self.step == self.total):
                    metrics.update(evaluate())
                    self.last_eval = metrics
                self.log.write(self.step, metrics)
                bar.update(1)
                # the last step's checkpoint is finish()'s final save (resumable and promotable)
                if self.ckpt.should_save(self.step) and self.step < self.total:
                    self.ckpt.save(f"step-{self.step}", resumable=True, promotable=False,
                                   data_consumed=self.consumed)

    def final_eval(self, evaluate: Callable[[], dict] | None, key: str) -> None:
        """Evaluate the final weights unless the last step did; `first_eval` of a resumed run is read back
        from metrics.jsonl (its step-0 line carrying `key`)."""
        if evaluate is not None and self.last_eval is None:
            self.last_eval = self.log.write(self.step, evaluate())
        if self.first_eval is None:
            self.first_eval = next((r for r in read_metrics(self.cfg.log_path) if r["step"] == 0 and key in r), None)

    def finish(self, summary: dict) -> dict:
        """The run's summary (the common keys around the recipe's own `summary`), after the final save,
        promotion, run.json completed and cleanup (see finish_run)."""
        info = self.info
        full = {
            "recipe": self.recipe, "log_path": str(self.cfg.log_path), "trainer_job_id": self.policy.job_id,
            "resumed_from": info.checkpoint if info else None, "resume_source": info.source if info else None,
            "start_step": self.start_step, "steps": self.step, "data_consumed": self.consumed,
            **summary,
            "train_seconds": time.time() - self.t_start,
        }
        return finish_run(self.infra, self.ckpt, self.cfg, step=self.step, data_consumed=self.consumed, summary=full)
