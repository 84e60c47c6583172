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
   carries its own seed derived from (seed, prompt position, k), so a rerun or a resumed run samples the
   same tokens (and, with `reproducible_rollouts`, the same logprobs to the bit: see that field);
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
from dataclasses import dataclass
from typing import Callable

from workbench.common import run_async as _run_async
from workbench.recipes.utils import data as D
from workbench.recipes.utils.config import (RecipeConfig, WeightSyncConfig, check_common, check_integer, check_number,
                                            parse_checkpoint_ref)
from workbench.recipes.utils.infra import RecipeInfra, completed_summary
from workbench.recipes.utils.logging import read_metrics
from workbench.recipes.utils.loop import TrainingRun, adam_params, provision, read_datasets, validate_or_raise
from workbench.recipes.utils.losses import GrpoSample, arithmetic_reward, group_advantages, make_grpo_loss

logger = logging.getLogger("workbench.recipes.rl")

RECIPE = "rl"
_SEED_MOD = 2 ** 31 - 1


@dataclass
class Config(RecipeConfig):
    """GRPO settings; the fields every recipe shares (and their docs) are in `utils.config.RecipeConfig`."""

    dataset: str = str(D.ARITHMETIC_RL)
    """Prompt JSONL: `{"messages": [...], "ground_truth": ...}` per line."""

    reward_fn: Callable[[str, dict], float] | None = None
    """(completion text, dataset row) -> reward. None: 1.0 when `<answer>N</answer>` has N == ground_truth."""

    learning_rate: float = 2e-3
    """Adam learning rate (after warmup); see RecipeConfig. Real models want ~1e-6 to 1e-5."""

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

    eval_interval: int = 0
    """Evaluate every N steps (0: only before training and at the end)."""

    reproducible_rollouts: bool = False
    """Send the rollout and evaluation requests one at a time instead of concurrently. A deployment batches
    concurrent requests together, and its logprobs (which the TIS weight uses) then depend in their last
    bits on what else shared the batch, so two runs of the same config -- or a run and its resumption after
    a kill -- agree only up to float rounding (~1e-7 in the logprobs, which Adam carries into every weight).
    One request at a time, each sequence is computed alone and the whole run reproduces bit for bit. Slower:
    the deployment no longer batches."""


def validate(cfg: Config) -> None:
    """Every config problem at once, as a ConfigError, before any backend call."""
    validate_or_raise(cfg, RECIPE, config_errors(cfg))


def config_errors(cfg: Config) -> list[str]:
    """The problems of a GRPO config (without the run.json checks, which depend on the recipe name)."""
    errors = check_common(cfg)
    check_integer(errors, "completions_per_prompt", cfg.completions_per_prompt, 2)
    if isinstance(cfg.completions_per_prompt, int) and cfg.completions_per_prompt < 2:
        errors[-1] += ": GRPO advantages are relative within a group, a group of one has no signal"
    check_integer(errors, "prompt_groups_per_step", cfg.prompt_groups_per_step)
    check_integer(errors, "max_completion_tokens", cfg.max_completion_tokens)
    check_integer(errors, "eval_interval", cfg.eval_interval, 0)
    check_number(errors, "kl_beta", cfg.kl_beta, low=0)
    check_number(errors, "temperature", cfg.temperature, low=0, low_open=True)
    check_number(errors, "eps_clip", cfg.eps_clip, low=0, low_open=True, high=1)
    if cfg.eps_clip_high is not None:
        check_number(errors, "eps_clip_high", cfg.eps_clip_high, low=0, low_open=True)
    check_number(errors, "tis_cap", cfg.tis_cap, low=0, low_open=True)
    check_number(errors, "weight_decay", cfg.weight_decay, low=0)
    check_number(errors, "grad_clip_norm", cfg.grad_clip_norm, low=0)
    if cfg.grad_accumulation_normalization not in (None, "none", "num_loss_tokens", "num_sequences"):
        errors.append("grad_accumulation_normalization must be None, 'none', 'num_loss_tokens' or 'num_sequences' "
                      f"(got {cfg.grad_accumulation_normalization!r})")
    if not isinstance(cfg.reproducible_rollouts, bool):
        errors.append(f"reproducible_rollouts must be True or False (got {cfg.reproducible_rollouts!r})")
    if cfg.reward_fn is not None and not callable(cfg.reward_fn):
        errors.append("reward_fn must be callable (completion_text, row) -> float")
    return errors


