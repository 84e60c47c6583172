"""Which engine serves a deployment, and the command that starts its replica process.

    engine = deployment_engine(dep)            # "builtin" or "vllm", from the deployment's record
    python, args, env = replica_command(engine, run_dir)
    ok, why = vllm_available()                 # is vLLM's environment installed (scripts/install_vllm.sh)?

A deployment runs on the built-in batching engine (the default: the embedded CPU models) or on vLLM. It
is chosen per deployment by its shape, the field the SDK's `DeploymentConfig.deployment_shape` already
sends: `accounts/<account>/deploymentShapes/vllm-cpu` (or `vllm`, `vllm-cuda`, any shape id starting
with "vllm", with or without `/versions/<v>`) selects vLLM; any other shape, or none, selects the
server-wide default: `workbench serve --deployment-engine {builtin,vllm}` (env WORKBENCH_DEPLOYMENT_ENGINE),
itself "builtin" unless set.

vLLM pins its own torch/transformers, so its replica runs with the interpreter of vLLM's own environment
(`$WORKBENCH_VLLM_VENV`, default ~/.cache/workbench/vllm-venv, built by scripts/install_vllm.sh) and
imports workbench from this checkout through PYTHONPATH. Nothing here imports vLLM or torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENGINES = ("builtin", "vllm")
DEFAULT_ENGINE_ENV = "WORKBENCH_DEPLOYMENT_ENGINE"
VLLM_SHAPE_PREFIX = "vllm"


def default_engine() -> str:
    engine = os.environ.get(DEFAULT_ENGINE_ENV, "builtin") or "builtin"
    if engine not in ENGINES:
        raise ValueError(f"{DEFAULT_ENGINE_ENV}={engine!r}: choose one of {list(ENGINES)}")
    return engine


def shape_engine(shape: str | None) -> str | None:
    """The engine a deployment shape name selects, or None when the shape says nothing about it."""
    if not shape:
        return None
    parts = str(shape).split("/")
    shape_id = parts[3] if len(parts) >= 4 and parts[2] == "deploymentShapes" else parts[-1]
    return "vllm" if shape_id.startswith(VLLM_SHAPE_PREFIX) else None


def deployment_engine(dep: dict) -> str:
    """The engine of a deployment record (its deploymentShape, else the server default)."""
    return shape_engine(dep.get("deploymentShape")) or default_engine()


def vllm_venv() -> Path:
    return Path(os.environ.get("WORKBENCH_VLLM_VENV") or Path.home() / ".cache" / "workbench" / "vllm-venv")


def vllm_python() -> Path:
    return vllm_venv() / "bin" / "python"


def vllm_available() -> tuple[bool, str]:
    """(True, "") when vLLM's environment is installed; else (False, why, naming the fix)."""
    py = vllm_python()
    if not py.exists():
        return False, (f"vLLM's environment is not installed ({py} does not exist): "
                       "run `bash scripts/install_vllm.sh`")
    site = list((vllm_venv() / "lib").glob("python*/site-packages/vllm/__init__.py"))
    if not site:
        return False, f"{vllm_venv()} has no vllm package: run `bash scripts/install_vllm.sh`"
    return True, ""


def workbench_root() -> Path:
    """The directory that holds the `workbench` package this process runs."""
    return Path(__file__).resolve().parents[3]


def replica_command(engine: str, run_dir: Path) -> tuple[str, list[str], dict]:
    """(interpreter, args, extra env) of a replica process for `engine`."""
    if engine == "vllm":
        ok, why = vllm_available()
        if not ok:
            raise RuntimeError(why)
        env = {"PYTHONPATH": os.pathsep.join(p for p in (str(workbench_root()), os.environ.get("PYTHONPATH"))
                                             if p)}
        return str(vllm_python()), ["-m", "workbench.backend.deployment.vllm_replica",
                                    "--deployment-dir", str(run_dir)], env
    return sys.executable, ["-m", "workbench.backend.deployment", "--deployment-dir", str(run_dir)], {}
