"""Notebook widgets (ipywidgets 8) over a run: checkpoints, eval chart, lineage, live monitor, dashboard.

    run.checkpoints()   CheckpointTable  control-plane rows (type, promotable, created, step, eval score) + promote
    run.evals()         EvalChart        eval score against step, each point labelled by its snapshot
    run.lineage(name)   LineageView      step -> checkpoint -> snapshot -> deployment -> eval, and the best one
    run.monitor()       TrainingMonitor  progress + loss curve, updated while a loop runs in the same kernel
    run.dashboard()     Dashboard        all of them in tabs

Every widget is also a plain value: `.frame` (a pandas DataFrame) and the attributes the tests read, and
its `_repr_mimebundle_` carries `text/plain` and `text/html` next to the widget view, so a saved notebook,
nbval, a terminal or a renderer without the widget manager all show something meaningful.

Charts are matplotlib figures rendered off-screen (Agg, no pyplot state) to PNG and shown in an
`ipywidgets.Image`. The monitor redraws its curve at most once per `redraw_s` (default 1 s) and never
spends more than ~5% of the loop's wall time drawing; its progress bar and text update at most 5 times a
second. Logging itself only appends to an in-memory buffer.
"""

from __future__ import annotations

import base64
import html
import io
import math
import signal
import threading
import time
from typing import TYPE_CHECKING

import ipywidgets as W

if TYPE_CHECKING:
    from .run import Run

_TABLE_STYLE = ("<style>.wb-t{border-collapse:collapse;font-size:12px}.wb-t th,.wb-t td{padding:2px 8px;"
                "border-bottom:1px solid #ddd;text-align:left}.wb-t th{background:#f6f8fa}</style>")


