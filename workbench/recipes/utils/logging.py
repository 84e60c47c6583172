"""Per-step metrics: one JSON line per step in `<log_path>/metrics.jsonl`, and a tqdm progress bar.

    log = MetricsLog(log_path)
    log.truncate_after(resume_step)          # a resumed run redoes the steps after its checkpoint
    with log.progress(total=100, initial=resume_step, desc="sft") as bar:
        log.write(step, {"train/loss": 0.7, "data_consumed": 64})
        bar.update(1)

Every line is `{"step": N, ...metrics, "time": epoch seconds}`, one per optimizer step; when a step is
evaluated its `eval/...` metrics are on the same line, and the evaluation before training is the line
of step 0. `read_metrics(log_path)` returns the lines as dicts (what tests and notebooks plot).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

METRICS_FILE = "metrics.jsonl"

logger = logging.getLogger("workbench.recipes")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


def read_metrics(log_path: str | os.PathLike) -> list[dict]:
    path = Path(log_path) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: ignore it
            continue
    return rows


class MetricsLog:
    """Appends `{"step": N, ...}` lines to `<log_path>/metrics.jsonl` and drives a tqdm bar."""

    def __init__(self, log_path: str | os.PathLike):
        self.path = Path(log_path) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._bar = None
        self._postfix_keys: tuple[str, ...] = ()

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after `step` (a resumed run recomputes them from its checkpoint)."""
        rows = read_metrics(self.path.parent)
        kept = [r for r in rows if int(r.get("step", 0)) <= step]
        if len(kept) != len(rows):
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict) -> dict:
        row = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self._bar is not None:
            shown = {k.replace("train/", "").replace("/", "_"): f"{row[k]:.4g}" for k in self._postfix_keys
                     if isinstance(row.get(k), (int, float))}
            if shown:
                self._bar.set_postfix(shown, refresh=False)
        logger.debug("step %d %s", step, row)
        return row

    @contextmanager
    def progress(self, total: int, initial: int = 0, desc: str = "train", postfix_keys: tuple[str, ...] = ()):
        from tqdm.auto import tqdm

        self._postfix_keys = postfix_keys
        bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5)
        self._bar = bar
        try:
            yield bar
        finally:
            self._bar = None
            bar.close()
