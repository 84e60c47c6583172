"""GRPO reinforcement learning: sample through a deployment, score, update with `forward_backward_custom`.

    from workbench.recipes.rl_loop import Config, main
    from workbench.recipes.utils import WeightSyncConfig

    summary = main(Config(log_path="./runs/grpo", init_from_checkpoint="sft-1a2b3c4d:step-40",
                          completions_per_prompt=8, prompt_groups_per_step=8,
                          weight_sync=WeightSyncConfig(weight_sync_interval=1, dcp_save_interval=10)))

Each step:
1. takes `prompt_groups_per_step` prompts (`{"messages": [...], "ground_truth": ...}` rows; epoch e in
   `random.Random(seed + e)` order) and samples `completions_per_prompt` completions of each through the
   rollout deployment with `DeploymentSampler.sample_with_tokens(..., logprobs=True)`; every request
   carries its own seed derived from (seed, prompt position, k), so rollouts are reproducible;
2. scores them with `reward_fn(completion_text, row)` (default: the integer inside `<answer>...</answer>`
   equals `ground_truth`) and z-scores rewards within each group; groups whose rewards are all equal
   are dropped (they carry no signal), as are groups with a failed sample;
3. runs `forward_backward_custom` with the GRPO loss (utils/losses.py: clipped ratio, truncated importance
   weight against the deployment's sampling logprobs, k3 KL to the reference) and one `optim_step`
   normalized by the number of loss tokens (`grad_accumulation_normalization`);
4. every `weight_sync_interval` steps (and after the last one) hot-loads the policy into the deployment
   with `WeightSyncer.save_and_hotload("step-N")` (a base snapshot first, XOR deltas after).

Reference for the KL term (kl_beta > 0): the policy as the run first started, frozen. From the base model
that is a base-only client on the policy trainer (`create_base_training_client`, the frozen base weights,
no second job); from `init_from_checkpoint` / `warm_start_from_adapter` it is a second trainer job
(role "reference" in run.json) loaded with the same weights, used for forward passes only. Reusing
the policy's own forward at the start of the step would make the KL term identically zero.

The deployment `<trainer-job-id>-rollout` is created by the recipe (unless `infra.deployment_id` names
one) and linked to the trainer with `hot_load_trainer_job`. A resumed or warm-started run hot-loads the
policy before its first step, so rollouts never come from stale weights.

Evaluation: mean reward on held-out prompts (`evaluation_dataset`, else a seeded carve-out of
min(10%, 100) prompts), `completions_per_prompt` samples each with fixed seeds (the same draws before
and after training, so the comparison is paired), before training, every `eval_interval` steps, at the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from workbench.recipes.utils import data as D
from workbench.recipes.utils.config import (DEFAULT_BASE_MODEL, InfraConfig, WeightSyncConfig, check_common,
                                            parse_checkpoint_ref, raise_if)
from workbench.recipes.utils.infra import RecipeInfra, check_run_record, completed_summary
from workbench.recipes.utils.logging import MetricsLog, read_metrics
from workbench.recipes.utils.loop import (adam_params, check_output_model, finish_run, mark_training_started,
                                          scheduled_lr, start_policy)
from workbench.recipes.utils.losses import GrpoSample, arithmetic_reward, group_advantages, make_grpo_loss

logger = logging.getLogger("workbench.recipes.rl")

RECIPE = "rl"
_SEED_MOD = 2 ** 31 - 1


@dataclass
class Config:
    log_path: str
    """Directory of this run: run.json (trainer, deployment), dataloader.json, metrics.jsonl."""

    base_model: str = DEFAULT_BASE_MODEL
    """Model to train (the deployment serves the same base)."""

    dataset: str = str(D.ARITHMETIC_RL)
    """Prompt JSONL: `{"messages": [...], "ground_truth": ...}` per line."""

    evaluation_dataset: str | None = None
    """Held-out prompts in the same format. None: a seeded carve-out of min(10%, 100) prompts."""

    tokenizer_model: str | None = None
    """Tokenizer for the chat template (catalog name or local HF directory). None: base_model's."""

    reward_fn: Callable[[str, dict], float] | None = None
    """(completion text, dataset row) -> reward. None: 1.0 when `<answer>N</answer>` has N == ground_truth."""

    learning_rate: float = 2e-3
    """Adam learning rate (after warmup). The default suits the embedded 1M-parameter model; real models
    want ~1e-6 to 1e-5."""

    warmup_steps: int = 0
    """Linear learning-rate warmup over this many optimizer steps."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    grad_clip_norm: float = 0.0
    """Clip the (normalized) gradient to this global norm; 0 = no clipping."""

    kl_beta: float = 0.001
    """Weight of the k3 KL penalty to the frozen reference; 0 = no reference at all."""

    completions_per_prompt: int = 4
    """Group size: completions sampled per prompt (>= 2, advantages are relative within a group)."""

    prompt_groups_per_step: int = 1
    """Prompts (groups) per optimizer step."""

    max_completion_tokens: int = 64
    """Maximum tokens sampled per completion."""

    temperature: float = 1.0
    """Sampling temperature of the rollouts (and of the evaluation samples)."""

    eps_clip: float = 0.2
    """PPO ratio clip: ratio is clipped to [1 - eps_clip, 1 + eps_clip_high]."""

    eps_clip_high: float | None = None
    """Upper clip (None: eps_clip)."""

    tis_cap: float = 5.0
    """Truncated importance sampling: weight min(exp(old_logp - inference_logp), tis_cap)."""

    grad_accumulation_normalization: str | None = "num_loss_tokens"
    """optim_step normalization of the raw-sum GRPO loss: "num_loss_tokens", "num_sequences" or None."""

    epochs: int = 1
    """Passes over the prompts."""

    max_steps: int | None = None
    """Stop after this many optimizer steps in total."""

    eval_interval: int = 0
    """Evaluate every N steps (0: only before training and at the end)."""

    lora_rank: int = 0
    """0 = full-parameter training; > 0 = LoRA of that rank."""

    seed: int = 0
    """Seeds the prompt order, the rollout and evaluation sampling, the eval carve-out and LoRA init."""

    output_model_id: str | None = None
    """Promote the final checkpoint to this model id at the end."""

    init_from_checkpoint: str | None = None
    """"job-id:checkpoint-name" to start from (e.g. an SFT checkpoint); also becomes the KL reference."""

    warm_start_from_adapter: str | None = None
    """LoRA only: a PEFT adapter to start from (weights only); also becomes the KL reference."""

    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """Weight-sync interval, DCP save cadence, timeouts."""

    infra: InfraConfig = field(default_factory=InfraConfig)
    """Training shapes, deployment, timeouts, cleanup."""


def validate(cfg: Config) -> None:
    errors = check_common(cfg, datasets=("dataset", "evaluation_dataset"))

    def num(name, low, *, low_open=False, high=None):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (v <= low if low_open else v < low) \
                or (high is not None and v > high):
            bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            errors.append(f"{name} must be a number {bound} (got {v!r})")

    def integer(name, low):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            errors.append(f"{name} must be an integer >= {low} (got {v!r})")

    integer("completions_per_prompt", 2)
    if isinstance(cfg.completions_per_prompt, int) and cfg.completions_per_prompt < 2:
        errors[-1] += ": GRPO advantages are relative within a group, a group of one has no signal"
    integer("prompt_groups_per_step", 1)
    integer("max_completion_tokens", 1)
    integer("eval_interval", 0)
    integer("warmup_steps", 0)
    num("kl_beta", 0)
    num("temperature", 0, low_open=True)
    num("eps_clip", 0, low_open=True, high=1)
    if cfg.eps_clip_high is not None:
        num("eps_clip_high", 0, low_open=True)
    num("tis_cap", 0, low_open=True)
    num("weight_decay", 0)
    num("grad_clip_norm", 0)
    if cfg.grad_accumulation_normalization not in (None, "none", "num_loss_tokens", "num_sequences"):
        errors.append("grad_accumulation_normalization must be None, 'none', 'num_loss_tokens' or 'num_sequences' "
                      f"(got {cfg.grad_accumulation_normalization!r})")
    if cfg.reward_fn is not None and not callable(cfg.reward_fn):
        errors.append("reward_fn must be callable (completion_text, row) -> float")
    if cfg.log_path:
        errors += check_run_record(cfg, RECIPE)
    raise_if(errors, RECIPE)


# ---- rollouts ------------------------------------------------------------------------------------------
def _sample(sampler, requests: list[tuple[list[dict], int]], cfg: Config, max_len: int | None) -> list:
    """One completion per (messages, seed) request, concurrently; an exception stands for a failed sample."""
    async def run():
        return await asyncio.gather(*[
            sampler.sample_with_tokens(messages=messages, n=1, max_tokens=cfg.max_completion_tokens,
                                       temperature=cfg.temperature, max_seq_len=max_len, logprobs=True, seed=seed)
            for messages, seed in requests], return_exceptions=True)

    out = []
    for r in _run_async(run):
        if isinstance(r, BaseException):
            logger.warning("a rollout failed: %s", r)
            out.append(r)
        elif not r:
            out.append(ValueError("prompt longer than max_seq_len"))
        else:
            out.append(r[0])
    return out


def _run_async(make_coro):
    """Run a coroutine to completion from sync code, also inside a notebook whose event loop is running
    (there asyncio.run would refuse: the coroutine then runs on a fresh loop in a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()


def _text(tokenizer, completion) -> str:
    return tokenizer.decode(completion.full_tokens[completion.prompt_len:], skip_special_tokens=False)


def _behaviour_logprobs(completion) -> list[float]:
    """The deployment's sampling logprobs of the completion tokens (raw logprobs where none is given)."""
    sampling = completion.sampling_logprobs or []
    raw = completion.inference_logprobs or []
    n = len(completion.full_tokens) - completion.prompt_len
    if len(sampling) == n and all(v is not None for v in sampling):
        return [float(v) for v in sampling]
    if len(raw) == n:
        return [float(s if s is not None else r) for s, r in zip(sampling or [None] * n, raw)]
    raise RuntimeError(f"the deployment returned {len(raw)} logprobs for {n} completion tokens "
                       "(rollouts need logprobs=True)")


def _datum(tokens: list[int]):
    from fireworks.training.sdk import Datum, ModelInput, TensorData

    return Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                 loss_fn_inputs={"target_tokens": TensorData(data=tokens[1:], dtype="int64", shape=[len(tokens) - 1])})