# ---- helpers -------------------------------------------------------------------------------------
def render_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _figure(w: float = 6.4, h: float = 3.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    fig.subplots_adjust(left=0.11, right=0.97, top=0.88, bottom=0.16)
    return fig


def _img_html(png: bytes | None) -> str:
    if not png:
        return ""
    return f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'/>"


def _int(v):
    v = _none(v)
    return None if v is None else int(v)


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _size(n) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _none(v):
    """pandas' NaN for a missing value -> None."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _records(df) -> list[dict]:
    return [{k: _none(v) for k, v in r.items()} for r in df.to_dict("records")]


def _short(snapshot: str | None, n: int = 28) -> str:
    snapshot = _none(snapshot)
    if not snapshot:
        return "base model"
    return snapshot if len(snapshot) <= n else snapshot[: n - 1] + "…"


def _text_table(columns: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in columns]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _html_table(columns: list[str], rows: list[list], row_styles: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for i, r in enumerate(rows):
        style = f" style='{row_styles[i]}'" if row_styles and row_styles[i] else ""
        body.append(f"<tr{style}>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>")
    return f"{_TABLE_STYLE}<table class='wb-t'><tr>{head}</tr>{''.join(body)}</table>"


class _View:
    """A view object around an ipywidgets box (`.widget`, composed rather than inherited so names like
    `log` stay free). Displaying it shows the live widget; `_repr_mimebundle_` also carries readable
    text/plain and text/html for saved notebooks, nbval and renderers without the widget manager."""

    widget: W.Box

    def text(self) -> str:  # pragma: no cover - overridden
        return type(self).__name__

    def html(self) -> str:
        return f"<pre>{html.escape(self.text())}</pre>"

    @property
    def children(self) -> tuple:
        return self.widget.children

    def _repr_mimebundle_(self, include=None, exclude=None, **kwargs):
        data = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        data["text/plain"] = self.text()
        data["text/html"] = self.html()
        return data

    def _ipython_display_(self):
        """Display with a display id, so `update_displays()` can refresh the saved text/html later (the live
        widget updates itself; the static representations are what a saved notebook keeps)."""
        from IPython.display import display

        handle = display(self._repr_mimebundle_(), raw=True, display_id=True)
        if handle is not None:
            self.__dict__.setdefault("_handles", []).append(handle)

    def update_displays(self) -> None:
        handles = self.__dict__.get("_handles")
        if handles:
            bundle = self._repr_mimebundle_()
            for h in handles:
                h.update(bundle, raw=True)

    def __repr__(self) -> str:
        return self.text()


# ---- checkpoint table ----------------------------------------------------------------------------
class CheckpointTable(_View):
    """The control plane's checkpoint rows of the run, with step, data consumed and eval score; promote."""

    COLUMNS = ["checkpoint", "type", "promotable", "step", "created", "size", "eval score", "hot-loaded to",
               "promoted to"]

    def __init__(self, run: "Run"):
        self.run = run
        self.table = W.HTML()
        self.choice = W.Dropdown(description="checkpoint", layout=W.Layout(width="420px"))
        self.model_id = W.Text(description="model id", placeholder="e.g. colors-v1", layout=W.Layout(width="300px"))
        self.button = W.Button(description="Promote", button_style="primary", icon="upload")
        self.status = W.HTML()
        self.button.on_click(lambda _b: self.promote())
        self.widget = W.VBox([self.table, W.HBox([self.choice, self.model_id, self.button]), self.status])
        self.rows: list[dict] = []
        self.last_model: dict | None = None
        self.refresh()

    def refresh(self) -> "CheckpointTable":
        self.rows = self.run.checkpoint_rows()
        self.table.value = self.html_table()
        prom = [r["checkpoint_id"] for r in self.rows if r["promotable"]]
        self.choice.options = list(reversed(prom))
        if prom:
            self.choice.value = prom[-1]
        return self

    @property
    def frame(self):
        """The rows as a DataFrame (as of the last refresh)."""
        import pandas as pd

        return pd.DataFrame(self.rows) if self.rows else self.run.checkpoints_frame()

    def _table_rows(self) -> list[list]:
        return [[r["checkpoint_id"], r["type"], "yes" if r["promotable"] else "no", r["step"],
                 (r["created"] or "")[:19].replace("T", " "), _size(r.get("size_bytes")), r["eval_score"],
                 r["hotloaded_to"] or "", r.get("promoted_to") or ""]
                for r in self.rows]

    def promote(self, checkpoint: str | None = None, output_model_id: str | None = None) -> dict | None:
        """Promote (the selected) checkpoint; the outcome, or what to do instead, shows under the table."""
        checkpoint = checkpoint or self.choice.value
        output_model_id = output_model_id or self.model_id.value.strip()
        from .common import PromotionError

        try:
            model = self.run.promote(checkpoint, output_model_id=output_model_id)
        except PromotionError as e:
            self.status.value = f"<div style='color:#cf222e'>Not promoted: {html.escape(str(e))}</div>"
            self.last_model = None
            return None
        except Exception as e:  # noqa: BLE001 - shown, not raised, from a button
            self.status.value = f"<div style='color:#cf222e'>Promotion failed: {html.escape(str(e))}</div>"
            self.last_model = None
            return None
        self.last_model = model
        self.refresh()
        self.status.value = (f"<div style='color:#1a7f37'>Promoted {html.escape(str(checkpoint))} to "
                             f"<code>{html.escape(model.get('name', output_model_id))}</code></div>")
        self.update_displays()
        return model

    def html_table(self) -> str:
        if not self.rows:
            return "<i>no checkpoints yet (run.sync() or run.save_state() creates them)</i>"
        styles = ["" if r["promotable"] else "color:#666" for r in self.rows]
        return _html_table(self.COLUMNS, self._table_rows(), styles)

    def text(self) -> str:
        if not self.rows:
            return "Checkpoints: none yet"
        n_prom = sum(r["promotable"] for r in self.rows)
        return (f"Checkpoints of {self.run.name} ({len(self.rows)}, {n_prom} promotable)\n"
                + _text_table(self.COLUMNS, self._table_rows()))

    def html(self) -> str:
        return f"<div><b>Checkpoints</b> of {html.escape(self.run.name)}</div>" + self.html_table()


# ---- eval chart ----------------------------------------------------------------------------------
class EvalChart(_View):
    """Eval score against training step, one line per eval name, each point labelled by its snapshot."""

    def __init__(self, run: "Run", name: str | None = None):
        self.run, self.name = run, name
        self.title = W.HTML()
        self.image = W.Image(format="png")
        self.png: bytes | None = None
        self.widget = W.VBox([self.title, self.image])
        self.refresh()

    @property
    def frame(self):
        return self.run.store.lineage(self.name)

    @property
    def points(self) -> list[dict]:
        """[{eval, step, score, snapshot, checkpoint_type}] in recording order."""
        df = self.frame
        return [{"eval": r["eval"], "step": None if r["step"] is None else int(r["step"]),
                 "score": float(r["score"]), "snapshot": r["snapshot"], "checkpoint_type": r["checkpoint_type"]}
                for r in _records(df)]

    def refresh(self) -> "EvalChart":
        pts = self.points
        what = self.name or "all evals"
        self.title.value = f"<b>Eval scores</b> ({html.escape(what)}, {len(pts)} points)"
        self.png = self._draw(pts) if pts else None
        self.image.value = self.png or b""
        return self

    def _draw(self, pts: list[dict]) -> bytes:
        fig = _figure(6.4, 3.2)
        ax = fig.add_subplot(111)
        names = sorted({p["eval"] for p in pts})
        steps = [p["step"] for p in pts if p["step"] is not None]
        lo, hi = (min(steps), max(steps)) if steps else (0, 0)
        labelled: set[tuple] = set()
        for name in names:
            mine = [p for p in pts if p["eval"] == name and p["step"] is not None]
            if not mine:
                continue
            ax.plot([p["step"] for p in mine], [p["score"] for p in mine], marker="o", label=name)
            for i, p in enumerate(mine):
                label = _short(p["snapshot"], 22)
                if (p["step"], p["score"], label) in labelled:
                    continue  # the same snapshot scored the same by another eval: one label is enough
                labelled.add((p["step"], p["score"], label))
                # alternate above/below so neighbours do not overlap; anchor the outermost labels inwards so
                # they stay inside the figure; the y margin keeps them clear of the title and the x axis
                ha = "left" if p["step"] == lo and lo != hi else "right" if p["step"] == hi and lo != hi else "center"
                ax.annotate(label, (p["step"], p["score"]), textcoords="offset points",
                            xytext=(0, 7) if i % 2 == 0 else (0, -11), ha=ha,
                            va="bottom" if i % 2 == 0 else "top", fontsize=6, color="#444",
                            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})
        ax.margins(x=0.06, y=0.28)
        ax.set_xlabel("training step (of the snapshot evaluated)")
        ax.set_ylabel("score")
        ax.set_title(f"{self.run.name}: eval score by snapshot", fontsize=10)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=8)
        return render_png(fig)

    def text(self) -> str:
        pts = self.points
        if not pts:
            return "Eval scores: none recorded yet (run.evaluate(...) records them)"
        rows = [[p["eval"], p["step"], p["score"], p["snapshot"] or "base model"] for p in pts]
        return "Eval scores by snapshot\n" + _text_table(["eval", "step", "score", "snapshot"], rows)

    def html(self) -> str:
        pts = self.points
        if not pts:
            return "<i>no evaluations recorded yet</i>"
        rows = [[p["eval"], p["step"], p["score"], p["snapshot"] or "base model"] for p in pts]
        return (f"<div><b>Eval scores</b> by snapshot</div>{_img_html(self.png)}"
                + _html_table(["eval", "step", "score", "snapshot"], rows))


