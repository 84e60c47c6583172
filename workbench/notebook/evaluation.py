"""Evaluation through a deployment: `run.evaluate`, its `EvalResult`, and the staleness check around it.

    result = run.evaluate(prompts, scorer, name="colors")   # samples THROUGH the deployment
    result.score; result.snapshot; result.samples_frame()

`Evaluation.evaluate` (the `Run`'s collaborator; it receives the `RunContext` and the `Provisioning`) compares the snapshot the deployment reports holding with the one this run last
hot-loaded into it, before sampling and again after; a mismatch is explained in plain words
(`_stale_text`) and nothing is recorded unless you accept it (`on_stale="warn"` / `"accept"`). Sampling uses
the official `DeploymentSampler` on a private event loop in a helper thread (`workbench.common.run_async`), so it works
inside a Jupyter kernel and Ctrl-C cancels it.

Every evaluation records the content digest of its eval set (`eval_digest`: the prompts, the sampling
parameters and the scorer's code and captured values), so scores are compared only when they measure the
same thing: change a prompt or the scorer and it is a different eval, shown as its own series.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

from workbench.common import run_async

from .common import RunContext, StaleDeploymentError
from .lineage import eval_digest, prompt_set_hash, scorer_digest

if TYPE_CHECKING:
    from .provision import Deployment, Provisioning


@dataclass
class EvalResult:
    """What `run.evaluate` recorded (or would have, for a refused stale evaluation)."""

    name: str
    score: float
    snapshot: str | None
    step: int | None
    deployment_id: str
    sample_count: int
    n_prompts: int
    prompt_hash: str
    eval_id: int | None
    samples: list[dict] = field(repr=False, default_factory=list)
    note: str | None = None
    trainer_step: int | None = None
    digest: str | None = None
    """The eval set's content digest (prompts + sampling parameters + scorer): equal digests, comparable scores."""

    @property
    def snapshot_label(self) -> str:
        return self.snapshot or "(base model)"

    def samples_frame(self):
        import pandas as pd

        return pd.DataFrame(self.samples)

    def __repr__(self) -> str:
        step = "?" if self.step is None else self.step
        text = (f"{self.name}: {self.score:.3f} over {self.sample_count} samples ({self.n_prompts} prompts) "
                f"from snapshot {self.snapshot_label} (step {step}) on deployment {self.deployment_id}")
        if self.trainer_step is not None and self.step is not None and self.trainer_step > self.step:
            text += f"; the trainer has moved on to step {self.trainer_step} since that snapshot"
        if self.note:
            text += f"\n  note: {self.note}"
        return text

    def _repr_mimebundle_(self, include=None, exclude=None):
        import html as _html

        rows = "".join(f"<tr><td>{_html.escape(str(s.get('prompt_text', s.get('prompt'))))}</td>"
                       f"<td>{_html.escape(str(s.get('completion')))}</td><td>{s.get('score')}</td></tr>"
                       for s in self.samples[:8])
        more = f"<div>… {len(self.samples) - 8} more</div>" if len(self.samples) > 8 else ""
        return {"text/plain": repr(self),
                "text/html": (f"<div><b>{_html.escape(self.name)}</b> = <b>{self.score:.3f}</b> "
                              f"<span style='color:#666'>({self.sample_count} samples, snapshot "
                              f"<code>{_html.escape(self.snapshot_label)}</code>, step {self.step}, deployment "
                              f"<code>{_html.escape(self.deployment_id)}</code>)</span></div>"
                              + (f"<div style='color:#9a6700'>{_html.escape(self.note)}</div>" if self.note else "")
                              + "<table><tr><th>prompt</th><th>completion</th><th>score</th></tr>"
                              + rows + "</table>" + more)}