# ---- rollouts ------------------------------------------------------------------------------------------
async def gather(coros: list, one_at_a_time: bool) -> list:
    """asyncio.gather(..., return_exceptions=True), or the same awaited in order, one at a time
    (`reproducible_rollouts`)."""
    if not one_at_a_time:
        return await asyncio.gather(*coros, return_exceptions=True)
    out = []
    for c in coros:
        try:
            out.append(await c)
        except Exception as e:      # as gather(return_exceptions=True): a failed request stands for itself
            out.append(e)
    return out


def _sample(sampler, requests: list[tuple[list[dict], int]], cfg: Config, max_len: int | None) -> list:
    """One completion per (messages, seed) request (concurrently unless `reproducible_rollouts`); an exception
    stands for a failed sample."""
    async def run():
        return await gather([
            sampler.sample_with_tokens(messages=messages, n=1, max_tokens=cfg.max_completion_tokens,
                                       temperature=cfg.temperature, max_seq_len=max_len, logprobs=True, seed=seed)
            for messages, seed in requests], cfg.reproducible_rollouts)

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


# ---- one step: collect (sample + score) and update --------------------------------------------------
@dataclass
class Batch:
    """The scored rollouts of one optimizer step."""

    samples: list
    """GrpoSample per kept completion (advantage, response start, behaviour logprobs)."""
    datums: list
    """The matching training datums (full sequences)."""
    metrics: dict
    """rollout/* metrics of the batch (reward, drops, lengths, sampling time)."""


def collect(sampler, tokenizer, cfg: Config, rows: list[dict], idx: list[int], consumed: int, reward_fn,
            max_len: int | None) -> Batch:
    """Sample `completions_per_prompt` completions of each row of `idx` (request seeds derived from the data
    position `consumed + j`, so a resumed run draws the same), score them, z-score within each group."""
    t0 = time.time()
    n = cfg.completions_per_prompt
    requests = [(rows[i]["messages"], _seed(cfg.seed, consumed + j, k)) for j, i in enumerate(idx) for k in range(n)]
    results = _sample(sampler, requests, cfg, max_len)
    t_sample = time.time() - t0
    samples, datums, all_rewards, lengths, truncated, failed, dropped = [], [], [], [], 0, 0, 0
    for i, group in zip(idx, _chunks(results, n)):
        if any(isinstance(c, BaseException) for c in group):
            failed += sum(isinstance(c, BaseException) for c in group)
            dropped += 1
            continue
        rewards = [float(reward_fn(_text(tokenizer, c), rows[i])) for c in group]
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
    metrics = {"rollout/reward": sum(all_rewards) / max(len(all_rewards), 1),
               "rollout/groups": len(idx), "rollout/groups_dropped": dropped, "rollout/samples_failed": failed,
               "rollout/response_len": sum(lengths) / max(len(lengths), 1),
               "rollout/truncated_frac": truncated / max(len(lengths), 1), "time/sample_s": t_sample}
    return Batch(samples, datums, metrics)


