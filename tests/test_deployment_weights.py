"""WeightManager in-process: LoRA snapshots, state.json restore and chain compaction, a hot load
under concurrent sampling. (The HTTP/SDK side of hot loads is in test_deployment_process.py.)"""

from __future__ import annotations

import json
import time

import pytest
import torch

from workbench import checkpoints as ck
from workbench import models
from workbench.backend.deployment.engine import SamplingParams, Sequence
from workbench.backend.deployment.weights import MAX_CHAIN_DELTAS, WeightManager

TINY = models.DEFAULT_MODEL
META = {"previous_snapshot_identity": None, "compression_format": "arc_v2", "checksum_format": "alder32"}


def started(ddir, restoring: str | None = None) -> WeightManager:
    ddir.mkdir(exist_ok=True)
    # the snapshots of these tests live under tmp_path: that is the replica's workbench home
    wm = WeightManager(ddir, {"deployment_id": "d", "account": "x", "base_model": TINY, "home": str(ddir.parent)})
    wm.start()
    if restoring:   # while it rebuilds, a restarted replica reports the identity it is restoring
        assert wm.status()["replicas"][0]["current_snapshot_identity"] == restoring
    deadline = time.time() + 60
    while not wm.ready:
        assert wm.startup_error is None and time.time() < deadline, wm.startup_error
        time.sleep(0.02)
    return wm


def generate(wm, prompt, n=12, **kw) -> Sequence:
    s = Sequence(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=True, **kw))
    wm.engine.submit(s)
    assert s.done.wait(30) and s.error is None
    return s