class Evaluation:
    """Evaluation through the run's deployments (see the module docstring)."""

    def __init__(self, ctx: RunContext, provisioning: "Provisioning"):
        self.ctx, self.provisioning = ctx, provisioning

    # ---- evaluation --------------------------------------------------------------------------------
    def evaluate(self, prompts: Iterable, scorer: Callable, name: str = "eval", *, n: int = 1,
                 max_tokens: int = 32, temperature: float = 0.0, deployment: str | Deployment | None = None,
                 on_stale: str = "raise", tokenizer=None, concurrency: int = 16) -> EvalResult:
        """Sample `prompts` through the deployment, score them, and record the score with the snapshot.

        prompts: strings (a user message), message lists, or dicts with "messages" (or "prompt") and any
            reference fields. scorer(text, item) -> float (or bool); text is the completion without the
            end-of-turn token, item the prompt entry as given.
        on_stale: what to do when the deployment does not hold the snapshot this run last loaded into it:
            "raise" (default: explain, record nothing), "warn" (warn, record against what it serves), "accept".
        """
        ctx = self.ctx
        ctx.check_open()
        if on_stale not in ("raise", "warn", "accept"):
            raise ValueError("on_stale must be 'raise', 'warn' or 'accept'")
        d = self.provisioning.get_deployment(deployment)
        items = list(prompts)
        if not items:
            raise ValueError("prompts is empty")
        messages = [_messages_of(x) for x in items]
        expected = d.expected_snapshot()
        held = d.current_snapshot()
        note = None
        if held != expected:
            text = self._stale_text(d, expected, held)
            if on_stale == "raise":
                raise StaleDeploymentError(text + " Nothing was recorded.")
            note = text
            if on_stale == "warn":
                warnings.warn(text, stacklevel=3)
        tok = tokenizer if tokenizer is not None else ctx.tokenizer()
        params = {"n": n, "max_tokens": max_tokens, "temperature": temperature}
        phash = prompt_set_hash([_jsonable(x) for x in items], params)
        digest = eval_digest(phash, scorer_digest(scorer))
        sampler = d.sampler(tokenizer=tok)
        completions = run_async(lambda: _sample_all(sampler, messages, n, max_tokens, temperature, concurrency))
        after = d.current_snapshot()
        if after != held:
            raise StaleDeploymentError(
                f"deployment {d.deployment_id} changed snapshot while the evaluation ran ({held or 'base model'} "
                f"-> {after or 'base model'}); the samples mix two models, so nothing was recorded. Run it again.")
        eos = getattr(tok, "eos_token", None)
        samples, total = [], 0.0
        for item, msgs, outs in zip(items, messages, completions):
            for c in outs:
                text = _clean(c.text, eos)
                s = float(_call_scorer(scorer, text, item))
                total += s
                samples.append({"prompt": msgs, "prompt_text": msgs[-1].get("content") if msgs else "",
                                "completion": text, "score": s, "finish_reason": getattr(c, "finish_reason", None)})
        count = len(samples)
        score = total / count if count else float("nan")
        store = ctx.store
        ck = store.checkpoint(held) if held else None
        step = 0 if held is None else (ck["step"] if ck and ck.get("step") is not None else None)
        job_id = (ck or {}).get("job_id") or (ctx.record.trainer.job_id if ctx.record.trainer else None)
        eval_id = store.record_evaluation(name, snapshot=held, deployment_id=d.deployment_id, score=score,
                                          prompt_hash=phash, n_prompts=len(items), sample_count=count,
                                          job_id=job_id, step=step, params=params, samples=samples,
                                          eval_digest=digest,
                                          data_consumed=0 if held is None else (ck or {}).get("data_consumed"))
        others = store.eval_digests(name)
        if len(others) > 1:
            extra = (f"'{name}' has been recorded with {len(others)} different eval sets (prompts, sampling or "
                     "scorer changed); scores are compared only within the same set (digest "
                     f"{digest}).")
            note = f"{note}\n{extra}" if note else extra
        result = EvalResult(name=name, score=score, snapshot=held, step=step, deployment_id=d.deployment_id,
                            sample_count=count, n_prompts=len(items), prompt_hash=phash, eval_id=eval_id,
                            samples=samples, note=note, trainer_step=ctx.counter.step, digest=digest)
        ctx.notify("eval", {"name": name, "score": score, "snapshot": held, "step": step, "digest": digest})
        return result

    def _stale_text(self, d: Deployment, expected: str | None, held: str | None) -> str:
        def where(snap):
            ck = self.ctx.store.checkpoint(snap) if snap else None
            return f" (step {ck['step']})" if ck and ck.get("step") is not None else ""

        if expected is None:
            return (f"Deployment '{d.deployment_id}' is serving snapshot {held}, which this run never loaded into it "
                    "(another run or an earlier session did). This run has not synced weights to it yet: call "
                    "run.sync() first, or pass on_stale='warn' to score what it serves.")
        if held is None:
            return (f"Deployment '{d.deployment_id}' reports no loaded snapshot - it serves the base model (it was "
                    f"restarted or recreated?) - but this run last loaded {expected}{where(expected)} into it. "
                    "Call run.sync() to load the current weights again.")
        return (f"Deployment '{d.deployment_id}' is serving {held}{where(held)}, not {expected}{where(expected)} "
                "which this run loaded into it last: something else hot-loaded it since. Call run.sync() to load "
                "this run's current weights, or pass on_stale='warn' to score what it serves.")


def _messages_of(item) -> list[dict]:
    if isinstance(item, str):
        return [{"role": "user", "content": item}]
    if isinstance(item, dict):
        if "messages" in item:
            return list(item["messages"])
        if "prompt" in item:
            p = item["prompt"]
            return [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if "role" in item:
            return [item]
    if isinstance(item, (list, tuple)) and all(isinstance(m, dict) for m in item):
        return list(item)
    raise ValueError(f"cannot read a prompt from {item!r}: use a string, a message list, or a dict with 'messages'")


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return repr(x)


def _clean(text: str, eos: str | None) -> str:
    if eos and eos in text:
        text = text.split(eos)[0]
    return text.strip()


def _call_scorer(scorer, text, item):
    try:
        return scorer(text, item)
    except TypeError as e:
        if "positional argument" in str(e):
            return scorer(text)
        raise


async def _sample_all(sampler, messages, n, max_tokens, temperature, concurrency):
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(msgs):
        async with sem:
            return await sampler.sample_with_tokens(messages=msgs, n=n, max_tokens=max_tokens,
                                                    temperature=temperature)

    try:
        return await asyncio.gather(*[one(m) for m in messages])
    finally:  # the sampler's async HTTP client belongs to this private loop: close it here
        client = getattr(sampler, "_async_client", None)
        if client is not None and not client.is_closed:
            await client.aclose()
