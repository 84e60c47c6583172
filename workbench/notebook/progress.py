"""Progress lines and waiting that can be interrupted.

    lines = ProgressLines(["trainer", "deployment"])      # one line each, updated in place in a notebook
    lines.update("trainer", "JOB_STATE_CREATING", elapsed=3.1)
    lines.done("trainer", "ready (reconnected)")

    values = wait_all({"trainer": fn1, "deployment": fn2}, lines, status={"trainer": ..., ...})

In a Jupyter kernel the lines are one display (text/plain + text/html) updated in place with
`update_display`, so a saved notebook keeps the final state. Elsewhere (scripts, tests) each line is
printed once when it finishes, never as a stream of updates.

`wait_all` runs each blocking call (the official SDK's `wait_for_ready` / `reconnect_and_wait`) in its own
daemon thread and waits for all of them in the foreground. Ctrl-C / the kernel's stop button sets a cancel
event that the SDK managers handed to those threads check on every poll (see `provision._cancellable`), so the
threads stop within one poll interval and the cell ends at once with a KeyboardInterrupt.
"""

from __future__ import annotations

import html
import threading
import time
from typing import Callable


def in_kernel() -> bool:
    """True inside an IPython kernel (a notebook), where displays can be updated in place."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


class WaitCancelled(Exception):
    """Raised inside a waiting thread once the foreground wait was interrupted."""


class ProgressLines:
    """A few named status lines shown as one display, updated in place (throttled)."""

    def __init__(self, names: list[str], title: str | None = None, min_interval: float = 0.25):
        self.names = list(names)
        self.title = title
        self.state = {n: {"text": "waiting", "elapsed": 0.0, "done": False, "ok": True} for n in names}
        self.min_interval = min_interval
        self._last = 0.0
        self._kernel = in_kernel()
        self._handle = None
        self._printed: set[str] = set()
        if self._kernel:
            from IPython.display import display

            self._handle = display(self, display_id=True)

    def update(self, name: str, text: str, elapsed: float | None = None, force: bool = False) -> None:
        st = self.state[name]
        st["text"] = text
        if elapsed is not None:
            st["elapsed"] = elapsed
        self._refresh(force)

    def done(self, name: str, text: str, elapsed: float | None = None, ok: bool = True) -> None:
        st = self.state[name]
        st.update(text=text, done=True, ok=ok)
        if elapsed is not None:
            st["elapsed"] = elapsed
        if not self._kernel and name not in self._printed:
            self._printed.add(name)
            print(self._line(name), flush=True)
        self._refresh(force=True)

    def interrupt(self, elapsed: float | None = None) -> None:
        """Mark every line that is not done as interrupted (idempotent)."""
        for n in self.names:
            if not self.state[n]["done"]:
                self.done(n, "interrupted", elapsed, ok=False)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._handle is None or (not force and now - self._last < self.min_interval):
            return
        self._last = now
        self._handle.update(self)

    def _line(self, name: str) -> str:
        st = self.state[name]
        mark = ("✓" if st["ok"] else "✗") if st["done"] else "…"
        return f"{mark} {name:<11} {st['text']}  ({st['elapsed']:.1f}s)"

    def __repr__(self) -> str:
        lines = ([self.title] if self.title else []) + [self._line(n) for n in self.names]
        return "\n".join(lines)

    def _repr_mimebundle_(self, include=None, exclude=None):
        rows = []
        for n in self.names:
            st = self.state[n]
            color = ("#1a7f37" if st["ok"] else "#cf222e") if st["done"] else "#9a6700"
            mark = ("✓" if st["ok"] else "✗") if st["done"] else "…"
            rows.append(f"<div style='font-family:monospace'><span style='color:{color}'>{mark}</span> "
                        f"<b>{html.escape(n)}</b> {html.escape(st['text'])} "
                        f"<span style='color:#888'>({st['elapsed']:.1f}s)</span></div>")
        head = f"<div><b>{html.escape(self.title)}</b></div>" if self.title else ""
        return {"text/plain": repr(self), "text/html": head + "".join(rows)}


def wait_all(calls: dict[str, Callable[[], object]], lines: ProgressLines,
             status: Callable[[str], str] | None = None, cancel: threading.Event | None = None,
             poll: float = 0.2, describe: Callable[[str, object], str] | None = None) -> dict[str, object]:
    """Run each blocking call in a daemon thread; show progress; return {name: value}.

    Raises the first error (after the others finished or were cancelled) and KeyboardInterrupt when
    interrupted (setting `cancel`, which the calls are expected to honour).
    """
    cancel = cancel or threading.Event()
    results: dict[str, object] = {}
    errors: dict[str, BaseException] = {}
    finished: dict[str, float] = {}
    start = time.monotonic()

    def runner(name, fn):
        try:
            results[name] = fn()
        except BaseException as e:  # noqa: BLE001 - reported in the foreground
            errors[name] = e
        finally:
            finished[name] = time.monotonic() - start

    threads = {n: threading.Thread(target=runner, args=(n, fn), name=f"workbench-wait-{n}", daemon=True)
               for n, fn in calls.items()}
    reported: set[str] = set()
    try:
        for t in threads.values():
            t.start()
        while True:
            for n in calls:
                if n in finished and n not in reported:
                    reported.add(n)
                    if n in errors:
                        lines.done(n, f"failed: {_first_line(errors[n])}", finished[n], ok=False)
                    else:
                        text = describe(n, results.get(n)) if describe else "ready"
                        lines.done(n, text, finished[n])
                elif n not in finished:
                    lines.update(n, status(n) if status else "waiting", time.monotonic() - start)
            if len(reported) == len(calls):
                break
            if errors:  # one failed: stop waiting for the others
                cancel.set()
            time.sleep(poll)
    except KeyboardInterrupt:
        cancel.set()
        lines.interrupt(time.monotonic() - start)
        for t in threads.values():
            if t.is_alive():
                t.join(timeout=2.0)
        raise
    real_errors = {n: e for n, e in errors.items() if not isinstance(e, WaitCancelled)}
    if real_errors:
        raise next(iter(real_errors.values()))
    return results


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    for line in text.splitlines():
        if line.strip() and not set(line.strip()) <= set("=-─━"):
            return line.strip()[:200]
    return text[:200]
