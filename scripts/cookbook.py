"""Run the official Fireworks cookbook (fw-ai/cookbook, package `training/`) against a local workbench backend.

    scripts/cookbook.sh                      # everything: recipes, tools, e2e tests; one line each + a summary
    scripts/cookbook.sh sft_loop e2e         # only these items / groups (recipes, tools, e2e, or item names)
    scripts/cookbook.sh --list               # the items

What it does:
1. Gets the cookbook's `training/` tree at COOKBOOK_REF from COOKBOOK_GIT (a git URL or a local git
   directory, bare or not) into COOKBOOK_HOME/src-<ref> (never into this repository).
2. Creates COOKBOOK_HOME/venv-<ref>, a virtual environment of its own (cached; rebuilt when the ref changes),
   and installs there: torch, the cookbook (`pip install -e training`, which pulls its pinned
   transformers, tinker-cookbook and PyPI `tinker`), pytest, and this checkout of workbench (`--no-deps`,
   non-editable) for `workbench-tinker.pth`, so that `import tinker` is the Fireworks SDK's surface.
3. Starts `workbench serve` (WORKBENCH_PYTHON, a temporary home) and points the cookbook at it with
   FIREWORKS_BASE_URL / FIREWORKS_API_KEY and the FIREWORKS_E2E_* variables (model, shapes, tokenizer).
4. Runs each item in its own process of the cookbook's environment (scripts/cookbook_items.py for recipes
   and tools, pytest for the e2e tests with scripts/cookbook_plugin.py, which serves the e2e tests' GSM8K
   download from scripts/cookbook_data/gsm8k_sample.jsonl), with a per-item time limit, and prints
   `PASS|FAIL <item> <seconds> <last error line>`, then a summary; logs go to COOKBOOK_HOME/logs/<run>/.
Exit status: 0 when every selected item passed.

Environment (all optional):
  COOKBOOK_GIT       git URL or local git dir   (default https://github.com/fw-ai/cookbook.git)
  COOKBOOK_REF       commit or branch           (default: the commit this harness was last checked with)
  COOKBOOK_HOME      cache directory            (default ~/.cache/workbench-cookbook)
  COOKBOOK_TORCH     pip requirement for torch  (default torch==2.13.0; a CPU wheel index may be needed)
  COOKBOOK_SDK       pip requirement for the SDK (default: whatever the cookbook resolves)
  COOKBOOK_TIMEOUT   seconds per recipe / tool  (default 900)
  COOKBOOK_E2E_TIMEOUT seconds per e2e test     (default 2400: a resume test is two whole runs, and the
                     GRPO ones sample up to the context length on CPU)
  COOKBOOK_RENDER_WORKERS  render worker processes the e2e tests' DataLoaders may start (default 0:
                     in-process; see scripts/cookbook_plugin.py)
  WORKBENCH_PYTHON   python that runs `workbench serve` (default: this interpreter)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
DEFAULT_GIT = "https://github.com/fw-ai/cookbook.git"
DEFAULT_REF = "76821fa1"          # fw-ai/cookbook main, 2026-11 (the version this harness was checked with)
MODEL = "accounts/workbench/models/qwen3-tiny"
SHAPE = "accounts/workbench/trainingShapes/qwen3-tiny-cpu"
LORA_SHAPE = "accounts/workbench/trainingShapes/qwen3-tiny-lora-cpu"
DEPLOYMENT_SHAPE = "accounts/workbench/deploymentShapes/qwen3-tiny-cpu/versions/1"   # named by the shape; informational
TOKENIZER = "workbench/qwen3-tiny"   # offline Hugging Face cache entry of the shipped tokenizer (workbench.cookbook)

RECIPES = ["sft_loop", "dpo_loop", "dpo_loop_lora", "orpo_loop", "rl_loop_full_kl", "rl_loop_lora_kl",
           "igpo_loop", "async_rl_loop"]
TOOLS = ["list_checkpoints", "promote_checkpoint", "verify_logprobs"]
E2E = ["test_sft_e2e.py", "test_dpo_e2e.py", "test_grpo_e2e.py", "test_sft_resume_e2e.py",
       "test_dpo_resume_e2e.py::*[full]", "test_dpo_resume_e2e.py::*[lora]",
       "test_grpo_resume_e2e.py::*[full]", "test_grpo_resume_e2e.py::*[lora]"]


def log(msg: str) -> None:
    print(f"[cookbook] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# ---- 1. source -----------------------------------------------------------------------------------------
def fetch_source(home: Path, git: str, ref: str) -> Path:
    dest = home / f"src-{ref}"
    if (dest / "training" / "pyproject.toml").exists():
        return dest
    if Path(git).is_dir():
        gitdir = Path(git)
    else:
        gitdir = home / "git"
        if not gitdir.exists():
            log(f"cloning {git}")
            run(["git", "clone", "--bare", "--filter=blob:none", git, gitdir])
        else:
            run(["git", "--git-dir", gitdir, "fetch", "-q", "origin", "+refs/heads/*:refs/heads/*"])
    tmp = Path(tempfile.mkdtemp(dir=home))
    # Only training/ is needed; archiving it also works with partial mirrors that lack other large blobs.
    archive = subprocess.run(["git", "-C", str(gitdir), "archive", ref, "training"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    tmp.rename(dest)
    log(f"cookbook {ref} -> {dest}")
    return dest


# ---- 2. environment -----------------------------------------------------------------------------------
def ensure_venv(home: Path, src: Path, ref: str) -> Path:
    venv = home / f"venv-{ref}"
    py = venv / "bin" / "python"
    torch_req = os.environ.get("COOKBOOK_TORCH", "torch==2.13.0")
    sdk_req = os.environ.get("COOKBOOK_SDK", "")
    stamp = venv / ".workbench-stamp"
    want = hashlib.sha256(f"{ref}|{torch_req}|{sdk_req}".encode()).hexdigest()
    if not (py.exists() and stamp.exists() and stamp.read_text() == want):
        log(f"creating {venv} (once per cookbook ref; several minutes)")
        shutil.rmtree(venv, ignore_errors=True)
        run([sys.executable, "-m", "venv", venv])
        pip = [py, "-m", "pip", "install", "-q"]
        run(pip + [torch_req])
        run(pip + ["-e", src / "training", "pytest", "pytest-timeout"] + ([sdk_req] if sdk_req else []))
        stamp.write_text(want)
    # workbench itself on every run (this checkout may have changed): the .pth that claims `import tinker`
    # and the tokenizer cache entry come from it. --no-deps: the cookbook's pins stay as they are.
    run([py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", "--no-build-isolation", REPO],
        stdout=subprocess.DEVNULL)
    return py


# ---- 3. backend ---------------------------------------------------------------------------------------
def start_backend(home: Path) -> tuple[subprocess.Popen, str, str]:
    py = os.environ.get("WORKBENCH_PYTHON", sys.executable)
    home.mkdir(parents=True, exist_ok=True)
    out = open(home / "serve.log", "ab")
    proc = subprocess.Popen([py, "-m", "workbench.cli", "serve", "--home", str(home), "--port", "0"],
                            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, WORKBENCH_HOME=str(home)),
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        info = home / "server.json"
        if info.exists():
            data = json.loads(info.read_text())
            if data.get("pid") == proc.pid:
                return proc, data["base_url"], (home / "api_key").read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError((home / "serve.log").read_text())
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("workbench serve did not start")


def stop_backend(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


# ---- 4. items -----------------------------------------------------------------------------------------
def item_env(base_url: str, api_key: str, hf_home: Path, work: Path) -> dict:
    env = dict(os.environ)
    for k in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(k, None)
    env.update({
        "FIREWORKS_API_KEY": api_key, "FIREWORKS_BASE_URL": base_url,
        "FIREWORKS_E2E_MODEL": MODEL, "FIREWORKS_E2E_TOKENIZER_MODEL": TOKENIZER, "FIREWORKS_E2E_TOKENIZER": TOKENIZER,
        "FIREWORKS_E2E_TRAINING_SHAPE": os.environ.get("COOKBOOK_SHAPE", SHAPE),
        "FIREWORKS_E2E_LORA_TRAINING_SHAPE": os.environ.get("COOKBOOK_LORA_SHAPE", LORA_SHAPE),
        "FIREWORKS_E2E_REFERENCE_TRAINING_SHAPE": os.environ.get("COOKBOOK_REFERENCE_SHAPE", LORA_SHAPE),
        "FIREWORKS_E2E_DEPLOYMENT_SHAPE": os.environ.get("COOKBOOK_DEPLOYMENT_SHAPE", DEPLOYMENT_SHAPE),
        "FIREWORKS_E2E_DEPLOYMENT_ACCELERATOR": "",
        "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
        "COOKBOOK_WORK": str(work), "COOKBOOK_GSM8K": str(SCRIPTS / "cookbook_data" / "gsm8k_sample.jsonl"),
        "COOKBOOK_MODEL": MODEL, "COOKBOOK_TOKENIZER": TOKENIZER,
        "COOKBOOK_SHAPE": os.environ.get("COOKBOOK_SHAPE", SHAPE),
        "COOKBOOK_LORA_SHAPE": os.environ.get("COOKBOOK_LORA_SHAPE", LORA_SHAPE),
        "COOKBOOK_REFERENCE_SHAPE": os.environ.get("COOKBOOK_REFERENCE_SHAPE", LORA_SHAPE),
    })
    return env


def command_for(item: str, py: Path, src: Path) -> list:
    if item.startswith("test_"):
        path, _, sel = item.partition("::")
        cmd = [py, "-m", "pytest", "-x", "-q", "-s", "-p", "cookbook_plugin", "-o", "addopts=", "-rA",
               f"training/tests/e2e/{path}"]
        if sel:
            cmd += ["-k", sel.replace("*[", "").rstrip("]")]
        return cmd
    return [py, SCRIPTS / "cookbook_items.py", item]


def last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    raised = [ln for ln in lines if ln.startswith("E ") and any(k in ln for k in ("Error", "assert", "Exception"))]
    if raised:                       # pytest: the exception it reported
        return raised[0][:400]
    for ln in reversed(lines):
        if any(k in ln for k in ("Error", "error:", "Exception", "FAILED", "assert", "Traceback")):
            return ln[:400]
    return lines[-1][:400] if lines else ""


def run_item(item: str, py: Path, src: Path, env: dict, logdir: Path, timeout: float) -> tuple[bool, float, str]:
    logfile = logdir / (item.replace("/", "_").replace("::", "-").replace("*", "").replace("[", "-").strip("]") + ".log")
    env = dict(env, PYTHONPATH=str(SCRIPTS))
    t0 = time.time()
    with open(logfile, "wb") as out:
        proc = subprocess.Popen([str(c) for c in command_for(item, py, src)], cwd=src, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False, time.time() - t0, f"timed out after {timeout:.0f}s (log {logfile})"
    text = logfile.read_text(errors="replace")
    if item.startswith("test_"):     # pytest exits 0 when everything was skipped: that is not a pass
        summary = text.strip().splitlines()[-1] if text.strip() else ""
        ok = rc == 0 and "passed" in summary and "skipped" not in summary
    else:
        ok = rc == 0
    return ok, time.time() - t0, "" if ok else f"{last_error(text)} (log {logfile})"


def select(args: list[str]) -> list[str]:
    groups = {"recipes": RECIPES, "tools": TOOLS, "e2e": E2E}
    if not args:
        return RECIPES + TOOLS + E2E
    out = []
    for a in args:
        out += groups.get(a, [a])
    return out


def main(argv: list[str]) -> int:
    if "--list" in argv:
        print("\n".join(RECIPES + TOOLS + E2E))
        return 0
    items = select(argv)
    home = Path(os.environ.get("COOKBOOK_HOME", Path.home() / ".cache" / "workbench-cookbook")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    ref = os.environ.get("COOKBOOK_REF", DEFAULT_REF)
    t_all = time.time()
    src = fetch_source(home, os.environ.get("COOKBOOK_GIT", DEFAULT_GIT), ref)
    py = ensure_venv(home, src, ref)
    hf_home = home / "hf"
    run([py, "-m", "workbench.cookbook", "hf-cache", hf_home], stdout=subprocess.DEVNULL)
    logdir = home / "logs" / time.strftime("%Y%m%d-%H%M%S")
    logdir.mkdir(parents=True)
    timeout = float(os.environ.get("COOKBOOK_TIMEOUT", "900"))
    e2e_timeout = float(os.environ.get("COOKBOOK_E2E_TIMEOUT", "2400"))
    wb_home = Path(tempfile.mkdtemp(prefix="wb-cookbook-"))
    proc, base_url, api_key = start_backend(wb_home)
    log(f"backend {base_url} (home {wb_home}); setup took {time.time() - t_all:.0f}s; logs in {logdir}")
    results = []
    try:
        env = item_env(base_url, api_key, hf_home, logdir / "work")
        for item in items:
            ok, secs, err = run_item(item, py, src, env, logdir, e2e_timeout if item.startswith("test_") else timeout)
            results.append((item, ok, secs, err))
            print(f"{'PASS' if ok else 'FAIL'} {item:40s} {secs:6.0f}s {err}", flush=True)
    finally:
        stop_backend(proc)
    passed = sum(ok for _, ok, _, _ in results)
    print(f"{passed} passed, {len(results) - passed} failed ({time.time() - t_all:.0f}s in all)")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
