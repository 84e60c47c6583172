"""The shared helpers (workbench.common) and the path layout (workbench.checkpoints.layout)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys

import pytest

from workbench.checkpoints.layout import HomeLayout, JobLayout, hold_job_lock, job_lock_owner
from workbench.common import (
    api_key_ok,
    atomic_write_bytes,
    default_training_shape,
    error_body,
    is_resource_id,
    parse_rfc3339,
    release_free_memory,
    rfc3339,
    run_async,
    write_json_atomic,
)


def test_atomic_write_replaces_whole_file_and_sets_mode(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"a": 1}, mode=0o600)
    assert json.loads(path.read_text()) == {"a": 1}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind


def test_atomic_write_refuses_non_finite_json_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"ttl": 1})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"ttl": float("inf")})
    assert json.loads(path.read_text()) == {"ttl": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_api_key_check_accepts_either_header_and_never_an_empty_key():
    assert api_key_ok({"x-api-key": "k1"}, "k1")
    assert api_key_ok({"authorization": "Bearer k1"}, "k1")
    assert api_key_ok({"x-api-key": "wrong", "authorization": "bearer k1"}, "k1")
    assert not api_key_ok({"x-api-key": "k2"}, "k1")
    assert not api_key_ok({}, "k1")
    assert not api_key_ok({"x-api-key": ""}, "")


def test_rfc3339_round_trips_and_sorts_as_time():
    t = 1_700_000_000.123456
    assert abs(parse_rfc3339(rfc3339(t)) - t) < 1e-5
    assert rfc3339(t) < rfc3339(t + 0.5) < rfc3339(t + 10)
    assert rfc3339(t).endswith("Z")


def test_error_body_shape():
    assert error_body(404, "x") == {"error": {"code": 5, "message": "x", "status": "NOT_FOUND", "details": []}}
    assert error_body(507, "full")["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert error_body(499, "?")["error"]["status"] == "UNKNOWN"


def test_resource_ids_are_full_matched():
    assert is_resource_id("job-1")
    for bad in ("abc\n", "Abc", "-a", "a-", "a" * 64, "a/b", "..", "", None, 3):
        assert not is_resource_id(bad), bad


def test_default_training_shape():
    tiny = "accounts/workbench/models/qwen3-tiny"
    assert default_training_shape(tiny, 0) == "accounts/workbench/trainingShapes/qwen3-tiny-cpu"
    assert default_training_shape(tiny, 8) == "accounts/workbench/trainingShapes/qwen3-tiny-lora-cpu"
    assert default_training_shape(tiny, 0, role="reference") == "accounts/workbench/trainingShapes/qwen3-tiny-ref-cpu"
    assert default_training_shape("accounts/fireworks/models/qwen3-8b", 0) is None


def test_run_async_inside_a_running_loop():
    async def double(x):
        await asyncio.sleep(0)
        return 2 * x

    assert run_async(lambda: double(3)) == 6

    async def outer():  # as in a Jupyter cell: a loop is already running in this thread
        return run_async(lambda: double(4))

    assert asyncio.run(outer()) == 8

    async def boom():
        raise KeyError("x")

    with pytest.raises(KeyError):
        run_async(boom)


def test_layout_names_every_path_and_refuses_bad_ids(tmp_path):
    home = HomeLayout(tmp_path)
    job = home.job("sft-1")
    assert job.root == tmp_path / "jobs" / "sft-1"
    assert job.train_state("step-4") == tmp_path / "jobs" / "sft-1" / "checkpoints" / "step-4"
    assert job.sampler("s-1") == tmp_path / "jobs" / "sft-1" / "sampler" / "s-1"
    assert job.config_file.name == "job.json" and job.lock_file.name == "trainer.lock"
    assert home.deployment("d-1").state_file == tmp_path / "deployments" / "d-1" / "state.json"
    assert home.model("workbench", "m-1") == tmp_path / "models" / "workbench" / "m-1"
    for bad in ("abc\n", "..", "a/b", "../x"):
        with pytest.raises(ValueError):
            home.job(bad)
        with pytest.raises(ValueError):
            home.deployment(bad)
    job.root.mkdir(parents=True)
    (tmp_path / "jobs" / "Not_An_Id").mkdir()
    assert [j.job_id for j in home.all_jobs()] == ["sft-1"]


def test_job_lock_is_held_by_one_live_process(tmp_path):
    job = JobLayout(tmp_path / "jobs" / "j")
    assert job_lock_owner(job) is None
    code = ("import sys, time; from pathlib import Path; "
            "from workbench.checkpoints.layout import JobLayout, hold_job_lock; "
            f"hold_job_lock(JobLayout(Path({str(job.root)!r}))); print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        assert job_lock_owner(job) == child.pid
        with pytest.raises(BlockingIOError):
            hold_job_lock(job)
    finally:
        child.kill()
        child.wait()
    assert job_lock_owner(job) is None  # the kernel released it with the process
    fd = hold_job_lock(job)
    os.close(fd)


def test_release_free_memory_returns_the_freed_heap_to_the_os():
    # In a fresh interpreter: 200 MB of 100 KB buffers (below glibc's mmap threshold, so on the heap), one
    # more allocated after them so the heap's top stays in use, then all but that one freed. glibc keeps
    # the freed pages (RSS stays up) until release_free_memory hands them back.
    code = """if True:
        from workbench.common import release_free_memory
        def rss():
            return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024
        chunks = [bytearray(100_000) for _ in range(2000)]
        keep = bytearray(100_000)
        del chunks
        held = rss()
        released = release_free_memory()
        print(held, rss(), released)
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    held, after, released = out.stdout.split()
    if released != "True":
        pytest.skip("no glibc malloc_trim on this platform")
    assert int(held) - int(after) >= 150, out.stdout   # MiB given back
