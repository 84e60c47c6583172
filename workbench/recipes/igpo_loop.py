"""IGPO: GRPO with turn-level information-gain rewards for multi-turn agentic trajectories.

    from workbench.recipes.igpo_loop import Config, main
    from workbench.recipes.utils import WeightSyncConfig

    summary = main(Config(log_path="./runs/igpo", init_from_checkpoint="sft-1a2b3c4d:step-40",
                          weight_sync=WeightSyncConfig(dcp_save_interval=10)))

Information Gain-based Policy Optimization (Wang et al., ICLR 2026, arXiv:2510.14967; the cookbook's
`igpo_loop`). Each completion is a trajectory of turns: the policy writes a turn, the environment
(`tool_fn(turn_text, row)`) answers a tool call as the next user turn, and so on until a turn makes no
call or `max_turns` is reached; `reward_fn(final_turn_text, row)` is the outcome reward. The default
task is the shipped lookup task (utils/lookup_task.py: `lookup N` -> `result: color` -> `<answer> color</answer>`).

Per step (everything else -- data order, seeds, reference, KL, TIS, weight sync, evaluation, save / resume /
promote -- is rl_loop's, through `rl_loop.run_grpo`):
1. sample `completions_per_prompt` trajectories per prompt through the deployment, token in / token out
   (`sample_with_prompt_tokens`): the tokens the policy sampled are trained (mask 1, with the deployment's
   sampling logprobs); the environment's turns are context only (mask 0: no loss, no KL);
2. information gain of turn t, scored on the policy trainer in one `forward` per step:
   IG_t = mean log p(answer | trajectory up to the environment's reply to turn t)
        - mean log p(answer | the same before turn t), answer = `answer_fn(row)`
   (the final turn, which replies to no tool, gets the outcome reward instead of an IG term);
3. turn rewards -> advantages as in the paper: within the group, IG rewards and outcome rewards are
   z-normalized separately, added (`ig_weight` scales the IG part), and turned into discounted returns
   A_t = r_t + gamma * A_{t+1}; every token of turn t carries A_t;
4. one GRPO update with those per-token advantages (utils/losses.py), then the weight sync.
Groups whose advantages are all zero carry no signal and are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from workbench.recipes import rl_loop
from workbench.recipes.rl_loop import Batch, _behaviour_logprobs, _chunks, _run_async, _seed
from workbench.recipes.utils.config import check_integer, check_number
from workbench.recipes.utils.loop import validate_or_raise
from workbench.recipes.utils.losses import GrpoSample
from workbench.recipes.utils.lookup_task import LOOKUP_RL, answer, lookup_reward, lookup_tool

logger = logging.getLogger("workbench.recipes.igpo")

RECIPE = "igpo"


@dataclass
class Config(rl_loop.Config):
    """rl_loop's settings (same meaning) plus the multi-turn environment and IGPO's credit assignment."""

    dataset: str = str(LOOKUP_RL)
    """Prompt JSONL: `{"messages": [...], "ground_truth": ...}` plus whatever `tool_fn` reads (lookup: `facts`)."""

    reward_fn: Callable[[str, dict], float] | None = None
    """(final turn's text, row) -> outcome reward. None: the lookup task's `<answer>` check."""

    tool_fn: Callable[[str, dict], str | None] | None = None
    """(turn text, row) -> the environment's reply (the next user turn), or None: no tool call, the trajectory
    ends. None: the lookup task's tool."""

    answer_fn: Callable[[dict], str] | None = None
    """(row) -> the text of the right final turn, whose likelihood the information gain measures. None: the
    lookup task's `<answer> {ground_truth}</answer>`."""

    max_turns: int = 3
    """Policy turns per trajectory at most (the last one gets no tool reply)."""

    max_completion_tokens: int = 16
    """Maximum tokens sampled per turn."""

    gamma: float = 0.99
    """Discount of the turn-level returns A_t = r_t + gamma * A_{t+1}."""

    ig_weight: float = 1.0
    """Weight of the normalized information-gain rewards against the normalized outcome reward."""


def validate(cfg: Config) -> None:
    """rl_loop's checks plus IGPO's; every problem at once."""
    errors = rl_loop.config_errors(cfg)
    check_integer(errors, "max_turns", cfg.max_turns, 1)
    check_number(errors, "gamma", cfg.gamma, low=0, high=1)
    check_number(errors, "ig_weight", cfg.ig_weight, low=0)
    if cfg.tool_fn is not None and not callable(cfg.tool_fn):
        errors.append("tool_fn must be callable (turn_text, row) -> str | None")
    if cfg.answer_fn is not None and not callable(cfg.answer_fn):
        errors.append("answer_fn must be callable (row) -> str")
    validate_or_raise(cfg, RECIPE, errors)


# ---- trajectories ----------------------------------------------------------------------------------
@dataclass
class Trajectory:
    tokens: list[int]
    prompt_len: int
    mask: list[int]                 # per token: 1 sampled by the policy, 0 prompt / environment
    inference_logprobs: list[float]  # per token (0.0 where mask is 0)
    turns: list[tuple[int, int, bool]]  # (first token, end incl. the environment's reply, replied to a tool call)
    final_text: str
    truncated: bool


def _env_tokens(tokenizer, reply: str) -> list[int]:
    """The environment's reply as the next user turn plus the next assistant header (the chat template's
    layout after an assistant turn that ended with its end-of-turn token)."""
    messages = [{"role": "user", "content": reply}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return tokenizer.encode("\n", add_special_tokens=False) + list(ids)


async def trajectory(sampler, tokenizer, cfg: Config, row: dict, seed: int, max_len, tool) -> Trajectory:
    tokens = list(tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True,
                                                return_dict=False))
    prompt_len = len(tokens)
    mask, inf, turns, text, truncated = [0] * prompt_len, [0.0] * prompt_len, [], "", False
    for t in range(cfg.max_turns):
        out = await sampler.sample_with_prompt_tokens(tokens, n=1, max_tokens=cfg.max_completion_tokens,
                                                      temperature=cfg.temperature, max_seq_len=max_len,
                                                      logprobs=True, seed=_seed(seed, t))
        if not out:
            raise ValueError("trajectory longer than max_seq_len")
        c = out[0]
        new = list(c.full_tokens[c.prompt_len:])
        start = len(tokens)
        tokens += new
        mask += [1] * len(new)
        inf += _behaviour_logprobs(c)
        text = tokenizer.decode(new, skip_special_tokens=False)
        reply = tool(text, row) if (t < cfg.max_turns - 1 and c.finish_reason != "length") else None
        truncated = c.finish_reason == "length"
        if reply is None:
            turns.append((start, len(tokens), False))
            break
        env = _env_tokens(tokenizer, reply)
        tokens += env
        mask += [0] * len(env)
        inf += [0.0] * len(env)
        turns.append((start, len(tokens), True))
    return Trajectory(tokens, prompt_len, mask, inf, turns, text, truncated)


def _trajectories(sampler, tokenizer, cfg: Config, requests: list[tuple[dict, int]], max_len, tool) -> list:
    async def run():
        return await rl_loop.gather([trajectory(sampler, tokenizer, cfg, row, seed, max_len, tool)
                                     for row, seed in requests], cfg.reproducible_rollouts)
    out = _run_async(run)
    for r in out:
        if isinstance(r, BaseException):
            logger.warning("a trajectory failed: %s", r)
    return out


# ---- information gain and advantages ---------------------------------------------------------------------
def _score_datum(prefix: list[int], answer: list[int]):
    return rl_loop._datum(prefix + answer)


def information_gains(client, trajectories: list[Trajectory], answers: list[list[int]]) -> list[list[float]]:
    """IG per turn of each trajectory (0 for a final turn that replied to no tool), one trainer forward."""
    datums, index = [], []
    for k, (tr, answer) in enumerate(zip(trajectories, answers)):
        datums.append(_score_datum(tr.tokens[:tr.prompt_len], answer))
        index.append((k, -1, tr.prompt_len, len(answer)))
        for t, (_, end, replied) in enumerate(tr.turns):
            if replied:
                datums.append(_score_datum(tr.tokens[:end], answer))
                index.append((k, t, end, len(answer)))
    out = client.forward(datums, "cross_entropy").result()
    scores: dict[tuple[int, int], float] = {}
    for (k, t, prefix_len, n), o in zip(index, out.loss_fn_outputs):
        lp = list(o["logprobs"].data)[prefix_len - 1:prefix_len - 1 + n]
        scores[(k, t)] = sum(lp) / max(len(lp), 1)
    gains = []
    for k, tr in enumerate(trajectories):
        previous, row = scores[(k, -1)], []
        for t, (_, _, replied) in enumerate(tr.turns):
            if replied:
                row.append(scores[(k, t)] - previous)
                previous = scores[(k, t)]
            else:
                row.append(0.0)
        gains.append(row)
    return gains


def _znorm(values: list[float], eps: float = 1e-6) -> list[float]:
    n = len(values)
    if n < 2:
        return [0.0] * n
    mu = sum(values) / n
    sigma = (sum((v - mu) ** 2 for v in values) / n) ** 0.5
    return [0.0] * n if sigma < eps else [(v - mu) / (sigma + eps) for v in values]


def turn_advantages(ig: list[list[float]], outcome: list[float], *, gamma: float, ig_weight: float) -> list[list[float]]:
    """The paper's turn-level advantages for one group: IG and outcome rewards (the outcome sits on the last
    turn) z-normalized separately over all turns of the group, summed, discounted backwards."""
    flat_ig = [g for row in ig for g in row]
    flat_out = [outcome[i] if t == len(row) - 1 else 0.0 for i, row in enumerate(ig) for t in range(len(row))]
    n_ig, n_out = _znorm(flat_ig), _znorm(flat_out)
    out, j = [], 0
    for row in ig:
        r = [ig_weight * n_ig[j + t] + n_out[j + t] for t in range(len(row))]
        j += len(row)
        ret = [0.0] * len(r)
        for t in range(len(r) - 1, -1, -1):
            ret[t] = r[t] + (gamma * ret[t + 1] if t + 1 < len(r) else 0.0)
        out.append(ret)
    return out


def collect(sampler, tokenizer, cfg: Config, rows: list[dict], idx: list[int], consumed: int, reward_fn, max_len,
            client) -> Batch:
    """rl_loop.collect for trajectories: sample, score outcome and information gain, per-token advantages."""
    import time

    t0 = time.time()
    n = cfg.completions_per_prompt
    tool = cfg.tool_fn or lookup_tool
    requests = [(rows[i], _seed(cfg.seed, consumed + j, k)) for j, i in enumerate(idx) for k in range(n)]
    results = _trajectories(sampler, tokenizer, cfg, requests, max_len, tool)
    t_sample = time.time() - t0
    kept, failed, dropped, rewards, turns, calls, truncated = [], 0, 0, [], [], 0, 0
    for i, group in zip(idx, _chunks(results, n)):
        if any(isinstance(tr, BaseException) for tr in group):
            failed += sum(isinstance(tr, BaseException) for tr in group)
            dropped += 1
            continue
        outcome = [float(reward_fn(tr.final_text, rows[i])) for tr in group]
        rewards += outcome
        turns += [len(tr.turns) for tr in group]
        calls += sum(replied for tr in group for _, _, replied in tr.turns)
        truncated += sum(tr.truncated for tr in group)
        kept.append((i, group, outcome))
    answer_text = cfg.answer_fn or (lambda row: answer(str(row["ground_truth"])))
    answers_of = {i: tokenizer.encode(answer_text(rows[i]), add_special_tokens=False)
                  for i, _, _ in kept}
    flat = [tr for _, group, _ in kept for tr in group]
    gains = information_gains(client, flat, [answers_of[i] for i, group, _ in kept for _ in group]) if flat else []
    samples, datums, ig_values = [], [], []
    for g, (i, group, outcome) in enumerate(kept):
        ig = gains[g * n:(g + 1) * n]
        ig_values += [v for tr, row in zip(group, ig) for v, (_, _, replied) in zip(row, tr.turns) if replied]
        adv = turn_advantages(ig, outcome, gamma=cfg.gamma, ig_weight=cfg.ig_weight)
        if all(abs(a) < 1e-9 for row in adv for a in row):
            dropped += 1
            continue
        for tr, a in zip(group, adv):
            per_token = [0.0] * len(tr.tokens)
            for (start, end, _), value in zip(tr.turns, a):
                per_token[start:end] = [value] * (end - start)
            p = tr.prompt_len
            samples.append(GrpoSample(0.0, p - 1, tr.inference_logprobs[p:], advantages=per_token[p:],
                                      mask=[float(m) for m in tr.mask[p:]]))
            datums.append(rl_loop._datum(tr.tokens))
    m = max(len(rewards), 1)
    metrics = {"rollout/reward": sum(rewards) / m, "rollout/groups": len(idx), "rollout/groups_dropped": dropped,
               "rollout/samples_failed": failed, "rollout/turns": sum(turns) / m, "rollout/tool_calls": calls / m,
               "rollout/truncated_frac": truncated / m, "igpo/info_gain": sum(ig_values) / max(len(ig_values), 1),
               "time/sample_s": t_sample}
    return Batch(samples, datums, metrics)


def evaluate(sampler, tokenizer, cfg: Config, rows: list[dict], reward_fn, max_len) -> dict:
    """Mean outcome reward of held-out trajectories, tool calls per trajectory, and the reward of the
    trajectories with / without a tool call (None when there are none); fixed seeds, so every evaluation
    draws the same numbers."""
    tool = cfg.tool_fn or lookup_tool
    requests = [(row, _seed(cfg.seed, 7, i, k)) for i, row in enumerate(rows) for k in range(cfg.completions_per_prompt)]
    results = _trajectories(sampler, tokenizer, cfg, requests, max_len, tool)
    rewards = [0.0 if isinstance(tr, BaseException) else float(reward_fn(tr.final_text, row))
               for (row, _), tr in zip(requests, results)]
    calls = [0 if isinstance(tr, BaseException) else sum(r for _, _, r in tr.turns) for tr in results]
    n = max(len(rewards), 1)
    # the reward split by whether the trajectory used the tool: says whether a change in reward is a change
    # in how often the policy calls the tool or in what it makes of the reply
    called = [r for r, c in zip(rewards, calls) if c]
    direct = [r for r, c in zip(rewards, calls) if not c]
    return {"eval/reward": sum(rewards) / n, "eval/samples": len(rewards), "eval/tool_calls": sum(calls) / n,
            "eval/reward_with_tool": sum(called) / len(called) if called else None,
            "eval/reward_without_tool": sum(direct) / len(direct) if direct else None}


def main(cfg: Config) -> dict:
    """Run (or resume) the IGPO loop; returns the summary (rl_loop's keys)."""
    validate(cfg)
    return rl_loop.run_grpo(cfg, RECIPE, collect_fn=collect, evaluate_fn=evaluate, default_reward=lookup_reward)


if __name__ == "__main__":
    from workbench.recipes.utils.cli import run_recipe_cli

    run_recipe_cli(__doc__, Config, main, {"dataset": str, "init_from_checkpoint": str, "max_steps": int,
                                                "output_model_id": str})