# ---- lineage -------------------------------------------------------------------------------------
class LineageView(_View):
    """Which checkpoint produced which score: step -> checkpoint -> snapshot -> deployment -> eval."""

    COLUMNS = ["step", "data seen", "checkpoint", "type", "promotable", "deployment", "eval", "score", "samples"]

    def __init__(self, run: "Run", name: str | None = None, higher_is_better: bool = True):
        self.run, self.name, self.higher_is_better = run, name, higher_is_better
        self.summary = W.HTML()
        self.table = W.HTML()
        self.image = W.Image(format="png")
        self.png: bytes | None = None
        self.widget = W.VBox([self.summary, self.image, self.table])
        self.refresh()

    @property
    def frame(self):
        return self.run.store.lineage(self.name)

    @property
    def best(self) -> dict | None:
        """The best evaluation traced to its checkpoint (see `LineageStore.checkpoint_for`)."""
        return self.run.store.best(self.name, self.higher_is_better)

    def chains(self) -> list[str]:
        """One readable chain per evaluation."""
        out = []
        for r in _records(self.frame):
            from .promotion import _short_type

            out.append(f"step {_fmt(_int(r['step']))} -> {r['checkpoint']} ({_short_type(r['checkpoint_type'])}) -> "
                       f"{r['deployment']} -> {r['eval']} = {_fmt(r['score'])} ({r['samples']} samples)")
        return out

    def best_text(self) -> str:
        b = self.best
        if not b:
            return "no evaluations recorded yet"
        where = "the base model (no snapshot loaded)" if b["snapshot"] is None else f"checkpoint {b['checkpoint_id']}"
        data = f", {b['data_consumed']} rows of data seen" if b.get("data_consumed") is not None else ""
        text = (f"best {b['eval']} score {_fmt(b['score'])} ({b['sample_count']} samples) came from {where} "
                f"at step {_fmt(b['step'])}{data}, served by deployment {b['deployment_id']}")
        if b["snapshot"] is not None:
            if b.get("promotable"):
                text += "; it is promotable (run.promote(...))"
            elif b.get("promotable") is False:
                text += "; it is a delta, not promotable - promote a base snapshot of the same step instead"
        return text

    def refresh(self) -> "LineageView":
        df = self.frame
        self.summary.value = f"<b>Lineage</b>: {html.escape(self.best_text())}"
        self.table.value = _html_table(self.COLUMNS, self._rows(df)) if len(df) else "<i>no evaluations yet</i>"
        self.png = self._draw(df) if len(df) else None
        self.image.value = self.png or b""
        return self

    def _rows(self, df) -> list[list]:
        from .promotion import _short_type

        return [[_int(r["step"]), _int(r["data_consumed"]), r["checkpoint"],
                 _short_type(r["checkpoint_type"]) if r["checkpoint_type"] else "-",
                 {1: "yes", 0: "no"}.get(r["promotable"], "-"),
                 r["deployment"], r["eval"], r["score"], r["samples"]] for r in _records(df)]

    def _draw(self, df) -> bytes:
        """Lanes over training steps: loss, checkpoints (base/delta), hot-loads, eval scores, joined per eval."""
        fig = _figure(7.0, 3.6)
        ax = fig.add_subplot(111)
        lanes = {"eval": 3, "deployment": 2, "checkpoint": 1, "training": 0}
        steps, losses = self.run.store.metric_series("loss", self.run.job_id)
        if not steps:
            steps, losses = self.run.store.metric_series("train/loss", self.run.job_id)
        if steps:
            lo, hi = min(losses), max(losses)
            span = (hi - lo) or 1.0
            ax.plot(steps, [0 + 0.7 * (v - lo) / span - 0.35 for v in losses], color="#888", lw=1)
        cks = self.run.store.checkpoints()
        for r in _records(cks):
            if r["step"] is None:
                continue
            t = r["checkpoint_type"] or r["requested_type"] or ""
            marker = "s" if ("BASE" in t or t == "base") else ("^" if r["kind"] == "state" else "o")
            ax.plot([r["step"]], [lanes["checkpoint"]], marker=marker, color="#0969da", ms=6)
        best = self.best
        for r in _records(df):
            step = r["step"]
            if step is None:
                continue
            is_best = best is not None and r["eval_id"] == best["eval_id"]
            color = "#cf222e" if is_best else "#1a7f37"
            ax.plot([step, step, step], [lanes["checkpoint"], lanes["deployment"], lanes["eval"]], color=color,
                    lw=1.5 if is_best else 0.8, alpha=0.8)
            ax.plot([step], [lanes["deployment"]], marker="D", color="#8250df", ms=5)
            ax.plot([step], [lanes["eval"]], marker="*", color=color, ms=10 if is_best else 7)
            ax.annotate(f"{_fmt(r['score'], 2)}", (step, lanes["eval"]), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=7, color=color)
        ax.set_yticks(list(lanes.values()))
        ax.set_yticklabels(["eval score", "deployment\n(hot-load)", "checkpoint\n(■ base ● delta ▲ state)",
                            "training\n(loss)"], fontsize=7)
        ax.set_ylim(-0.6, 3.6)
        ax.set_xlabel("training step")
        ax.set_title(f"{self.run.name}: lineage" + (f" of {self.name}" if self.name else ""), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        fig.subplots_adjust(left=0.2)
        return render_png(fig)

    def text(self) -> str:
        df = self.frame
        head = f"Lineage of {self.name or 'all evals'}: {self.best_text()}"
        if not len(df):
            return head
        return head + "\n" + _text_table(self.COLUMNS, self._rows(df))

    def html(self) -> str:
        df = self.frame
        return (f"<div><b>Lineage</b>: {html.escape(self.best_text())}</div>{_img_html(self.png)}"
                + (_html_table(self.COLUMNS, self._rows(df)) if len(df) else ""))


# ---- live training monitor -----------------------------------------------------------------------
class TrainingMonitor(_View):
    """Progress, loss curve, last sync and eval, deployment identity; updated while a loop runs.

        monitor = run.monitor()
        for step in monitor.steps(200):          # resumes after the run's last logged step
            ...
            monitor.log(step, loss=...)          # = run.log(...) + a throttled redraw

    The kernel's stop button stops the loop cleanly *between* steps (the step in flight completes and is
    logged); pressing it a second time interrupts at once.
    """

    def __init__(self, run: "Run", total: int | None = None, metric: str = "loss", redraw_s: float = 1.0,
                 max_draw_fraction: float = 0.05):
        if metric == "loss" and not run.store.metric_series("loss")[0] and run.store.metric_series("train/loss")[0]:
            metric = "train/loss"  # a recipe's run
        self.run, self.metric, self.total = run, metric, total
        self.redraw_s, self.max_draw_fraction = redraw_s, max_draw_fraction
        self.header = W.HTML()
        self.progress = W.IntProgress(min=0, max=max(total or 1, 1), value=0, layout=W.Layout(width="60%"))
        self.image = W.Image(format="png")
        self.footer = W.HTML()
        self.widget = W.VBox([self.header, self.progress, self.image, self.footer])
        self.png: bytes | None = None
        self.draws = 0
        self.draw_time = 0.0
        self._last_draw = 0.0
        self._last_text = 0.0
        self._t0: float | None = None
        self._first_step: int | None = None
        self._loop_steps = 0
        self._stop_requested = False
        self.stopped_at: int | None = None
        self.last_sync: dict | None = None
        self.last_eval: dict | None = None
        self.message = ""
        run._listeners.add(self)
        self._load_last_events()
        self.refresh()

    def _load_last_events(self) -> None:
        ev = self.run.store.evaluations()
        if len(ev):
            e = ev.iloc[-1]
            self.last_eval = {"name": e["name"], "score": float(e["score"]), "snapshot": _none(e["snapshot"]),
                              "step": _none(e["step"])}
        for dep in self.run.deployment_ids:
            last = self.run.store.last_hotload(dep)
            if last:
                ck = self.run.store.checkpoint(last["snapshot"]) or {}
                self.last_sync = {"snapshot": last["snapshot"], "deployment": dep, "step": ck.get("step"),
                                  "type": last["checkpoint_type"]}

    # -- the loop --
    def steps(self, total: int | None = None, start: int | None = None):
        """Yield step numbers start..total (default: after the run's last logged step, up to `total`)."""
        total = total if total is not None else self.total
        if total is None:
            raise ValueError("steps(total) needs the number of the last step")
        self.total = total
        start = (self.run.step + 1) if start is None else start
        self.progress.max = max(total, 1)
        self.progress.value = max(0, min(start - 1, total))
        self._t0, self._first_step, self._loop_steps = time.monotonic(), start, 0
        self._stop_requested, self.stopped_at = False, None
        if start > total:
            self.message = f"already at step {start - 1} of {total}: nothing to do"
            self.refresh()
            return
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
        step = start - 1
        try:
            for step in range(start, total + 1):
                yield step
                self._loop_steps += 1
                self.progress.value = step
                self._maybe_redraw()
                if self._stop_requested:
                    self.stopped_at = step
                    self.message = (f"stopped after step {step} (the step completed and was recorded); "
                                    "run the cell again to continue")
                    raise KeyboardInterrupt(self.message)
            self.message = f"done: {total} steps"
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            self.run.store.flush()
            self.refresh()
            self.update_displays()

    def _on_sigint(self, signum, frame):
        if self._stop_requested:
            raise KeyboardInterrupt("interrupted during a step")
        self._stop_requested = True
        self.message = "stopping after this step (interrupt again to stop at once)"
        self._update_text(force=True)

    def log(self, step: int, data_consumed: int | None = None, **metrics) -> None:
        """Record a step (`run.log`) and update the display (throttled)."""
        self.run.log(step, data_consumed=data_consumed, **metrics)

    def on_run_event(self, kind: str, data: dict) -> None:
        if kind == "step":
            if self.total is not None:
                self.progress.value = min(int(data["step"]), self.progress.max)
            self._maybe_redraw()
        elif kind == "sync":
            self.last_sync = data
            self._update_text(force=True)
        elif kind == "eval":
            self.last_eval = data
            self._update_text(force=True)

    # -- drawing --
    def _maybe_redraw(self) -> None:
        now = time.monotonic()
        self._update_text()
        budget = self.draw_time / max(self.draws, 1) / self.max_draw_fraction if self.draws else 0.0
        if now - self._last_draw >= max(self.redraw_s, budget):
            self._draw()

    def _draw(self) -> None:
        t = time.perf_counter()
        steps, values = self.run.store.metric_series(self.metric, self.run.job_id)
        if steps:
            fig = _figure(6.0, 2.6)
            ax = fig.add_subplot(111)
            ax.plot(steps, values, color="#0969da", lw=1.2)
            syncs = self.run.store.checkpoints(self.run.job_id)
            for r in _records(syncs):
                if r["kind"] == "sampler" and r["step"] is not None:
                    ax.axvline(r["step"], color="#8250df", alpha=0.25, lw=0.8)
            ax.set_xlabel("step")
            ax.set_ylabel(self.metric)
            ax.set_title(f"{self.run.name}: {self.metric} (purple: weight syncs)", fontsize=9)
            ax.grid(alpha=0.3)
            self.png = render_png(fig)
            self.image.value = self.png
        self.draws += 1
        self.draw_time += time.perf_counter() - t
        self._last_draw = time.monotonic()
        self._update_text(force=True)

    def refresh(self) -> "TrainingMonitor":
        self._draw()
        return self

    def _rate(self) -> float | None:
        if self._t0 is None or not self._loop_steps:
            return None
        return self._loop_steps / max(time.monotonic() - self._t0, 1e-9)

    def _update_text(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_text < 0.2:
            return
        self._last_text = now
        self.header.value = self._header_html()
        self.footer.value = self._footer_html()

    def _status_parts(self) -> dict:
        steps, values = self.run.store.metric_series(self.metric, self.run.job_id)
        last = values[-1] if values else None
        best = (min(values), steps[values.index(min(values))]) if values else None
        return {"step": self.run.step, "total": self.total, "rate": self._rate(), "last": last, "best": best}

    def _header_html(self) -> str:
        p = self._status_parts()
        total = f"/{p['total']}" if p["total"] else ""
        rate = f" · {p['rate']:.2f} steps/s" if p["rate"] else ""
        last = f" · {self.metric} {p['last']:.4f}" if p["last"] is not None else ""
        msg = f" · <i>{html.escape(self.message)}</i>" if self.message else ""
        return f"<b>{html.escape(self.run.name)}</b> step {p['step']}{total}{rate}{last}{msg}"

    def _footer_html(self) -> str:
        parts = []
        if self.last_sync:
            s = self.last_sync
            parts.append(f"deployment <code>{html.escape(str(s['deployment']))}</code> holds "
                         f"<code>{html.escape(str(s['snapshot']))}</code> (step {s.get('step')}, {s.get('type')})")
        if self.last_eval:
            e = self.last_eval
            parts.append(f"last eval {html.escape(str(e['name']))} = <b>{e['score']:.3f}</b> on "
                         f"<code>{html.escape(_short(e['snapshot'], 40))}</code> (step {e.get('step')})")
        return "<br>".join(parts) or "<span style='color:#666'>no weight sync or eval yet</span>"

    def text(self) -> str:
        p = self._status_parts()
        total = f"/{p['total']}" if p["total"] else ""
        lines = [f"Training monitor {self.run.name}: step {p['step']}{total}"
                 + (f", {p['rate']:.2f} steps/s" if p["rate"] else "")
                 + (f", {self.metric} {p['last']:.4f}" if p["last"] is not None else "")
                 + (f" (min {p['best'][0]:.4f} at step {p['best'][1]})" if p["best"] else "")]
        if self.message:
            lines.append(f"  {self.message}")
        if self.last_sync:
            s = self.last_sync
            lines.append(f"  deployment {s['deployment']} holds {s['snapshot']} (step {s.get('step')}, {s.get('type')})")
        if self.last_eval:
            e = self.last_eval
            lines.append(f"  last eval {e['name']} = {e['score']:.3f} on {_short(e['snapshot'], 40)} (step {e.get('step')})")
        return "\n".join(lines)

    def html(self) -> str:
        return f"<div>{self._header_html()}</div>{_img_html(self.png)}<div>{self._footer_html()}</div>"


# ---- dashboard -----------------------------------------------------------------------------------
class Dashboard(_View):
    """The run at a glance: summary, training curve, checkpoints (with promote), eval chart, lineage."""

    def __init__(self, run: "Run", name: str | None = None):
        self.run, self.name = run, name
        self.summary = W.HTML()
        self.monitor = TrainingMonitor(run)
        self.checkpoints = CheckpointTable(run)
        self.evals = EvalChart(run, name)
        self.lineage = LineageView(run, name)
        self.tabs = W.Tab(children=[p.widget for p in (self.monitor, self.checkpoints, self.evals, self.lineage)])
        for i, title in enumerate(["training", "checkpoints", "evals", "lineage"]):
            self.tabs.set_title(i, title)
        self.refresh_button = W.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.widget = W.VBox([W.HBox([self.summary, self.refresh_button]), self.tabs])
        self._summary()

    def _summary(self) -> None:
        from .display import _run_html

        self.summary.value = _run_html(self.run)

    def refresh(self) -> "Dashboard":
        self._summary()
        for part in (self.monitor, self.checkpoints, self.evals, self.lineage):
            part.refresh()
        return self

    def text(self) -> str:
        from .display import _run_text

        return "\n\n".join([_run_text(self.run), self.monitor.text(), self.checkpoints.text(), self.evals.text(),
                            self.lineage.text()])

    def html(self) -> str:
        from .display import _run_html

        return "<hr>".join([_run_html(self.run), self.monitor.html(), self.checkpoints.html(), self.evals.html(),
                            self.lineage.html()])