def test_lora_snapshot_merges_like_peft_and_restores(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    # configured like the trainer's LoRA (train_unembed: a trained copy of the tied lm_head rides along)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                        modules_to_save=["lm_head"], ensure_weight_tying=True)
    peft_model = get_peft_model(models.load_model(TINY), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.05)
    root = tmp_path / "sampler"
    ck.save_sampler_lora(root / "adapter-1", peft_model, models.local_path(TINY), {"base_model": TINY})
    ck.save_sampler_base(root / "full-1", ck.bf16_state(models.load_model(TINY)), models.local_path(TINY), {})

    wm = started(tmp_path / "dep")
    try:
        # WeightSyncer with lora_rank left at 0 sends delta metadata for a LoRA save (flow4c): tolerated
        result = wm.hotload("adapter-1", {**META, "previous_snapshot_identity": "whatever"}, snapshot_root=str(root))
        assert result["kind"] == "lora"
        status = wm.status()["replicas"][0]
        assert status["current_snapshot_identity"] == "adapter-1"
        assert status["loaded_adapters"] == [{"identity": "adapter-1", "status": "loaded"}]
        prompt = [1, 9, 33, 120, 4]
        s = generate(wm, prompt)
        ref = PeftModel.from_pretrained(models.load_model(TINY), str(root / "adapter-1")).eval()
        with torch.no_grad():
            lsm = torch.log_softmax(ref(torch.tensor([prompt + s.token_ids])).logits[0].float(), -1)
        for j, t in enumerate(s.output):
            assert abs(t.logprob - float(lsm[len(prompt) - 1 + j, t.token_id])) < 1e-4
        # peft replaced modules inside the model it merged into: later loads into it must still land
        wm.hotload("full-1", None, snapshot_root=str(root))
        wm.hotload("adapter-1", None, snapshot_root=str(root))
        wm.hotload("full-1", None, snapshot_root=str(root))
        wm.hotload("adapter-1", None, snapshot_root=str(root))
        assert generate(wm, prompt).token_ids == s.token_ids
    finally:
        wm.stop()
    # a new process restores the adapter from state.json
    wm2 = started(tmp_path / "dep")
    try:
        assert wm2.current_identity == "adapter-1"
        assert generate(wm2, prompt).token_ids == s.token_ids
    finally:
        wm2.stop()


FORMATS = ("arc_v2", "workbench_v1")


@pytest.mark.parametrize("impl", ["plain", "transformers"])
def test_foreign_adapter_with_its_own_head_then_a_base_load(tmp_path, monkeypatch, impl):
    """An adapter trained elsewhere with a head of its own (modules_to_save, no weight tying) unties the
    served model's head; a base snapshot loaded after it ties it again and serves the base exactly. On
    both model implementations a replica can serve (workbench's plain-torch Qwen3, transformers')."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from workbench.models import qwen3_torch

    monkeypatch.setenv("WORKBENCH_DEPLOYMENT_MODEL_IMPL", impl)

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["lm_head"])
    peft_model = get_peft_model(models.load_model(TINY), config)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.05)
    root = tmp_path / "sampler"
    ck.save_sampler_lora(root / "foreign", peft_model, models.local_path(TINY), {"base_model": TINY})
    ck.save_sampler_base(root / "full", ck.bf16_state(models.load_model(TINY)), models.local_path(TINY), {})
    ck.save_sampler_base(root / "full-2", ck.bf16_state(models.load_model(TINY)), models.local_path(TINY), {})
    prompt = [1, 9, 33, 120, 4]

    def reference(model) -> list[int]:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt):]

    wm = started(tmp_path / "dep")
    try:
        assert isinstance(wm.model, qwen3_torch.Qwen3ForCausalLM) == (impl == "plain")
        wm.hotload("full", None, snapshot_root=str(root))
        base_ids = generate(wm, prompt).token_ids
        wm.hotload("foreign", None, snapshot_root=str(root))
        lora_ids = generate(wm, prompt).token_ids
        assert lora_ids == reference(PeftModel.from_pretrained(models.load_model(TINY), str(root / "foreign")).eval())
        wm.hotload("full", None, snapshot_root=str(root))        # into the spare, still tied
        assert generate(wm, prompt).token_ids == base_ids != lora_ids
        # the next load goes into the model the adapter untied (double buffering): was a 422,
        # "missing lm_head.weight"
        wm.hotload("full-2", None, snapshot_root=str(root))
        assert wm.model.lm_head.weight is wm.model.model.embed_tokens.weight
        assert generate(wm, prompt).token_ids == base_ids
        wm.hotload("foreign", None, snapshot_root=str(root))
        assert generate(wm, prompt).token_ids == lora_ids
    finally:
        wm.stop()


def test_long_delta_chain_is_compacted_and_restores(tmp_path):
    root = tmp_path / "sampler"
    model = models.load_model(TINY)
    g = torch.Generator().manual_seed(3)
    prev_w, prev_id = None, None
    names = []
    for step in range(MAX_CHAIN_DELTAS + 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)
        w = ck.bf16_state(model)
        name = f"step-{step}"
        if prev_w is None:
            ck.save_sampler_base(root / name, w, models.local_path(TINY), {})
        else:   # every other delta in workbench_v1, which decodes into the bf16 tensors the last swap retired
            ck.save_sampler_delta(root / name, w, prev_w, prev_id, {}, delta_format=FORMATS[step % 2])
        prev_w, prev_id = w, name
        names.append(name)

    wm = started(tmp_path / "dep")
    try:
        prompt = [1, 2, 3, 4, 5]
        # a long generation runs across every swap: loads never stall or break in-flight requests
        long = Sequence(prompt, SamplingParams(max_tokens=400, ignore_eos=True))
        wm.engine.submit(long)
        held = []
        for i, name in enumerate(names):
            meta = None if i == 0 else {**META, "previous_snapshot_identity": names[i - 1],
                                        "compression_format": FORMATS[i % 2]}
            wm.hotload(name, meta, snapshot_root=str(root))
            held.append({v.data_ptr() for v in wm.current_bf16.values()})
            if i >= 2 and FORMATS[i % 2] == "workbench_v1":
                assert held[-1] == held[-3]     # decoded into the tensors of two loads ago: nothing allocated
            if i:   # what the decode wrote into recycled buffers is exactly the trainer's weights
                want = ck.reconstruct([root / n for n in names[:i + 1]])
                assert all(torch.equal(v.view(torch.int16), want[k].view(torch.int16)) for k, v in wm.current_bf16.items())
        assert long.done.wait(60) and long.error is None and len(long.output) == 400
        state = json.loads((tmp_path / "dep" / "state.json").read_text())
        assert state["identity"] == names[-1]
        assert state["chain"][0]["kind"] == "materialized"
        assert sum(e["kind"] == "delta" for e in state["chain"]) <= MAX_CHAIN_DELTAS
        assert len(list((tmp_path / "dep" / "materialized").glob("*.safetensors"))) == 1
        expected = generate(wm, prompt).token_ids
        want = ck.reconstruct([root / n for n in names])
        for k, v in wm.current_bf16.items():
            assert torch.equal(v, want[k]), k
    finally:
        wm.stop()
    # the materialized file makes the restart independent of the snapshots it replaced
    still_needed = {e.get("dir") for e in state["chain"]}
    for name in names:
        if str(root / name) not in still_needed:
            for f in (root / name).iterdir():
                f.unlink()
    wm2 = started(tmp_path / "dep", restoring=names[-1])
    try:
        assert wm2.current_identity == names[-1] and wm2.status()["replicas"][0]["loading_state"]["stage"] == "done"
        assert generate(wm2, prompt).token_ids == expected
    finally:
        wm2.stop()


def test_restore_failure_falls_back_to_base(tmp_path):
    ddir = tmp_path / "dep"
    ddir.mkdir()
    (ddir / "state.json").write_text(json.dumps({"version": 1, "identity": "gone", "kind": "base",
                                                 "chain": [{"identity": "gone", "kind": "base",
                                                            "dir": str(tmp_path / "nope")}]}))
    wm = started(ddir, restoring="gone")
    try:
        replica = wm.status()["replicas"][0]
        assert replica["current_snapshot_identity"] is None and replica["readiness"] is True
        assert replica["loading_state"]["stage"] == "error" and "gone" in replica["loading_state"]["message"]
        generate(wm, [1, 2, 3], n=3)
    finally:
        wm.stop()


def test_snapshot_location_resolution(tmp_path):
    from workbench.backend.deployment.weights import HotloadError

    root = tmp_path / "bucket"
    ck.save_sampler_base(root / "snap-a", ck.bf16_state(models.load_model(TINY)), models.local_path(TINY), {})
    wm = started(tmp_path / "dep")
    try:
        # an absolute local source URL (a prefix, or the snapshot dir itself) needs no snapshot root
        assert wm.hotload("snap-a", source_url=str(root))["identity"] == "snap-a"
        assert wm.hotload("snap-a", source_url="file://" + str(root / "snap-a"))["identity"] == "snap-a"
        # a remote URL cannot be fetched here: the control plane's snapshot root is used instead
        assert wm.hotload("snap-a", snapshot_root=str(root), source_url="gs://bucket/prefix/")["kind"] == "base"
        for identity, kwargs, status in [("snap-a", {"source_url": "gs://bucket/prefix/"}, 400), ("snap-a", {}, 400),
                                         ("snap-b", {"snapshot_root": str(tmp_path)}, 404)]:
            with pytest.raises(HotloadError) as e:
                wm.hotload(identity, **kwargs)
            assert e.value.status == status
        # nothing is read from outside the home / configured snapshot roots, whichever header points there
        outside = tmp_path.parent / f"{tmp_path.name}-outside"
        ck.save_sampler_base(outside / "snap-a", ck.bf16_state(models.load_model(TINY)), models.local_path(TINY), {})
        (root / "link").symlink_to(outside / "snap-a")
        for kwargs, header in [({"source_url": str(outside)}, "x-fireworks-hot-load-source-url"),
                               ({"source_url": "file://" + str(outside / "snap-a")}, "x-fireworks-hot-load-source-url"),
                               ({"snapshot_root": str(outside)}, "x-workbench-snapshot-root")]:
            with pytest.raises(HotloadError) as e:
                wm.hotload("snap-a", **kwargs)
            assert e.value.status == 403 and e.value.field == header and header in e.value.message
        with pytest.raises(HotloadError) as e:
            wm.hotload("link", snapshot_root=str(root))     # a symlink out of the home is outside too
        assert e.value.status == 403
        wm.config["snapshot_roots"] = [str(outside)]        # a configured snapshot root is allowed
        assert wm.hotload("snap-a", source_url=str(outside))["identity"] == "snap-a"
        for bad in ("../snap-a", "", None, "a/b"):
            with pytest.raises(HotloadError) as e:
                wm.hotload(bad, snapshot_root=str(root))
            assert e.value.status == 400
        assert wm.current_identity == "snap-a"
    finally:
        wm.stop()


def test_hotload_guards_nonfinite_noop_fault_rollback_and_drain(tmp_path):
    """One replica through: a non-finite snapshot refused; loading what is held is a no-op; a disk
    full while recording state.json (fault hook) and a failed swap leave answer, live weights and
    restart state agreeing on the previous snapshot; drain keeps in-flight requests on the old
    weights; last_load reports the figures the notebook shows."""
    import errno

    from workbench.backend.deployment.weights import HotloadError

    root = tmp_path / "sampler"
    model = models.load_model(TINY)
    g = torch.Generator().manual_seed(5)
    snaps = {}
    prev_w, prev_id = None, None
    for name in ("s1", "s2", "s3"):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 2e-2)
        w = ck.bf16_state(model)
        if prev_w is None:
            ck.save_sampler_base(root / name, w, models.local_path(TINY), {})
        else:
            ck.save_sampler_delta(root / name, w, prev_w, prev_id, {})
        snaps[name], prev_w, prev_id = w, w, name
    bad = {k: v.clone() for k, v in snaps["s1"].items()}
    next(iter(bad.values())).view(-1)[0] = float("nan")
    ck.save_sampler_base(root / "nan", bad, models.local_path(TINY), {})
    prompt = [3, 14, 15, 92, 65]

    wm = started(tmp_path / "dep")
    try:
        r = wm.hotload("s1", None, snapshot_root=str(root))
        assert r["kind"] == "base" and r["deltas_since_base"] == 0 and r["bytes_read"] > 0
        on_s1 = generate(wm, prompt).token_ids
        with pytest.raises(HotloadError) as e:
            wm.hotload("nan", None, snapshot_root=str(root))
        assert e.value.status == 422 and "non-finite" in e.value.message
        assert wm.current_identity == "s1" and generate(wm, prompt).token_ids == on_s1

        # loading what is held: success, nothing read
        r = wm.hotload("s1", {**META, "previous_snapshot_identity": "s0"}, snapshot_root=str(root))
        assert r["noop"] is True and wm.current_identity == "s1"

        # disk full while recording the new state: refused, nothing changed anywhere
        state_before = (tmp_path / "dep" / "state.json").read_bytes()

        def disk_full(stage):
            if stage == "persist":
                raise OSError(errno.ENOSPC, "No space left on device")
        wm.fault_hook = disk_full
        with pytest.raises(HotloadError) as e:
            wm.hotload("s2", {**META, "previous_snapshot_identity": "s1"}, snapshot_root=str(root))
        assert e.value.status == 507
        assert wm.current_identity == "s1" and generate(wm, prompt).token_ids == on_s1
        assert (tmp_path / "dep" / "state.json").read_bytes() == state_before
        assert wm.status()["replicas"][0]["loading_state"]["stage"] == "error"

        # the swap fails after state.json was written: state.json is put back
        def swap_fails(stage):
            if stage == "swap":
                raise RuntimeError("engine refused")
        wm.fault_hook = swap_fails
        with pytest.raises(HotloadError):
            wm.hotload("s2", {**META, "previous_snapshot_identity": "s1"}, snapshot_root=str(root))
        assert wm.current_identity == "s1" and (tmp_path / "dep" / "state.json").read_bytes() == state_before
        wm.fault_hook = None

        # default: an in-flight request continues on the new weights and says so; drain: it finishes on the old
        long = Sequence(prompt, SamplingParams(max_tokens=300, ignore_eos=True))
        wm.engine.submit(long)
        while not long.output:
            time.sleep(0.005)
        r = wm.hotload("s2", {**META, "previous_snapshot_identity": "s1"}, snapshot_root=str(root))
        assert r["deltas_since_base"] == 1 and r["max_sampler_pause_seconds"] >= 0 and not r["drained"]
        assert long.done.wait(120) and long.snapshots == ["s1", "s2"]
        long = Sequence(prompt, SamplingParams(max_tokens=300, ignore_eos=True))
        wm.engine.submit(long)
        while not long.output:
            time.sleep(0.005)
        r = wm.hotload("s3", {**META, "previous_snapshot_identity": "s2"}, snapshot_root=str(root), drain=True)
        assert r["drained"] and long.done.is_set() and long.snapshots == ["s2"] and len(long.output) == 300
        last = wm.status()["replicas"][0]["last_load"]
        assert last["identity"] == "s3" and last["kind"] == "delta" and last["deltas_since_base"] == 2
        assert set(last) >= {"load_seconds", "max_sampler_pause_seconds", "bytes_read"}
        for k, v in wm.current_bf16.items():
            assert torch.equal(v, snaps["s3"][k]), k
    finally:
        wm.stop()
    # the restart state agrees with what was served last
    wm2 = started(tmp_path / "dep", restoring="s3")
    try:
        assert wm2.current_identity == "s3" and wm2.deltas_since_base == 2
    finally:
        wm2.stop()


def test_hotload_work_is_sliced_and_paced_to_the_start_of_each_decode_step(tmp_path):
    """Reads, decodes and copies call the hot-load thread's `paced` hook after every bounded slice; the
    pacer lets the load work only in the first `window` of a decode step: past it, it waits until the
    step ends, and with nothing decoding it does not wait at all."""
    import threading
    import time

    from workbench.backend.deployment.engine import Engine
    from workbench.backend.deployment.weights import _StepWindowPacer
    from workbench.checkpoints.delta_codec import paced

    root = tmp_path / "sampler"
    w0 = ck.bf16_state(models.load_model(TINY))
    w1 = {k: (v.float() * 1.01).to(torch.bfloat16) for k, v in w0.items()}
    ck.save_sampler_base(root / "s0", w0, models.local_path(TINY), {})
    for fmt in ("arc_v2", "workbench_v1"):
        ck.save_sampler_delta(root / fmt, w1, w0, "s0", {}, delta_format=fmt)
    for read in (lambda: ck.load_base_weights(root / "s0"),
                 lambda: ck.apply_delta(root / "arc_v2", w0, "s0"),
                 lambda: ck.apply_delta(root / "workbench_v1", w0, "s0")):
        calls = []
        with paced(lambda: calls.append(1)):
            read()
        assert len(calls) >= len(w0)

    engine = Engine(models.load_model(TINY, plain=True).eval())     # not started: the test plays its loop

    def waited(pacer) -> float:
        t0 = time.perf_counter()
        pacer()
        return time.perf_counter() - t0

    pacer = _StepWindowPacer(engine, window_s=0.05)
    engine.step_started = None                                     # nothing decoding: no wait
    assert waited(pacer) < 0.5
    engine.step_started = time.perf_counter() + 5                  # inside a step's window: no wait
    assert waited(pacer) < 0.5
    engine.step_started = time.perf_counter() - 10                 # a step far past the window:
    assert waited(_StepWindowPacer(engine, window_s=0)) < 0.5      # (pacing off: no wait)
    assert waited(_StepWindowPacer(object(), window_s=0.05)) < 0.5  # an engine without visible steps (vLLM)
    assert waited(pacer) >= 0.5                                    # waits its longest (_PACE_WAIT_MAX_S)

    def step_ends():                                               # the engine ends its step
        time.sleep(0.1)
        with engine.cond:
            engine.step_started = None
            engine.cond.notify_all()

    t0 = time.perf_counter()
    threading.Thread(target=step_ends).start()
    engine.wait_for_step_window(0.05, timeout_s=60)                # what the pacer calls, with a long timeout
    assert 0.1 <= time.perf_counter() - t0 < 60                    # woken by the step's end, not the timeout

    # the engine's own loop marks its working steps and wakes a waiting load at the end of each
    engine.step_started = None
    engine.start()
    try:
        seq = engine.submit(Sequence([1, 2, 3], SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)))
        deadline = time.time() + 60
        while engine.step_started is None and not seq.done.is_set():
            assert time.time() < deadline
            time.sleep(0.001)
        t0 = time.perf_counter()
        engine.wait_for_step_window(0.0, timeout_s=60)             # window 0: waits for the step under way
        assert time.perf_counter() - t0 < 30
        assert seq.done.wait(60) and seq.error is None
        while engine.step_started is not None:                     # idle: no step under way
            assert time.time() < deadline + 60
            time.sleep(0.01)
    finally:
        engine.stop()