def grpo_update(client, reference, batch: Batch, cfg: Config, lr: float) -> dict:
    """Reference logprobs (when there is a reference), one `forward_backward_custom` with the GRPO loss and one
    `optim_step`; returns the grpo/* and train/grad_norm metrics."""
    normalization = cfg.grad_accumulation_normalization
    normalization = None if normalization in (None, "none") else normalization
    if reference is not None:
        out = reference.forward(batch.datums, "cross_entropy").result()
        for s, o in zip(batch.samples, out.loss_fn_outputs):
            s.ref_logprobs = list(o["logprobs"].data)[s.response_start:]
    loss_fn = make_grpo_loss(batch.samples, kl_beta=cfg.kl_beta, eps_clip=cfg.eps_clip,
                             eps_clip_high=cfg.eps_clip_high, tis_cap=cfg.tis_cap)
    fb = client.forward_backward_custom(batch.datums, loss_fn).result()
    opt = client.optim_step(adam_params(lr, weight_decay=cfg.weight_decay, grad_clip_norm=cfg.grad_clip_norm),
                            grad_accumulation_normalization=normalization).result()
    metrics = {k: v for k, v in fb.metrics.items() if k.startswith("grpo/")}
    if opt.metrics and "grad_norm:mean" in opt.metrics:
        metrics["train/grad_norm"] = opt.metrics["grad_norm:mean"]
    return metrics


# ---- main --------------------------------------------------------------------------------------------
def main(cfg: Config) -> dict:
    """Run (or resume) the GRPO loop; returns the summary."""
    validate(cfg)
    return run_grpo(cfg, RECIPE)


