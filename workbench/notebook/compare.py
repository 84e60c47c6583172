"""Several runs side by side: the ancestry tree of a folder of runs, and their eval curves on one chart.

    wb.runs("runs")                       # RunTree: every run in the folder, forks under their parents,
                                          # each with its best score, plus the aliases (champion, ...)
    wb.compare(["runs/lr-high", "runs/lr-low", "runs/fork"], eval="colors")   # ComparisonChart

Both read the run directories' files only (run.json and lineage.sqlite, through `workbench.records` and
`lineage.run_summary` / `LineageStore.eval_curve`), so they work with the backend stopped. Curves are put
on one x axis of *data seen* (rows consumed; a fork starts where its parent was), and only runs evaluated
on the same eval set (equal content digest) are compared: a run whose latest eval set differs is listed
as not comparable instead of being drawn.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import ipywidgets as W

from .lineage import AliasStore, LineageStore, run_summary
from .widgets import _View, _html_table, _score, _show_image, _text_table, render_png


def _run_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "run.json").exists())


class RunTree(_View):
    """The runs of a folder as an ancestry tree (forks indented under their parent) with best scores."""

    COLUMNS = ["run", "trainer job", "forked at", "last step", "best score", "best checkpoint", "eval", "aliases"]

    def __init__(self, folder: str | os.PathLike = "runs", eval: str | None = None,  # noqa: A002
                 higher_is_better: bool = True):
        self.folder, self.eval, self.higher_is_better = Path(folder), eval, higher_is_better
        self.view = W.HTML()
        self.widget = W.VBox([self.view])
        self.refresh()

    def refresh(self) -> "RunTree":
        self.rows = [run_summary(p, self.eval, self.higher_is_better) for p in _run_dirs(self.folder)] \
            if self.folder.is_dir() else []
        self.aliases = AliasStore(self.folder).current() if self.folder.is_dir() else {}
        self.view.value = self.html()
        return self

    @property
    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def tree(self) -> list[tuple[int, dict]]:
        """(depth, row) in tree order: each run followed by its forks."""
        by_parent: dict[str | None, list[dict]] = {}
        names = {r["run"] for r in self.rows}
        for r in self.rows:
            parent = r["parent"] if r["parent"] in names else None
            by_parent.setdefault(parent, []).append(r)
        out: list[tuple[int, dict]] = []

        def walk(parent, depth):
            for r in by_parent.get(parent, []):
                out.append((depth, r))
                walk(r["run"], depth + 1)

        walk(None, 0)
        return out

    def _alias_of(self, run: dict) -> str:
        return ", ".join(a for a, m in self.aliases.items() if Path(m.get("run") or "").name == run["run"])

    def _rows(self) -> list[list]:
        return [[("    " * d + ("└─ " if d else "")) + r["run"], r["job_id"] or "-",
                 f"{r['parent_checkpoint']} (step {r['parent_step']})" if r["parent"] else "-",
                 r["last_step"], _score(r["best_score"]), r["best_snapshot"] or "-", r["eval"] or "-",
                 self._alias_of(r)] for d, r in self.tree()]

    def text(self) -> str:
        if not self.rows:
            return f"no runs in {self.folder}"
        return f"Runs in {self.folder}\n" + _text_table(self.COLUMNS, self._rows())

    def html(self) -> str:
        if not self.rows:
            return f"<i>no runs in {html.escape(str(self.folder))}</i>"
        return (f"<div><b>Runs</b> in {html.escape(str(self.folder))} (forks under their parent)</div>"
                + _html_table(self.COLUMNS, self._rows()).replace("    ", "&nbsp;&nbsp;&nbsp;&nbsp;"))


class ComparisonChart(_View):
    """Eval curves of several runs on one chart, by data seen, on one eval set."""

    def __init__(self, runs, eval: str, digest: str | None = None):  # noqa: A002
        self.paths = [Path(getattr(r, "path", r)) for r in runs]
        self.eval, self.digest = eval, digest
        self._chart_widgets()
        self.refresh()

    def curves(self) -> dict[str, "object"]:
        """{run name: DataFrame(step, data_consumed, score, snapshot, eval_digest)} for the comparable runs;
        `self.excluded` names the others and why."""
        out, self.excluded = {}, {}
        digest = self.digest
        for path in self.paths:
            if not (path / LineageStore.FILENAME).exists():
                self.excluded[path.name] = "no lineage"
                continue
            store = LineageStore(path)
            try:
                mine = store.latest_digest(self.eval)
                if mine is None:
                    self.excluded[path.name] = f"no '{self.eval}' evaluation"
                    continue
                digest = digest or mine
                df = store.eval_curve(self.eval, digest)
                if df.empty:
                    self.excluded[path.name] = f"'{self.eval}' was evaluated on a different eval set"
                    continue
                out[path.name] = df
            finally:
                store.close()
        self.used_digest = digest
        return out

    def refresh(self) -> "ComparisonChart":
        curves = self.curves()
        self.points = sum(len(df) for df in curves.values())
        self.title.value = (f"<b>{html.escape(self.eval)}</b> by data seen: {len(curves)} runs, {self.points} points"
                            + (f" (eval set {self.used_digest})" if self.used_digest else ""))
        self.png = self._draw(curves) if self.points else None
        _show_image(self.image, self.png)
        self.table.value = self.html_table(curves)
        return self

    def _x(self, df) -> list:
        # data seen where recorded, else the step (a loop that does not log data_consumed)
        return [d if d == d and d is not None else s for d, s in zip(df["data_consumed"], df["step"])]

    def _draw(self, curves) -> bytes:
        from .widgets import _figure

        fig = _figure(6.4, 3.2)
        ax = fig.add_subplot(111)
        for name, df in curves.items():
            xs = self._x(df)
            line = ax.plot(xs, list(df["score"]), marker="o", label=name)[0]
            if len(df):
                ax.annotate(_score(df["score"].iloc[-1]), (xs[-1], df["score"].iloc[-1]), textcoords="offset points",
                            xytext=(4, 0), fontsize=6, color=line.get_color(), va="center")
        ax.set_xlabel("data seen (rows consumed)")
        ax.set_ylabel(self.eval)
        ax.set_title(f"{self.eval}: runs compared on one eval set", fontsize=9)
        ax.grid(alpha=0.3)
        ax.margins(x=0.08, y=0.2)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return render_png(fig)

    def html_table(self, curves) -> str:
        rows = []
        for name, df in curves.items():
            best = df.loc[df["score"].idxmax()] if len(df) else None
            rows.append([name, len(df), _score(best["score"]) if best is not None else "-",
                         best["snapshot"] if best is not None else "-",
                         int(best["step"]) if best is not None and best["step"] == best["step"] else "-"])
        note = "".join(f"<div style='color:#9a6700'>{html.escape(n)} not compared: {html.escape(why)}</div>"
                       for n, why in self.excluded.items())
        return _html_table(["run", "points", "best", "best snapshot", "at step"], rows) + note

    def text(self) -> str:
        curves = self.curves()
        lines = [f"{self.eval} by data seen ({len(curves)} runs)"]
        for name, df in curves.items():
            lines.append(f"  {name}: " + ", ".join(f"{x}->{_score(s)}" for x, s in zip(self._x(df), df["score"])))
        for name, why in self.excluded.items():
            lines.append(f"  {name}: not compared ({why})")
        return "\n".join(lines)

    def html(self) -> str:
        from .widgets import _img_html

        return f"<div>{self.title.value}</div>{_img_html(self.png)}{self.table.value}"
