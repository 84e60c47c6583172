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
    # "tight" grows the canvas to every label, legend and annotation: nothing is clipped at the edges
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", pad_inches=0.12)
    return buf.getvalue()


def _show_image(image: W.Image, png: bytes | None) -> None:
    """Set an image widget's PNG, hiding it while there is none (an empty Image shows a broken-image icon)."""
    image.value = png or b""
    image.layout.display = None if png else "none"


SCORE_DIGITS = 3
"""Scores are shown with this many decimals everywhere: charts, tables, summaries (0.125, never 0.12)."""


def _score(v) -> str:
    return _fmt(v, SCORE_DIGITS)


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


def _secs(v) -> str:
    v = _none(v)
    return "-" if v is None else (f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s")


def _pct(v) -> str:
    v = _none(v)
    return "-" if v is None else f"{100 * v:.1f}%"


def sync_text(s: dict) -> str:
    """One sync in words: wall time, the deployment's load time and sampler pause, bytes, changed fraction,
    chain length. What the backend did not report is left out."""
    parts = []
    if _none(s.get("duration_s")) is not None:
        inner = [f"load {_secs(s['load_s'])}" if _none(s.get("load_s")) is not None else None,
                 f"sampler paused {_secs(s['pause_s'])}" if _none(s.get("pause_s")) is not None else None]
        inner = [x for x in inner if x]
        parts.append(f"sync {_secs(s['duration_s'])}" + (f" ({', '.join(inner)})" if inner else ""))
    if _none(s.get("bytes")):
        parts.append(f"{_size(s['bytes'])} {s.get('type') or ''}".strip())
    if _none(s.get("changed_fraction")) is not None:
        parts.append(f"{_pct(s['changed_fraction'])} of weights changed")
    if _none(s.get("chain_length")) is not None:
        n = int(s["chain_length"])
        parts.append("a base (chain restarts)" if n == 0 else f"delta {n} of the chain since the last base")
    return " · ".join(parts) or "no sync details reported"


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

    def _chart_widgets(self) -> None:
        """The title / chart image / table stack the chart views share; each then calls its refresh()."""
        self.title = W.HTML()
        self.image = W.Image(format="png")
        self.table = W.HTML()
        self.png: bytes | None = None
        self.widget = W.VBox([self.title, self.image, self.table])

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
        if self.run.closed:  # the rows come from the control plane: a closed run asks nothing
            self.table.value = ("<i>the run is closed: its checkpoint rows are not queried (wb.open(run_dir) "
                                "opens it again)</i>")
            self.button.disabled = True
            return self
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
        self._chart_widgets()
        self.refresh()

    @property
    def frame(self):
        return self.run.store.lineage(self.name)

    @property
    def points(self) -> list[dict]:
        """[{n, eval, set, step, score, snapshot, checkpoint_type}] in recording order; `n` numbers the points
        (the chart's labels), `set` tells apart eval sets recorded under one name (1, 2, ...)."""
        df = self.frame
        sets: dict[tuple, int] = {}
        out = []
        for i, r in enumerate(_records(df), 1):
            key = (r["eval"], r.get("eval_digest"))
            sets.setdefault(key, sum(1 for k in sets if k[0] == r["eval"]) + 1)
            out.append({"n": i, "eval": r["eval"], "set": sets[key], "digest": r.get("eval_digest"),
                        "step": None if r["step"] is None else int(r["step"]), "score": float(r["score"]),
                        "snapshot": r["snapshot"], "checkpoint_type": r["checkpoint_type"]})
        return out

    def series(self, pts: list[dict] | None = None) -> dict[str, list[dict]]:
        """Points by series: one per eval name and eval set (a changed prompt set or scorer is a new series,
        never joined to the old one)."""
        pts = self.points if pts is None else pts
        multi = {p["eval"] for p in pts if p["set"] > 1}
        out: dict[str, list[dict]] = {}
        for p in pts:
            label = f"{p['eval']} (set {p['set']})" if p["eval"] in multi else p["eval"]
            out.setdefault(label, []).append(p)
        return out

    def refresh(self) -> "EvalChart":
        pts = self.points
        what = self.name or "all evals"
        n_sets = len(self.series(pts))
        sets = f", {n_sets} series" if n_sets > 1 else ""
        self.title.value = f"<b>Eval scores</b> ({html.escape(what)}, {len(pts)} points{sets})"
        self.png = self._draw(pts) if pts else None
        _show_image(self.image, self.png)
        note = self._note(pts)
        self.table.value = ((f"<div style='color:#9a6700'>{html.escape(note)}</div>" if note else "")
                            + (_html_table(["#", "eval", "step", "score", "snapshot"], self._rows(pts)) if pts
                               else "<i>no evaluations recorded yet (run.evaluate(...) records them)</i>"))
        return self

    def _draw(self, pts: list[dict]) -> bytes:
        """One line per series; each point carries its number (the table below names its snapshot), and
        points at the same step are spread sideways so that every point is visible."""
        fig = _figure(6.4, 3.2)
        ax = fig.add_subplot(111)
        steps = sorted({p["step"] for p in pts if p["step"] is not None})
        gap = min((b - a for a, b in zip(steps, steps[1:])), default=1) or 1
        at_step: dict[int, int] = {}
        for p in pts:
            if p["step"] is not None:
                at_step[p["step"]] = at_step.get(p["step"], 0) + 1
        placed: dict[int, int] = {}
        for label, mine in self.series(pts).items():
            mine = [p for p in mine if p["step"] is not None]
            if not mine:
                continue
            xs, ranks = [], []
            for p in mine:
                k, total = placed.get(p["step"], 0), at_step[p["step"]]
                placed[p["step"]] = k + 1
                ranks.append(k)
                xs.append(p["step"] + (k - (total - 1) / 2) * gap * 0.12)
            line = ax.plot(xs, [p["score"] for p in mine], marker="o", label=label)[0]
            for x, p, k in zip(xs, mine, ranks):
                # points sharing a step alternate their labels above and below, so no two labels overlap
                above = k % 2 == 0
                ax.annotate(f"{p['n']}: {_score(p['score'])}", (x, p["score"]), textcoords="offset points",
                            xytext=(0, 6 + 8 * (k // 2)) if above else (0, -8 - 8 * (k // 2)), ha="center",
                            va="bottom" if above else "top", fontsize=6, color=line.get_color())
        ax.margins(x=0.08, y=0.25)
        ax.set_xlabel("training step (of the snapshot evaluated)")
        ax.set_ylabel("score")
        ax.set_title(f"{self.run.name}: eval score by snapshot (numbers: rows of the table)", fontsize=9)
        ax.grid(alpha=0.3)
        if len(self.series(pts)) > 1:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return render_png(fig)

    def _rows(self, pts):
        return [[p["n"], p["eval"] + (f" (set {p['set']})" if p["set"] > 1 else ""), p["step"], _score(p["score"]),
                 p["snapshot"] or "base model"] for p in pts]

    def _note(self, pts) -> str:
        multi = sorted({p["eval"] for p in pts if p["set"] > 1})
        if not multi:
            return ""
        return (f"{', '.join(multi)}: recorded on more than one eval set (prompts, sampling or scorer changed); "
                "each set is its own series and scores are compared only within a set.")

    def text(self) -> str:
        pts = self.points
        if not pts:
            return "Eval scores: none recorded yet (run.evaluate(...) records them)"
        note = self._note(pts)
        return ("Eval scores by snapshot\n" + _text_table(["#", "eval", "step", "score", "snapshot"], self._rows(pts))
                + (f"\nnote: {note}" if note else ""))

    def html(self) -> str:
        pts = self.points
        if not pts:
            return "<i>no evaluations recorded yet</i>"
        note = self._note(pts)
        return (f"<div><b>Eval scores</b> by snapshot</div>{_img_html(self.png)}"
                + (f"<div style='color:#9a6700'>{html.escape(note)}</div>" if note else "")
                + _html_table(["#", "eval", "step", "score", "snapshot"], self._rows(pts)))


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
                text += f"; it is promotable: run.promote('{b['checkpoint_id']}', output_model_id=...)"
            elif b.get("promotable") is False:
                text += "; it is a delta, not promotable - " + self._promotable_advice(b)
        return text

    def _promotable_advice(self, b: dict) -> str:
        """Name a promotable snapshot that exists (the same step if there is one, else the nearest earlier),
        or say how to make one."""
        rows = [r for r in _records(self.run.store.checkpoints()) if r.get("promotable") == 1]
        same = [r for r in rows if r.get("step") == b.get("step")]
        earlier = [r for r in rows if r.get("step") is not None and b.get("step") is not None
                   and r["step"] < b["step"]]
        if same:
            return f"{same[-1]['checkpoint_id']} holds the same weights (step {b['step']}) and is promotable"
        if b.get("step") is not None and b["step"] == self.run.step:
            return (f"the trainer is still at step {b['step']}: run.sync('final', checkpoint_type='base') saves "
                    "these weights as a promotable snapshot")
        if earlier:
            r = max(earlier, key=lambda r: r["step"])
            return (f"the nearest promotable snapshot is {r['checkpoint_id']} (step {r['step']}); to keep the "
                    f"weights of step {b['step']}, load a train state of that step and "
                    "run.sync(name, checkpoint_type='base')")
        return ("no promotable snapshot exists yet; run.sync(name, checkpoint_type='base') saves the current "
                "weights as one")

    def refresh(self) -> "LineageView":
        df = self.frame
        self.summary.value = f"<b>Lineage</b>: {html.escape(self.best_text())}"
        self.table.value = _html_table(self.COLUMNS, self._rows(df)) if len(df) else "<i>no evaluations yet</i>"
        self.png = self._draw(df) if len(df) else None
        _show_image(self.image, self.png)
        return self

    def _rows(self, df) -> list[list]:
        from .promotion import _short_type

        return [[_int(r["step"]), _int(r["data_consumed"]), r["checkpoint"],
                 _short_type(r["checkpoint_type"]) if r["checkpoint_type"] else "-",
                 {1: "yes", 0: "no"}.get(r["promotable"], "-"),
                 r["deployment"], r["eval"], _score(r["score"]), r["samples"]] for r in _records(df)]

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
            ax.annotate(_score(r["score"]), (step, lanes["eval"]), textcoords="offset points", xytext=(0, 7),
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
        # no total, no bar: an empty grey bar would say "0% done" about a loop that is not running
        self.progress = W.IntProgress(min=0, max=max(total or 1, 1), value=0,
                                      layout=W.Layout(width="60%", display=None if total else "none"))
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
        run._listeners.add(self)  # until its loop ends (steps() detaches it)
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
                self.last_sync = {"snapshot": last["snapshot"], "deployment": dep,
                                  "step": last.get("step") if last.get("step") is not None else ck.get("step"),
                                  "type": last["checkpoint_type"], "duration_s": last.get("duration_s"),
                                  "load_s": last.get("load_s"), "pause_s": last.get("pause_s"),
                                  "bytes": last.get("delta_bytes"), "changed_fraction": last.get("changed_fraction"),
                                  "chain_length": last.get("chain_length")}

    # -- the loop --
    def steps(self, total: int | None = None, start: int | None = None):
        """Yield step numbers start..total (default: after the run's last logged step, up to `total`)."""
        total = total if total is not None else self.total
        if total is None:
            raise ValueError("steps(total) needs the number of the last step")
        self.total = total
        self.run._check_open()
        self.run._listeners.add(self)
        start = (self.run.step + 1) if start is None else start
        self.progress.layout.display = None
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
            # the loop is over: this display keeps showing what happened in it, not later cells' syncs
            self.run._listeners.discard(self)
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
        elif kind == "closed":
            self.message = ("run closed; the backend was stopped" if data.get("backend_stopped")
                            else "run closed (wb.open(run_dir) opens it again)")
            self._update_text(force=True)
            self.update_displays()

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
        _show_image(self.image, self.png)
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

    def _lag_text(self, s: dict) -> str:
        step = s.get("step")
        if step is None or self.run.step is None or self.run.step <= step:
            return ""
        return f", {self.run.step - step} steps behind the trainer"

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
                         f"<code>{html.escape(str(s['snapshot']))}</code> (step {s.get('step')}, {s.get('type')}"
                         f"{self._lag_text(s)}) · {html.escape(sync_text(s))}")
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
            lines.append(f"  deployment {s['deployment']} holds {s['snapshot']} (step {s.get('step')}, {s.get('type')}"
                         f"{self._lag_text(s)}); {sync_text(s)}")
        if self.last_eval:
            e = self.last_eval
            lines.append(f"  last eval {e['name']} = {e['score']:.3f} on {_short(e['snapshot'], 40)} (step {e.get('step')})")
        return "\n".join(lines)

    def html(self) -> str:
        return f"<div>{self._header_html()}</div>{_img_html(self.png)}<div>{self._footer_html()}</div>"


# ---- weight syncs ----------------------------------------------------------------------------------
class SyncPanel(_View):
    """The train-to-serve loop, one row per weight sync: when, which step, base or delta, the sync's wall
    time, the deployment's load time and sampler pause, bytes, fraction of weights changed, the chain length
    since the last base; above it, what the deployment holds now and how many steps it lags the trainer.

    The numbers come from the backend: the hot-load status the deployment reports and the snapshot's
    checkpoint row (see `sync.sync_detail`); a "-" is a number this backend does not report."""

    COLUMNS = ["step", "snapshot", "type", "sync", "load", "sampler pause", "bytes", "changed", "chain"]

    def __init__(self, run: "Run", deployment: str | None = None):
        self.run, self.deployment = run, deployment
        self.summary = W.HTML()
        self.image = W.Image(format="png")
        self.table = W.HTML()
        self.png: bytes | None = None
        self.widget = W.VBox([self.summary, self.image, self.table])
        self.refresh()

    @property
    def frame(self):
        """One row per hot-load (see `LineageStore.syncs`)."""
        return self.run.store.syncs(self.deployment)

    def held(self) -> dict:
        """{deployment: {holds, expected, step, lag}} from the deployments' live status (nothing if closed)."""
        out = {}
        status = self.run.status() if not self.run.closed else {"deployments": {}, "backend": "closed"}
        for dep, info in status["deployments"].items():
            if self.deployment and dep != self.deployment:
                continue
            step = info.get("expected_step")
            lag = None if step is None or info.get("holds") != info.get("expected") else max(self.run.step - step, 0)
            out[dep] = {**info, "lag": lag}
        self._backend = status.get("backend")
        return out

    def _rows(self, df) -> list[list]:
        return [[_int(r["step"]), _short(r["snapshot"], 32), r["checkpoint_type"] or "-", _secs(r["duration_s"]),
                 _secs(r["load_s"]), _secs(r["pause_s"]), _size(r["delta_bytes"]) if _none(r["delta_bytes"]) else "-",
                 _pct(r["changed_fraction"]), "-" if _none(r["chain_length"]) is None else int(r["chain_length"])]
                for r in _records(df)]

    def summary_text(self) -> str:
        if self.run.closed:
            return "run closed: no live deployment status (wb.open(run_dir) opens it again)"
        held = self.held()
        if self._backend == "stopped":
            return "the backend is stopped: deployments hold nothing"
        if not held:
            return "no deployment yet"
        parts = []
        for dep, h in held.items():
            what = h.get("holds") or "the base model (no snapshot)"
            lag = "" if h.get("lag") is None else (", in step with the trainer" if h["lag"] == 0
                                                   else f", {h['lag']} steps behind the trainer")
            stale = "" if h.get("holds") == h.get("expected") else f" (this run expects {h.get('expected')})"
            parts.append(f"{dep} holds {what}{lag}{stale}")
        return "; ".join(parts)

    def refresh(self) -> "SyncPanel":
        df = self.frame
        n = len(df)
        self.summary.value = (f"<b>Weight syncs</b> ({n}): {html.escape(self.summary_text())}")
        self.png = self._draw(df) if n else None
        _show_image(self.image, self.png)
        self.table.value = (_html_table(self.COLUMNS, self._rows(df)) if n
                            else "<i>no weight syncs yet (run.sync() hot-loads the trainer's weights)</i>")
        return self

    def _draw(self, df) -> bytes:
        """Per sync: wall time split into the deployment's load and the rest (bars), bytes on a second axis."""
        rows = [r for r in _records(df)]
        fig = _figure(6.4, 2.8)
        ax = fig.add_subplot(111)
        xs = list(range(len(rows)))
        total = [_none(r["duration_s"]) or 0.0 for r in rows]
        load = [min(_none(r["load_s"]) or 0.0, t) for r, t in zip(rows, total)]
        colors = ["#0969da" if (r["checkpoint_type"] or "") == "base" else "#8250df" for r in rows]
        ax.bar(xs, total, color=colors, alpha=0.35, label="sync wall time")
        if any(load):
            ax.bar(xs, load, color=colors, alpha=0.9, label="deployment load")
        ax.set_ylabel("seconds")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{_int(r['step'])}\n{(r['checkpoint_type'] or '?')[:5]}" for r in rows], fontsize=7)
        ax.set_xlabel("sync (training step, base/delta)")
        sizes = [_none(r["delta_bytes"]) for r in rows]
        if any(sizes):
            ax2 = ax.twinx()
            ax2.plot(xs, [(v or 0) / 1e6 for v in sizes], color="#cf222e", marker="o", lw=1, label="MB")
            ax2.set_ylabel("MB written", color="#cf222e", fontsize=8)
            ax2.set_ylim(bottom=0)
        ax.set_title(f"{self.run.name}: weight syncs (blue: base, purple: delta)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        return render_png(fig)

    def text(self) -> str:
        df = self.frame
        head = f"Weight syncs of {self.run.name} ({len(df)}): {self.summary_text()}"
        return head + ("\n" + _text_table(self.COLUMNS, self._rows(df)) if len(df) else "")

    def html(self) -> str:
        df = self.frame
        return (f"<div><b>Weight syncs</b> ({len(df)}): {html.escape(self.summary_text())}</div>"
                f"{_img_html(self.png)}" + (_html_table(self.COLUMNS, self._rows(df)) if len(df) else ""))


# ---- dashboard -----------------------------------------------------------------------------------
class Dashboard(_View):
    """The run at a glance: summary, training curve, weight syncs, checkpoints (with promote), evals, lineage.

    Refresh re-reads everything; a part that cannot be read (the backend was stopped, the run closed) says so
    in the status line instead of failing silently, and the summary shows the backend as stopped."""

    TABS = ["training", "weight syncs", "checkpoints", "evals", "lineage"]

    def __init__(self, run: "Run", name: str | None = None):
        self.run, self.name = run, name
        self.summary = W.HTML()
        self.status = W.HTML()
        self.monitor = TrainingMonitor(run)
        self.syncs = SyncPanel(run)
        self.checkpoints = CheckpointTable(run)
        self.evals = EvalChart(run, name)
        self.lineage = LineageView(run, name)
        self.tabs = W.Tab(children=[p.widget for p in self.parts])
        for i, title in enumerate(self.TABS):
            self.tabs.set_title(i, title)
        self.refresh_button = W.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.widget = W.VBox([W.HBox([self.summary, self.refresh_button]), self.status, self.tabs])
        run._listeners.add(self)
        self._summary()

    @property
    def parts(self) -> list:
        return [self.monitor, self.syncs, self.checkpoints, self.evals, self.lineage]

    def _summary(self) -> None:
        from .display import _run_html

        self.summary.value = _run_html(self.run)

    def on_run_event(self, kind: str, data: dict) -> None:
        if kind == "closed":
            self.refresh()

    def refresh(self) -> "Dashboard":
        problems = []
        self._summary()
        for title, part in zip(self.TABS, self.parts):
            if self.run.closed and part is self.checkpoints:
                continue  # the checkpoint rows come from the control plane: nothing to ask a closed run
            try:
                part.refresh()
            except Exception as e:  # noqa: BLE001 - one unreadable part must not blank the others
                problems.append(f"{title}: {_first_line(e)}")
        if self.run.closed:
            state = ("the backend is stopped" if self.run.ctx.backend_stopped else "the run is closed")
            self.status.value = (f"<div style='color:#cf222e'><b>{html.escape(state)}</b>: the trainer and "
                                 "deployments are not being queried; wb.open(run_dir) opens the run again.</div>")
        elif problems:
            self.status.value = ("<div style='color:#cf222e'>could not refresh " + html.escape("; ".join(problems))
                                 + "</div>")
        else:
            self.status.value = f"<span style='color:#666'>refreshed {time.strftime('%H:%M:%S')}</span>"
        self.update_displays()
        return self

    def text(self) -> str:
        from .display import _run_text

        return "\n\n".join([_run_text(self.run)] + [p.text() for p in self.parts])

    def html(self) -> str:
        from .display import _run_html

        return "<hr>".join([_run_html(self.run)] + [p.html() for p in self.parts])


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]