def _seed(*parts: int) -> int:
    value = 1469598103
    for p in parts:
        value = (value * 1000003 + int(p)) % _SEED_MOD
    return value


def evaluate(sampler, tokenizer, cfg: Config, rows: list[dict], reward_fn, max_len) -> dict:
    """Mean reward on held-out prompts; fixed seeds, so every evaluation draws the same random numbers."""
    requests = [(row["messages"], _seed(cfg.seed, 7, i, k)) for i, row in enumerate(rows)
                for k in range(cfg.completions_per_prompt)]
    results = _sample(sampler, requests, cfg, max_len)
    rewards = []
    for (i, row), group in zip(enumerate(rows), _chunks(results, cfg.completions_per_prompt)):
        rewards += [0.0 if isinstance(c, BaseException) else float(reward_fn(_text(tokenizer, c), row)) for c in group]
    n = max(len(rewards), 1)
    return {"eval/reward": sum(rewards) / n, "eval/samples": len(rewards),
            "eval/any_correct": sum(any(r > 0 for r in g) for g in _chunks(rewards, cfg.completions_per_prompt))
            / max(len(rows), 1)}


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _reference(infra: RecipeInfra, cfg: Config, policy):
    """The frozen KL reference client (None when kl_beta == 0) and a description of it."""
    if cfg.kl_beta <= 0:
        return None, "none (kl_beta = 0)"
    if cfg.init_from_checkpoint or cfg.warm_start_from_adapter:
        ref = infra.trainer("reference", learning_rate=0.0, seed=cfg.seed)
        if cfg.init_from_checkpoint:
            job_id, name = parse_checkpoint_ref(cfg.init_from_checkpoint)
            ref.client.load_state(ref.client.resolve_checkpoint_path(name, source_job_id=job_id)).result(
                timeout=cfg.weight_sync.dcp_timeout)
            source = cfg.init_from_checkpoint
        else:
            ref.client.load_adapter(cfg.warm_start_from_adapter).result(timeout=cfg.weight_sync.dcp_timeout)
            source = cfg.warm_start_from_adapter
        return ref.client, f"trainer {ref.job_id} holding {source}"
    return policy.service.create_base_training_client(cfg.base_model), "frozen base model (base-only client)"


