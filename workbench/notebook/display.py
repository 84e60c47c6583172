"""How a `Run` shows itself: the plain-text and HTML summary (`repr(run)`, a notebook cell's output).

    run            # in a notebook: backend, trainer, deployments (and whether they hold what this run
                   # expects), last step, checkpoints, last eval
    print(run)     # the same as text

`_run_text` / `_run_html` are also used by the dashboard in `widgets.py`. They read live state through
`run.status()` (one GET per trainer/deployment) and the lineage; they never raise for an unreachable backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .common import _short_state

if TYPE_CHECKING:
    from .run import Run


def _run_summary(run: Run) -> dict:
    if run.closed:  # nothing is queried for a closed run: say what it recorded, and that it is closed
        stopped = run.ctx.backend_stopped
        gone = "stopped with the backend" if stopped else "not queried: the run is closed"
        st = {"base_url": run.backend.base_url, "backend": "stopped" if stopped else "closed",
              "trainer": {"job_id": run.job_id, "state": gone} if run.job_id else None,
              "deployments": {d: {"state": gone, "holds": None, "expected": None, "closed": True}
                              for d in run.deployment_ids}}
    else:
        st = run.status()
    ev = run.store.evaluations()
    n_ck = len(run.store.checkpoints())
    last_eval = None if ev.empty else ev.iloc[-1].to_dict()
    return {"status": st, "n_checkpoints": n_ck, "last_eval": last_eval}


def _run_text(run: Run) -> str:
    s = _run_summary(run)
    st = s["status"]
    backend = {"stopped": " (STOPPED: wb.open(run_dir) starts it again)",
               "closed": " (this run is closed: wb.open(run_dir) opens it again)",
               "unreachable": " (not answering)"}.get(st.get("backend", "running"), "")
    lines = [f"Run {run.name!r} at {run.path}", f"  backend     {st['base_url']}{backend}"]
    tr = st.get("trainer")
    lines.append(f"  trainer     {tr['job_id']} {_short_state(tr['state'])}" if tr else "  trainer     (none yet)")
    for dep, info in st["deployments"].items():
        if info.get("closed") or st.get("backend") in ("stopped", "unreachable"):
            lines.append(f"  deployment  {dep} {info['state']}")
            continue
        holds = info["holds"] or "base model"
        flag = "" if info["holds"] == info["expected"] else f"  (STALE: this run expects {info['expected']})"
        lines.append(f"  deployment  {dep} {info['state']} holds {holds}{flag}")
    if not st["deployments"]:
        lines.append("  deployment  (none yet)")
    if run.record.parent:
        p = run.record.parent
        lines.append(f"  forked from {Path(p.run).name} at {p.checkpoint} (step {p.step})")
    lines.append(f"  last step   {run.step}")
    lines.append(f"  checkpoints {s['n_checkpoints']} recorded")
    if s["last_eval"]:
        e = s["last_eval"]
        lines.append(f"  last eval   {e['name']} = {e['score']:.3f} on {e['snapshot'] or 'base model'} (step {e['step']})")
    return "\n".join(lines)


def _run_html(run: Run) -> str:
    import html as _html

    text = _run_text(run).splitlines()
    head, rows = text[0], text[1:]
    cells = "".join("<tr><td style='text-align:left;color:#666'>{}</td><td style='text-align:left'>{}</td></tr>"
                    .format(_html.escape(r[:14].strip()), _html.escape(r[14:].strip())) for r in rows)
    return f"<div><b>{_html.escape(head)}</b><table>{cells}</table></div>"
