"""Choosing a deployment's engine (deployment/engines.py): shapes, the server default, the replica command,
and a clear 400 when a vLLM shape is asked for where vLLM's environment is missing. No vLLM needed."""

from __future__ import annotations

import sys

import pytest

from conftest import TINY, start_backend, stop_backend
from workbench.backend.deployment import engines


@pytest.mark.parametrize("shape,engine", [
    ("accounts/workbench/deploymentShapes/vllm-cpu", "vllm"),
    ("accounts/workbench/deploymentShapes/vllm-cpu/versions/1", "vllm"),
    ("accounts/acme/deploymentShapes/vllm", "vllm"),
    ("vllm-cuda", "vllm"),
    ("accounts/workbench/deploymentShapes/qwen3-tiny-cpu/versions/1", None),
    ("", None),
    (None, None),
])
def test_shape_selects_engine(shape, engine):
    assert engines.shape_engine(shape) == engine


def test_server_default_and_shape_override(monkeypatch):
    monkeypatch.delenv(engines.DEFAULT_ENGINE_ENV, raising=False)
    assert engines.deployment_engine({}) == "builtin"
    assert engines.deployment_engine({"deploymentShape": "accounts/workbench/deploymentShapes/vllm-cpu"}) == "vllm"
    monkeypatch.setenv(engines.DEFAULT_ENGINE_ENV, "vllm")
    assert engines.deployment_engine({"deploymentShape": "accounts/workbench/deploymentShapes/other"}) == "vllm"
    monkeypatch.setenv(engines.DEFAULT_ENGINE_ENV, "tensorrt")
    with pytest.raises(ValueError, match="WORKBENCH_DEPLOYMENT_ENGINE"):
        engines.default_engine()


def test_replica_command(tmp_path, monkeypatch):
    python, args, env = engines.replica_command("builtin", tmp_path)
    assert python == sys.executable and args[:2] == ["-m", "workbench.backend.deployment"] and env == {}
    monkeypatch.setenv("WORKBENCH_VLLM_VENV", str(tmp_path / "absent"))
    ok, why = engines.vllm_available()
    assert not ok and "scripts/install_vllm.sh" in why
    with pytest.raises(RuntimeError, match="install_vllm.sh"):
        engines.replica_command("vllm", tmp_path)
    # a venv with a vllm package: the vLLM interpreter, with this checkout importable
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / "lib" / "python3.11" / "site-packages" / "vllm").mkdir(parents=True)
    (venv / "lib" / "python3.11" / "site-packages" / "vllm" / "__init__.py").write_text("")
    monkeypatch.setenv("WORKBENCH_VLLM_VENV", str(venv))
    python, args, env = engines.replica_command("vllm", tmp_path / "dep")
    assert python == str(venv / "bin" / "python")
    assert args[:2] == ["-m", "workbench.backend.deployment.vllm_replica"]
    assert str(engines.workbench_root()) in env["PYTHONPATH"].split(":")
    assert (engines.workbench_root() / "workbench" / "__init__.py").exists()


def test_vllm_shape_without_vllm_is_a_clear_400(tmp_path):
    b = start_backend(tmp_path / "home", env={"WORKBENCH_VLLM_VENV": str(tmp_path / "no-vllm")})
    try:
        r = b.post("/v1/accounts/workbench/deployments?deploymentId=v1", json={
            "baseModel": TINY, "deploymentShape": "accounts/workbench/deploymentShapes/vllm-cpu"})
        assert r.status_code == 400, r.text
        assert "vllm-cpu" in r.text and "install_vllm.sh" in r.text
        assert b.get("/v1/accounts/workbench/deployments/v1").status_code == 404
    finally:
        stop_backend(b)
