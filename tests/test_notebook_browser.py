"""The quickstart notebook in a real browser: JupyterLab + headless Chromium (Debian's `chromium`, driven by
Playwright's Python package) runs `notebooks/01_quickstart.ipynb` from a clean copy (no saved outputs, no saved
widget state, plus one added cell showing `wb.compare([run], eval="colors")`) and the dashboard must render: the
weight-sync panel has an image and one row per sync, the checkpoint table widget has data rows, the eval chart and
the comparison chart show images. The notebook's last cell runs `run.close(stop_backend=True)`; pressing the
dashboard's Refresh afterwards must say that the backend is stopped. A screenshot is kept in
`test-artifacts/quickstart.png` (plus one per dashboard tab).

Skipped only when `/usr/bin/chromium` or the `playwright` package is missing (scripts/install.sh installs both
where it can). Everything the notebook starts — the kernel, its workbench backend, trainers, deployments — runs
with a marker in its environment, and the test fails if any such process outlives JupyterLab.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "01_quickstart.ipynb"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
RUN_TIMEOUT_S = 600  # the notebook trains 40 steps and evaluates 5 times on a shared (loaded) 2-core CI machine
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# JupyterLab user settings for the test: every cell stays in the DOM (no windowed rendering), no news or
# update checks (there is no network), no autosave racing the kernel.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}


def _require_browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install chromium); the browser test needs it")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright Python package is missing (pip install playwright); the browser test needs it")


COMPARE_CELL = 'wb.compare([run], eval="colors")  # added by the browser test: the comparison chart'


def _clean_copy(src: Path, dst: Path) -> None:
    """The notebook without outputs, execution counts or saved widget state, so that everything the browser
    shows afterwards comes from this run; a comparison-chart cell is added before the clean-up cell."""
    nb = json.loads(src.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb["metadata"].pop("widgets", None)
    nb["cells"].insert(len(nb["cells"]) - 1, {"cell_type": "code", "execution_count": None, "id": "wb-compare",
                                              "metadata": {}, "outputs": [], "source": [COMPARE_CELL]})
    dst.write_text(json.dumps(nb, indent=1))


def _marked_pids(marker: str) -> list[int]:
    """Live processes whose environment carries the marker (everything started from this test's JupyterLab)."""
    needle = f"WB_BROWSER_TEST={marker}".encode()
    pids = []
    for d in glob.glob("/proc/[0-9]*"):
        pid = int(d.rsplit("/", 1)[1])
        if pid == os.getpid():
            continue
        try:
            if needle in Path(d, "environ").read_bytes().split(b"\0"):
                stat = Path(d, "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies are gone already
                    pids.append(pid)
        except OSError:
            continue
    return sorted(pids)


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:
            pass
    return "\n".join(out)


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on a free loopback port with a token, rooted at a clean copy of the notebooks folder."""
    _require_browser()
    root, tmp = tmp_path / "notebooks", tmp_path / "tmp"
    shutil.copytree(REPO / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    _clean_copy(REPO / "notebooks" / NOTEBOOK, root / NOTEBOOK)
    tmp.mkdir()
    settings = tmp_path / "lab-settings"
    for name, value in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    runtime = tmp_path / "runtime"
    marker, token = uuid.uuid4().hex, uuid.uuid4().hex
    env = dict(os.environ, WB_BROWSER_TEST=marker, TMPDIR=str(tmp),  # the notebook's mkdtemp lands in tmp_path
               JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"), JUPYTER_RUNTIME_DIR=str(runtime),
               JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    env.pop("WORKBENCH_HOME", None)
    log = open(tmp_path / "jupyterlab.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", "--port=0",
         f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
         "--LabApp.expose_app_in_browser=True", "--ServerApp.terminals_enabled=False",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    try:
        info, deadline = None, time.time() + 120
        while info is None:
            for f in runtime.glob("jpserver-*.json"):
                data = json.loads(f.read_text() or "{}")
                if data.get("pid") == proc.pid:
                    info = data
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("JupyterLab did not start:\n" + (tmp_path / "jupyterlab.log").read_text()[-4000:])
            time.sleep(0.2)
        base = f"http://127.0.0.1:{info['port']}{info.get('base_url', '/')}"
        yield dict(url=f"{base}lab/tree/{NOTEBOOK}?token={token}", base=base, token=token, proc=proc,
                   marker=marker, log=tmp_path / "jupyterlab.log", tmp=tmp, root=root)
    finally:
        _stop_lab(proc)
        log.close()
        for pid in _marked_pids(marker):  # never leave anything of ours behind, even when the test failed
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _stop_lab(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server shuts its kernels down on SIGTERM
        except ProcessLookupError:
            pass
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# Evaluated in the page: the open notebook's kernel status and, per code cell, execution count and errors.
STATE_JS = """() => {
  const app = window.jupyterapp;
  const panel = app && app.shell.currentWidget;
  if (!panel || !panel.sessionContext || !panel.content || !panel.content.model) return null;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = [];
  const model = panel.content.model;
  for (let i = 0; i < model.cells.length; i++) {
    const c = model.cells.get(i);
    if (c.type !== 'code') continue;
    const errors = [];
    for (let j = 0; j < c.outputs.length; j++) {
      const o = c.outputs.get(j).toJSON();
      if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue + '\\n' + (o.traceback || []).join('\\n'));
    }
    cells.push({count: c.executionCount, errors: errors, source: c.sharedModel.getSource().slice(0, 60)});
  }
  return {kernel: kernel ? kernel.status : 'none', ready: panel.sessionContext.isReady, cells: cells};
}"""


def _wait_for_run(page, started: float) -> dict:
    """Poll until every code cell has run and the kernel is idle; fail fast on an error output."""
    state = None
    while time.time() - started < RUN_TIMEOUT_S:
        state = page.evaluate(STATE_JS)
        if state:
            errors = [e for c in state["cells"] for e in c["errors"]]
            if errors:
                pytest.fail("a notebook cell raised:\n" + errors[0][-3000:])
            if state["kernel"] == "idle" and state["cells"] and all(c["count"] for c in state["cells"]):
                return state
        time.sleep(2)
    pytest.fail(f"the notebook did not finish in {RUN_TIMEOUT_S}s; last state: {json.dumps(state)[:3000]}")


def test_quickstart_dashboard_renders_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "quickstart.png"
    for old in ARTIFACTS.glob("quickstart*.png"):
        old.unlink()
    t0 = time.time()
    with sync_playwright() as pw:
        # a fresh profile (--user-data-dir) in tmp_path; Playwright passes it for a persistent context
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            console = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
            page.goto(lab["url"], wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_function(
                """() => { const p = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                           return p && p.sessionContext && p.sessionContext.isReady && p.context.isReady
                                  && p.sessionContext.session && p.sessionContext.session.kernel
                                  && p.sessionContext.session.kernel.status === 'idle'; }""",
                timeout=120_000, polling=500)
            started = time.time()
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            state = _wait_for_run(page, started)
            run_s = time.time() - started

            # The dashboard is the output of the `run.dashboard(...)` cell: a Tab widget.
            cell = page.locator(".jp-CodeCell", has=page.locator(".jp-InputArea", has_text="run.dashboard("))
            expect(cell).to_have_count(1)
            out = cell.locator(".jp-OutputArea")
            out.scroll_into_view_if_needed()
            tabs = out.locator(".lm-TabBar-tab")
            expect(tabs).to_have_count(5, timeout=30_000)

            tabs.filter(has_text="weight syncs").click()
            sync_img = out.locator(".widget-tab-contents img:visible").first
            expect(sync_img).to_be_visible(timeout=30_000)
            page.wait_for_function("(el) => el.complete && el.naturalWidth > 100", arg=sync_img.element_handle(),
                                   timeout=30_000)
            sync_rows = out.locator(".widget-tab-contents table:visible tr:has(td)")
            expect(sync_rows.first).to_be_visible(timeout=30_000)
            sync_text = out.locator(".widget-tab-contents table:visible").first.inner_text()
            assert sync_rows.count() >= 3 and "base" in sync_text and "delta" in sync_text, sync_text
            out.screenshot(path=str(ARTIFACTS / "quickstart-dashboard-syncs.png"))

            tabs.filter(has_text="checkpoints").click()
            rows = out.locator(".widget-tab-contents table:visible tr:has(td)")
            expect(rows.first).to_be_visible(timeout=30_000)
            n_rows = rows.count()
            table_text = out.locator(".widget-tab-contents table:visible").first.inner_text()
            assert n_rows >= 1 and "base" in table_text, table_text
            out.screenshot(path=str(ARTIFACTS / "quickstart-dashboard-checkpoints.png"))

            tabs.filter(has_text="evals").click()
            img = out.locator(".widget-tab-contents img:visible").first
            expect(img).to_be_visible(timeout=30_000)
            page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=img.element_handle(),
                                   timeout=30_000)
            size = img.evaluate("(el) => [el.naturalWidth, el.naturalHeight]")
            assert size[0] > 100 and size[1] > 100, size
            out.screenshot(path=str(ARTIFACTS / "quickstart-dashboard-evals.png"))

            # The comparison chart (the added cell) renders an image with data.
            compare = page.locator(".jp-CodeCell", has=page.locator(".jp-InputArea", has_text="wb.compare("))
            cmp_img = compare.locator(".jp-OutputArea img:visible").first
            expect(cmp_img).to_be_visible(timeout=30_000)
            page.wait_for_function("(el) => el.complete && el.naturalWidth > 100", arg=cmp_img.element_handle(),
                                   timeout=30_000)
            assert "1 runs" in compare.locator(".jp-OutputArea").inner_text()

            # The last cell stopped the backend: Refresh on the dashboard must say so.
            out.scroll_into_view_if_needed()
            out.locator("button:has-text('Refresh')").first.click()
            expect(out).to_contain_text("the backend is stopped", timeout=60_000)
            expect(out).to_contain_text("STOPPED", timeout=10_000)

            # The whole page, with the dashboard scrolled into view.
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    print(f"\nquickstart ran in {run_s:.0f}s ({len(state['cells'])} code cells; {time.time() - t0:.0f}s with "
          f"browser start); table rows: {n_rows}; chart {size[0]}x{size[1]}; screenshot: {shot}")
    if console:
        print("browser console errors:\n  " + "\n  ".join(console[:10]))

    # The notebook stopped its backend in its last cell (the backend runs in its own session, so stopping
    # JupyterLab would not stop it): only JupyterLab and the kernel may still run now, and nothing at all
    # once JupyterLab is gone.
    alive = _marked_pids(lab["marker"])
    assert lab["proc"].pid in alive, "the marker check sees nothing: it would not find leftovers either"
    server = lab["proc"].pid
    deadline = time.time() + 30
    while True:
        left = [p for p in _marked_pids(lab["marker"]) if p != server and _ppid(p) != server]  # not lab/kernel
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not left, "the notebook's last cell left its backend running:\n" + _describe(left)
    _stop_lab(lab["proc"])
    deadline = time.time() + 30
    while _marked_pids(lab["marker"]) and time.time() < deadline:
        time.sleep(0.5)
    left = _marked_pids(lab["marker"])
    assert not left, "processes left behind by the notebook:\n" + _describe(left)
    assert not (lab["root"] / "tutorial-runs" / "01_quickstart").exists(), "the last cell did not remove its folder"