def run_grpo(cfg: Config, recipe: str, *, prefetch: bool = False, collect_fn=None, evaluate_fn=None,
             default_reward=arithmetic_reward) -> dict:
    """The GRPO loop of `rl_loop` (prefetch=False) and `async_rl_loop` (prefetch=True: the rollouts of step
    N+1 are sampled while step N trains, from the weights the deployment holds then, i.e. one version old;
    see async_rl_loop's docstring). `cfg` is validated by the caller. igpo_loop supplies its own rollouts:
    `collect_fn(sampler, tokenizer, cfg, rows, idx, consumed, reward_fn, max_len, client) -> Batch` and
    `evaluate_fn(sampler, tokenizer, cfg, rows, reward_fn, max_len) -> metrics` (defaults: `collect`,
    `evaluate`)."""
    collect_batch = collect_fn or (lambda *a, client=None: collect(*a))
    evaluate_rows = evaluate_fn or evaluate
    from concurrent.futures import ThreadPoolExecutor

    from fireworks.training.sdk import AdaptiveConcurrencyController, DeploymentSampler

    from workbench.sdk import WeightSyncer

    done = completed_summary(cfg.log_path)
    if done is not None:
        return done
    reward_fn = cfg.reward_fn or default_reward
    tokenizer, train_rows, eval_rows = read_datasets(cfg, "rl")

    with provision(cfg, recipe) as infra, ThreadPoolExecutor(max_workers=1) as rollout_pool:
        max_len = infra.max_context_length()
        run = TrainingRun(infra, cfg, recipe, n_items=len(train_rows), batch_size=cfg.prompt_groups_per_step)
        client = run.client
        deployment_id = infra.deployment(run.policy)
        reference, reference_desc = _reference(infra, cfg, run.policy)
        infra.run.update(reference=reference_desc)
        ws = cfg.weight_sync
        syncer = WeightSyncer(policy_client=client, deploy_mgr=infra.deploy_mgr, deployment_id=deployment_id,
                              base_model=cfg.base_model, hotload_timeout=ws.weight_sync_timeout,
                              first_checkpoint_type=ws.first_checkpoint_type, dcp_timeout=ws.dcp_timeout)
        sampler = DeploymentSampler(inference_url=infra.base_url, model=infra.deployment_model(deployment_id),
                                    api_key=infra.api_key, tokenizer=tokenizer,
                                    concurrency_controller=AdaptiveConcurrencyController(initial_window=16))

        last_snapshot = None
        if run.info is not None or ws.weight_sync_before_training or cfg.infra.deployment_id:
            last_snapshot = syncer.save_and_hotload(f"step-{run.step}")
            logger.info("synced the policy at step %d into %s (%s)", run.step, deployment_id, last_snapshot)
        dirty = False   # the trainer holds weights the deployment has not hot-loaded yet

        def sync(step: int) -> dict:
            nonlocal last_snapshot, dirty
            last_snapshot = syncer.save_and_hotload(f"step-{step}")
            dirty = False
            return {"sync/snapshot": last_snapshot}

        def run_eval() -> dict:
            # evaluate what the policy is now, not the last synced snapshot
            metrics = sync(run.step) if dirty else {}
            metrics.update(evaluate_rows(sampler, tokenizer, cfg, eval_rows, reward_fn, max_len))
            return metrics

        ahead: dict = {}     # prefetch: step -> (future of its Batch, policy version it samples from)

        def train_step(idx: list[int], lr: float, step: int) -> dict:
            """Sample and score the groups of `idx` (or take the batch prefetched during the previous step),
            one GRPO update, and a weight sync when one is due."""
            nonlocal dirty
            if step in ahead:
                future, version = ahead.pop(step)
                batch = future.result()
            else:
                batch, version = collect_batch(sampler, tokenizer, cfg, train_rows, idx, run.consumed, reward_fn,
                                               max_len, client=client), step - 1
            metrics = dict(batch.metrics)
            nxt = None
            # A resumable checkpoint is a barrier: the batch after it is sampled from the checkpoint's own
            # weights, exactly what a run resumed from that checkpoint samples from.
            if prefetch and step < run.total and not run.ckpt.should_save(step):
                consumed = run.consumed + len(idx)
                _, idx_next = run.schedule.next_batch(consumed)
                if idx_next:
                    nxt = rollout_pool.submit(collect_batch, sampler, tokenizer, cfg, train_rows, idx_next, consumed,
                                              reward_fn, max_len, client=client)
                    ahead[step + 1] = (nxt, step - 1)
            if prefetch:
                metrics["async/staleness"] = (step - 1) - version
            if batch.datums:
                metrics.update(grpo_update(client, reference, batch, cfg, lr))
                dirty = True
            if nxt is not None:
                nxt.result()     # no hot-load while the next batch is still sampling from the current weights
                metrics["async/overlap"] = 1
            if dirty and (step % ws.weight_sync_interval == 0 or step == run.total):
                t1 = time.time()
                metrics.update(sync(step))
                metrics["time/sync_s"] = time.time() - t1
            return metrics

        evaluate_fn = run_eval if eval_rows else None
        run.begin(evaluate_fn)
        run.train(train_step, desc="grpo", postfix_keys=("rollout/reward", "eval/reward"), evaluate=evaluate_fn,
                  eval_due=lambda step, consumed: bool(cfg.eval_interval) and step % cfg.eval_interval == 0)
        if dirty:
            sync(run.step)
        run.final_eval(evaluate_fn, "eval/reward")
        first, last = run.first_eval, run.last_eval
        train_rewards = [r["rollout/reward"] for r in read_metrics(cfg.log_path) if "rollout/reward" in r]
        k = max(1, len(train_rewards) // 4)
        return run.finish({
            "deployment_id": deployment_id, "reference": reference_desc, "last_snapshot": last_snapshot,
            "train_prompts": len(train_rows), "eval_prompts": len(eval_rows),
            "eval_reward_before": first.get("eval/reward") if first else None,
            "eval_reward_after": last.get("eval/reward") if last else None,
            "train_reward_first_quarter": sum(train_rewards[:k]) / k if train_rewards else None,
            "train_reward_last_quarter": sum(train_rewards[-k:]) / k if train_rewards else None,
        })

if __name__ == "__main__":
    from workbench.recipes.utils.cli import run_recipe_cli

    run_recipe_cli(__doc__, Config, main, {"dataset": str, "init_from_checkpoint": str, "learning_rate": float, "kl_beta": float,
                                                "completions_per_prompt": int, "prompt_groups_per_step": int,
                                                "max_steps": int, "output_model_id": str})
