"""workbench: a Jupyter-first research workbench for LLM post-training.

    import workbench as wb
    run = wb.open("runs/colors-sft")      # starts or attaches to the local backend; creates the run dir
    trainer = run.trainer(base_model="accounts/workbench/models/qwen3-tiny", lora_rank=0, learning_rate=1e-3)
    deployment = run.deployment("colors-serving")
    client = trainer.client               # the official FiretitanTrainingClient (plus TTL on saves)
    ...
    run.sync("step-00020"); run.evaluate(prompts, wb.exact_match("answer"), name="colors")
    run.checkpoints(); run.evals(); run.lineage("colors"); run.syncs(); run.dashboard()
    child = run.fork("colors-lr-low", from_checkpoint="state-00020")    # a new run from a train state
    wb.runs("runs"); wb.compare([run, child], eval="colors")          # ancestry tree, curves by data seen
    run.promote(best, output_model_id="colors-v2", alias="champion"); wb.aliases("runs")

Importing `workbench` is light (no torch, no SDK, no widgets): everything below is loaded on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["open", "Run", "LineageStore", "StaleDeploymentError", "PromotionError", "exact_match", "contains",
           "stop_backend", "runs", "compare", "aliases"]


def open(run_dir, base_url: str | None = None, api_key: str | None = None, home=None, tokenizer=None):  # noqa: A001
    """Open (or create) the run directory `run_dir` and start or attach to its backend.

    Opening the same directory again (after a kernel restart, the next day) gives back the same run: the same
    trainer job and deployments (see `workbench.notebook.run`). The backend: `base_url` + `api_key` for any
    service speaking the Fireworks wire contract; else the one the run recorded; else the local backend of
    `home` / `$WORKBENCH_HOME` (`FIREWORKS_BASE_URL` + `FIREWORKS_API_KEY` are honoured as in `connect`).
    """
    from workbench.notebook.run import open_run

    return open_run(run_dir, base_url=base_url, api_key=api_key, home=home, tokenizer=tokenizer)


def runs(folder="runs", eval: str | None = None, higher_is_better: bool = True):  # noqa: A002
    """The runs in `folder` as an ancestry tree (forks under their parents) with their best scores and aliases."""
    from workbench.notebook.compare import RunTree

    return RunTree(folder, eval=eval, higher_is_better=higher_is_better)


def compare(runs, eval: str, digest: str | None = None):  # noqa: A002
    """Several runs' eval curves on one chart by data seen (runs: Run objects or run directories); only runs
    evaluated on the same eval set (content digest) are drawn, the others are named and left out."""
    from workbench.notebook.compare import ComparisonChart

    return ComparisonChart(runs, eval=eval, digest=digest)


def aliases(folder="runs"):
    """The aliases (`champion`, `candidate`, ...) of promoted models in `folder`: `.current()`, `.history()`."""
    from workbench.notebook.lineage import AliasStore

    return AliasStore(folder)


def exact_match(key: str = "answer", normalize: bool = True):
    """A scorer for `run.evaluate`: 1.0 when the completion equals `item[key]` (case/space-insensitive)."""

    def norm(s) -> str:
        return " ".join(str(s).lower().split()) if normalize else str(s)

    def score(text: str, item) -> float:
        return float(norm(text) == norm(item[key]))

    score.__name__ = f"exact_match_{key}"
    return score


def contains(key: str = "answer"):
    """A scorer for `run.evaluate`: 1.0 when the completion contains `item[key]` (case-insensitive)."""

    def score(text: str, item) -> float:
        return float(str(item[key]).lower() in text.lower())

    score.__name__ = f"contains_{key}"
    return score


def stop_backend(home=None) -> bool:
    """Stop the local backend of `home` (default `$WORKBENCH_HOME`) and every process it runs."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "workbench.cli", "stop"] + (["--home", str(home)] if home else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).returncode == 0


def __getattr__(name: str):
    if name in ("Run", "StaleDeploymentError", "PromotionError"):
        from workbench.notebook import run as _run

        return getattr(_run, name)
    if name == "LineageStore":
        from workbench.notebook.lineage import LineageStore

        return LineageStore
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