# ---- main --------------------------------------------------------------------------------------------
def main(cfg: Config) -> dict:
    """Run (or resume) the GRPO loop; returns the summary."""
    from fireworks.training.sdk import AdaptiveConcurrencyController, DeploymentSampler

    from workbench.sdk import WeightSyncer

    validate(cfg)
    done = completed_summary(cfg.log_path)
    if done is not None:
        return done
    reward_fn = cfg.reward_fn or arithmetic_reward
    tokenizer = D.load_recipe_tokenizer(cfg.tokenizer_model, cfg.base_model)
    rows = D.read_jsonl(cfg.dataset)
    D.check_rows(rows, "rl", cfg.dataset)
    eval_given = None
    if cfg.evaluation_dataset:
        eval_given = D.read_jsonl(cfg.evaluation_dataset)
        D.check_rows(eval_given, "rl", cfg.evaluation_dataset)
    train_rows, eval_rows = D.split_eval(rows, cfg.seed, eval_given)

    infra = RecipeInfra(cfg, RECIPE)
    try:
        check_output_model(infra, cfg)
        max_len = infra.max_context_length()
        policy, ckpt, info = start_policy(infra, cfg)
        client = policy.client
        deployment_id = infra.deployment(policy)
        reference, reference_desc = _reference(infra, cfg, policy)
        infra.run.update(reference=reference_desc)
        ws = cfg.weight_sync
        syncer = WeightSyncer(policy_client=client, deploy_mgr=infra.deploy_mgr, deployment_id=deployment_id,
                              base_model=cfg.base_model, hotload_timeout=ws.weight_sync_timeout,
                              first_checkpoint_type=ws.first_checkpoint_type, dcp_timeout=ws.dcp_timeout)
        sampler = DeploymentSampler(inference_url=infra.base_url, model=infra.deployment_model(deployment_id),
                                    api_key=infra.api_key, tokenizer=tokenizer,
                                    concurrency_controller=AdaptiveConcurrencyController(initial_window=16))

        step, consumed = (info.step, info.data_consumed) if info else (0, 0)
        schedule = D.EpochSchedule(len(train_rows), cfg.prompt_groups_per_step, cfg.epochs, cfg.seed)
        total = schedule.total_steps if cfg.max_steps is None else min(schedule.total_steps, cfg.max_steps)
        log = MetricsLog(cfg.log_path)
        log.truncate_after(step)

        last_snapshot = None
        if info is not None or ws.weight_sync_before_training or cfg.infra.deployment_id:
            last_snapshot = syncer.save_and_hotload(f"step-{step}")
            logger.info("synced the policy at step %d into %s (%s)", step, deployment_id, last_snapshot)
        first_eval = last_eval = None
        if step == 0 and eval_rows:
            first_eval = log.write(0, evaluate(sampler, tokenizer, cfg, eval_rows, reward_fn, max_len))
        mark_training_started(infra)

        normalization = cfg.grad_accumulation_normalization
        normalization = None if normalization in (None, "none") else normalization
        dirty = False
        t_start, start_step = time.time(), step
        with log.progress(total=total, initial=min(step, total), desc="grpo",
                          postfix_keys=("rollout/reward", "eval/reward")) as bar:
            while step < total:
                epoch, idx = schedule.next_batch(consumed)
                if not idx:
                    break
                t0 = time.time()
                n = cfg.completions_per_prompt
                requests = [(train_rows[i]["messages"], _seed(cfg.seed, consumed + j, k))
                            for j, i in enumerate(idx) for k in range(n)]
                results = _sample(sampler, requests, cfg, max_len)
                t_sample = time.time() - t0

                samples, datums, all_rewards, lengths, truncated, failed, dropped = [], [], [], [], 0, 0, 0
                for i, group in zip(idx, _chunks(results, n)):
                    if any(isinstance(c, BaseException) for c in group):
                        failed += sum(isinstance(c, BaseException) for c in group)
                        dropped += 1
                        continue
                    rewards = [float(reward_fn(_text(tokenizer, c), train_rows[i])) for c in group]
                    all_rewards += rewards
                    lengths += [len(c.full_tokens) - c.prompt_len for c in group]
                    truncated += sum(c.finish_reason == "length" for c in group)
                    advantages = group_advantages(rewards)
                    if advantages is None:
                        dropped += 1
                        continue
                    for c, a in zip(group, advantages):
                        samples.append(GrpoSample(a, c.prompt_len - 1, _behaviour_logprobs(c)))
                        datums.append(_datum(list(c.full_tokens)))

                metrics: dict = {"rollout/reward": sum(all_rewards) / max(len(all_rewards), 1),
                                 "rollout/groups": len(idx), "rollout/groups_dropped": dropped,
                                 "rollout/samples_failed": failed,
                                 "rollout/response_len": sum(lengths) / max(len(lengths), 1),
                                 "rollout/truncated_frac": truncated / max(len(lengths), 1),
                                 "time/sample_s": t_sample}
                lr = scheduled_lr(cfg.learning_rate, step + 1, cfg.warmup_steps)
                if datums:
                    if reference is not None:
                        out = reference.forward(datums, "cross_entropy").result()
                        for s, o in zip(samples, out.loss_fn_outputs):
                            s.ref_logprobs = list(o["logprobs"].data)[s.response_start:]
                    loss_fn = make_grpo_loss(samples, kl_beta=cfg.kl_beta, eps_clip=cfg.eps_clip,
                                             eps_clip_high=cfg.eps_clip_high, tis_cap=cfg.tis_cap)
                    fb = client.forward_backward_custom(datums, loss_fn).result()
                    opt = client.optim_step(adam_params(lr, weight_decay=cfg.weight_decay,
                                                        grad_clip_norm=cfg.grad_clip_norm),
                                            grad_accumulation_normalization=normalization).result()
                    metrics.update({k: v for k, v in fb.metrics.items() if k.startswith("grpo/")})
                    if opt.metrics and "grad_norm:mean" in opt.metrics:
                        metrics["train/grad_norm"] = opt.metrics["grad_norm:mean"]
                    dirty = True
                step += 1
                consumed += len(idx)
                if dirty and (step % ws.weight_sync_interval == 0 or step == total):
                    t1 = time.time()
                    last_snapshot = syncer.save_and_hotload(f"step-{step}")
                    metrics.update({"sync/snapshot": last_snapshot, "time/sync_s": time.time() - t1})
                    dirty = False
                metrics.update({"epoch": epoch, "data_consumed": consumed, "learning_rate": lr,
                                "time/step_s": time.time() - t0})
                if eval_rows and ((cfg.eval_interval and step % cfg.eval_interval == 0) or step == total):
                    if dirty:   # evaluate what the policy is now, not the last synced snapshot
                        last_snapshot = syncer.save_and_hotload(f"step-{step}")
                        metrics["sync/snapshot"] = last_snapshot
                        dirty = False
                    metrics.update(evaluate(sampler, tokenizer, cfg, eval_rows, reward_fn, max_len))
                    last_eval = metrics
                log.write(step, metrics)
                bar.update(1)
                if ckpt.should_save(step) and step < total:
                    ckpt.save(f"step-{step}", resumable=True, promotable=False, data_consumed=consumed)

        if dirty:
            last_snapshot = syncer.save_and_hotload(f"step-{step}")
        if eval_rows and last_eval is None:
            last_eval = log.write(step, evaluate(sampler, tokenizer, cfg, eval_rows, reward_fn, max_len))
        if first_eval is None:
            first_eval = next((r for r in read_metrics(cfg.log_path) if r["step"] == 0 and "eval/reward" in r), None)
        train_rewards = [r["rollout/reward"] for r in read_metrics(cfg.log_path) if "rollout/reward" in r]
        k = max(1, len(train_rewards) // 4)
        summary = {
            "recipe": RECIPE, "log_path": str(cfg.log_path), "trainer_job_id": policy.job_id,
            "deployment_id": deployment_id, "reference": reference_desc, "last_snapshot": last_snapshot,
            "resumed_from": info.checkpoint if info else None, "resume_source": info.source if info else None,
            "start_step": start_step, "steps": step, "data_consumed": consumed,
            "train_prompts": len(train_rows), "eval_prompts": len(eval_rows),
            "eval_reward_before": first_eval.get("eval/reward") if first_eval else None,
            "eval_reward_after": last_eval.get("eval/reward") if last_eval else None,
            "train_reward_first_quarter": sum(train_rewards[:k]) / k if train_rewards else None,
            "train_reward_last_quarter": sum(train_rewards[-k:]) / k if train_rewards else None,
            "train_seconds": time.time() - t_start,
        }
        return finish_run(infra, ckpt, cfg, step=step, data_consumed=consumed, summary=summary)
    finally:
        infra.close()


if __name__ == "__main__":
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log-path", required=True)
    p.add_argument("--dataset", default=Config.dataset)
    p.add_argument("--init-from-checkpoint")
    p.add_argument("--learning-rate", type=float, default=Config.learning_rate)
    p.add_argument("--kl-beta", type=float, default=Config.kl_beta)
    p.add_argument("--completions-per-prompt", type=int, default=Config.completions_per_prompt)
    p.add_argument("--prompt-groups-per-step", type=int, default=Config.prompt_groups_per_step)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--output-model-id")
    a = p.parse_args()
    print(main(Config(log_path=a.log_path, dataset=a.dataset, init_from_checkpoint=a.init_from_checkpoint,
                      learning_rate=a.learning_rate, kl_beta=a.kl_beta, completions_per_prompt=a.completions_per_prompt,
                      prompt_groups_per_step=a.prompt_groups_per_step, max_steps=a.max_steps,
                      output_model_id=a.output_model_id)))
