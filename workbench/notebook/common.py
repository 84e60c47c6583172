"""Small pieces shared by the run session's modules: its two errors, the poll interval, names and times.

Nothing here talks to the backend. `run.py` re-exports all of it, so `from workbench.notebook.run import
StaleDeploymentError, PromotionError` (and `wb.StaleDeploymentError`, `wb.PromotionError`) keep working;
import from here only inside the package (`provision.py`, `sync.py`, `evaluation.py`, `promotion.py`,
`display.py`).
"""

from __future__ import annotations

import re
import time

POLL_S = 0.5
"""Seconds between the SDK's readiness polls (trainer, deployment, re-attach)."""


class StaleDeploymentError(RuntimeError):
    """The deployment does not hold the snapshot this run expects; nothing was recorded."""


class PromotionError(ValueError):
    """A promotion that cannot work, with what to do instead."""


# Public names of `workbench.notebook.run` (re-exported there and from `workbench`): keep tracebacks and
# pickles naming them where users import them from.
StaleDeploymentError.__module__ = PromotionError.__module__ = "workbench.notebook.run"


def _slug(text: str, max_len: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return (s[:max_len].strip("-") or "run")


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _short_state(state: str | None) -> str:
    return (state or "?").replace("JOB_STATE_", "")
