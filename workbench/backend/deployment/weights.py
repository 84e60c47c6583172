"""Weights of a deployment replica: the snapshot it serves, hot loads, atomic swaps, state.json.

    wm = WeightManager(deployment_dir, deployment_config)
    wm.start()                      # background: load base model (+ restore state.json), start the engine
    wm.ready                        # True once inference may run (before: the server answers 425)
    result = wm.hotload(identity, metadata, snapshot_root=..., source_url=..., reset_prompt_cache=True)
    wm.status()                     # the hot-load GET body (wire contract §5.2)

What is held. The current snapshot is kept as a bf16 state dict (`current_bf16`: exactly what a base
snapshot holds, and the XOR base the next delta applies to), and as an fp32 model the engine computes
with (this CPU has no fast bf16). At start the replica serves the base model rounded to bf16 (what a
base snapshot of it would hold) with identity null, as the fp32 model alone: no delta can apply to
identity null (a delta names its previous snapshot), so no bf16 copy of it is kept.

Hot load (§5). Runs under one lock, in a hot-load thread of its own (the caller waits for it; the
server calls from off the event loop).
Loading the identity already held is a no-op that succeeds. Otherwise: resolve `<root>/<identity>`
(or a local path from `x-fireworks-hot-load-source-url`) — only inside the workbench home or a
configured snapshot root (`sources.py`; else 403 naming the header) —, build the new bf16 dict
(base: load whole; delta: check `previous_snapshot_identity` equals what we hold, then
`decode_delta`, which verifies the base and the checksum; LoRA: merge the adapter with peft onto the
base model's own fp32 weights, as the trainer's LoRA forward computes), refuse non-finite values,
copy it into the spare fp32 model (made at the first load), record it in state.json, then ask the engine to swap models
between two steps (with `drain`, once the requests in flight have finished). The previous model
becomes the spare for the next load (double buffering: serving never waits on a load, and a swap is a
pointer change). Likewise the bf16 dict a swap retires is kept and the next load writes into it
(a base is read into it, workbench_v1 and arc_v2 deltas decode into it: no fresh memory to fault in;
it stays the spare if that load fails), at the cost of one more bf16 copy of the weights held.
state.json is written before the swap and put back if the swap fails, so the
answer, the live weights and the restart state always agree. Any failure leaves the served snapshot
untouched, sets `loading_state` to stage "error" for that target with a message, and raises
`HotloadError` with an HTTP status the server returns: 400 malformed request or metadata (or a delta
sent without metadata), 403 a source outside the allowed roots, 404 snapshot not found, 409 the
delta's previous_snapshot_identity is not what the replica holds, 422 a snapshot that cannot be used
(corrupt, truncated, checksum mismatch, non-finite, made against another base, or not fitting the
base model), 507 the disk is full. Bad snapshots are 4xx on purpose: the SDK's REST layer retries
5xx for minutes, which would turn a bad snapshot into a hang; a 4xx makes DeploymentManager.hotload
raise httpx.HTTPStatusError at once (after logging our message), so WeightSyncer.save_and_hotload
raises and WeightSyncer.hotload returns False.

Each load's figures (wall time, longest sampler pause, bytes read, kind, deltas since the last base)
are reported in the hot-load answer and as `replicas[0].last_load` in the GET (workbench's own field,
which the SDK ignores).

state.json (in the deployment dir) is rewritten atomically with every load:
`{"version": 1, "identity", "kind", "chain": [{"identity", "kind", "dir"}...], "deltas_since_base"}`, the snapshot dirs
to replay (a base or LoRA snapshot, then deltas) to rebuild the current weights. A restarted process
replays it; if replay fails (a snapshot was deleted, say) it serves the base model with identity null
and reports the failure as stage "error", so WeightSyncer starts a fresh chain with a full load. When
the chain grows past MAX_CHAIN_DELTAS deltas, the current weights are written once into the
deployment dir (`materialized/<identity>.safetensors`) and the chain restarts from that file, so a
restart never replays hundreds of deltas and does not depend on old snapshots being kept.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import sys
import threading
import time
import traceback
import weakref
from pathlib import Path

from workbench.checkpoints.layout import DeploymentLayout
from workbench.common import atomic_write_bytes, release_free_memory, write_json_atomic

from .replica import HotloadError
from .sources import allowed_roots, find_snapshot, snapshot_candidates
from .threads import set_torch_threads

MAX_CHAIN_DELTAS = 4
# Hot loads run in one thread of their own; WORKBENCH_HOTLOAD_NICE > 0 lowers its CPU priority (nice)
# below the engine's, so that on busy cores decode steps run first. Off by default: the lower priority
# holds against every process of the machine, and at load ~20 it made a 5M base load 3-4x slower
# (bench/hotload.py) without a pause reduction that could be measured there.
HOTLOAD_NICE = 0
# Bounded slices (see _StepWindowPacer): while the engine decodes, the hot-load thread works only in the
# first HOTLOAD_STEP_WINDOW_S of each engine step (and between steps), so a step it competes with for a
# core grows by about that much at most. Why not a share of the CPU (sleeping N times each slice's time,
# the previous scheme): what slowed decode steps was the engine thread waiting for a core, and a share
# caps that wait per load, not per step. At 75M on this 2-core machine, 4 streams decoding, steps
# doubled (~100 -> ~240 ms) during a 0.4 s delta decode, with or without a 1:1 share (bench/hotload.py).
# The cost: while requests decode, a load runs at ~window/step of its speed. WORKBENCH_HOTLOAD_STEP_WINDOW_MS
# sets it per replica; 0 turns pacing off (loads run at full speed beside decoding).
HOTLOAD_STEP_WINDOW_S = 0.02
_PACE_WAIT_MAX_S = 0.5          # a step longer than this (a huge prefill) still lets a load advance
_COPY_SLICE = 1 << 20          # elements per copy_ into the spare model (4 MiB of fp32)
_IDENTITY_RE = re.compile(r"[!-.0-\[\]-~]+")   # printable ASCII but "/", "\\" and space
SWAP_WAIT_S = 60.0            # the engine swaps between two steps: one step, unless it is wedged
SWAP_WAIT_DRAIN_S = 600.0     # a draining swap waits for the requests in flight to finish
# what the hot-load GET reports about the last load (replicas[0].last_load; the notebook shows it)
_LAST_LOAD_KEYS = ("identity", "kind", "noop", "load_seconds", "max_sampler_pause_seconds", "bytes_read",
                   "deltas_since_base", "drained", "restored")


def _ckpt():
    """workbench.checkpoints, imported late: it is only needed once a snapshot is loaded."""
    from workbench import checkpoints
    return checkpoints


def _delta_error_types() -> tuple:
    try:
        return (_ckpt().DeltaError,)
    except (ImportError, AttributeError):
        return ()


def bf16_round_(model) -> None:
    """Round every parameter to bf16 precision in place (kept in fp32)."""
    import torch
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))


class WeightManager:
    def __init__(self, deployment_dir: Path, config: dict, max_batch: int | None = None):
        self.dir = Path(deployment_dir)
        self.layout = DeploymentLayout(self.dir)
        self.config = config
        self.deployment_id = config["deployment_id"]
        # let in-flight requests finish on the old weights before a swap (deployment.json "hotload_drain")
        self.drain_default = bool(config.get("hotload_drain", False))
        self.base_model = config["base_model"]
        self.max_batch = int(max_batch or config.get("max_batch") or os.environ.get("WORKBENCH_MAX_BATCH", 64))
        self.ready = False
        self.startup_error: str | None = None
        self.current_identity: str | None = None
        self.current_kind: str = "base_model"
        # None while the base model is served (identity null): no delta applies to it (a delta names the
        # snapshot it applies to, never null: 409), so that bf16 copy would only cost RSS
        self.current_bf16: dict | None = None
        # the bf16 tensors the last swap retired: the next delta decodes into them (no fresh memory, whose
        # first touch costs more than the decode on this VM; see checkpoints/delta_codec.py)
        self._retired_bf16: dict | None = None
        self._base_fp32: dict | None = None
        self.tied_base = False                 # the base model's LM head is its input embedding (_load_into)
        # model -> (name -> tensor, tied names); weak, so a replaced spare model is not kept alive
        self._targets: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.chain: list[dict] = []
        self.loading_state: dict = {"stage": "loading", "target_snapshot_identity": None,
                                    "message": "loading the base model"}
        self.model = None
        self.spare = None
        self.engine = None
        self.tokenizer = None
        self.vocab_size = 0
        self.max_context = 0
        self.prompt_cache_resets = 0
        self.last_load: dict = {}
        self.deltas_since_base = 0             # deltas applied since the last full (base/LoRA) load
        self.fault_hook = None                 # tests: called with "persist" / "swap"; may raise
        self._lock = threading.Lock()          # one load at a time (startup counts as one)
        self._state_lock = threading.Lock()    # guards the fields status() reads together
        self._thread: threading.Thread | None = None
        self._loader = None                    # the hot-load thread (see _run_in_loader)

    # ---- startup ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._lock.acquire()                   # held until startup is done: hot loads queue behind it
        # While a restarted replica rebuilds its last snapshot it reports that identity with readiness
        # false (stage "loading"), not null: WeightSyncer.check_deployment_state reads the identity
        # without looking at readiness, and null would make a client think the replica lost it. If
        # the restore fails the identity becomes null (stage "error").
        try:
            restoring = json.loads((self.layout.state_file).read_text()).get("identity")
        except (OSError, ValueError, AttributeError):
            restoring = None
        if isinstance(restoring, str):
            self.current_identity = restoring
            self.loading_state = {"stage": "loading", "target_snapshot_identity": restoring,
                                  "message": "restoring the last hot-loaded snapshot"}
        self._thread = threading.Thread(target=self._startup, name="weights-startup", daemon=True)
        self._thread.start()

    def _startup(self) -> None:
        try:
            from workbench import models
            from .engine import Engine

            set_torch_threads()

            # plain: a plain Qwen3 is served without importing transformers (runners.py)
            plain = os.environ.get("WORKBENCH_DEPLOYMENT_MODEL_IMPL", "auto") != "transformers"
            self.tokenizer = models.load_tokenizer(self.base_model, plain=plain)
            model = models.load_model(self.base_model, plain=plain).eval()
            self.tied_base = head_is_tied(model)
            bf16_round_(model)
            check_finite(model.state_dict(), None)       # rounded: finite here iff finite in bf16
            self.model = model        # the spare is made at the first load (_spare_model): RSS at READY
            cfg = model.config
            self.vocab_size = int(cfg.vocab_size)
            self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
            restored = self._restore()
            self.engine = Engine(self.model, self.tokenizer, max_batch=self.max_batch,
                                 snapshot=restored).start()
            release_free_memory()     # loading's temporaries (glibc keeps freed heap): ~1 MiB of RSS at READY
            with self._state_lock:
                self.ready = True
                if restored is None:
                    if self.loading_state.get("stage") != "error":   # keep a failed restore visible
                        self.loading_state = {"stage": "done"}
        except Exception as e:  # the process stays up to report it; inference answers 503
            self._record_startup_failure(e)
        finally:
            self._lock.release()

    def _record_startup_failure(self, e: Exception) -> None:
        traceback.print_exc()
        self.startup_error = f"{type(e).__name__}: {e}"
        self.current_identity = None
        self.loading_state = {"stage": "error", "target_snapshot_identity": None,
                              "message": f"replica failed to start: {self.startup_error}"}

    def _restore(self) -> str | None:
        """Rebuild the weights recorded in state.json; returns the identity, or None (base model)."""
        path = self.layout.state_file
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
            identity, chain = state["identity"], state["chain"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.current_identity = None
            self.loading_state = {"stage": "error", "target_snapshot_identity": None,
                                  "message": f"unreadable {path}: {e}; serving the base model"}
            return None
        self.loading_state = {"stage": "loading", "target_snapshot_identity": identity,
                              "message": "restoring the last hot-loaded snapshot"}
        t0 = time.perf_counter()
        try:
            weights, kind = self._replay(chain, self._spare_model())    # built on the spare, swapped on success
        except Exception as e:
            traceback.print_exc()
            self.spare = None                   # a failed LoRA merge may leave it modified: made afresh
            self.current_identity = None
            self.loading_state = {"stage": "error", "target_snapshot_identity": identity,
                                  "message": f"could not restore snapshot {identity!r} after a restart "
                                             f"({type(e).__name__}: {e}); serving the base model, "
                                             "hot-load a full (base) snapshot"}
            return None
        self.model, self.spare = self.spare, self.model
        self.current_identity, self.current_kind = identity, kind
        self.current_bf16, self.chain = weights, chain
        self.deltas_since_base = int(state.get("deltas_since_base") or 0)
        self.loading_state = {"stage": "done", "target_snapshot_identity": identity}
        self.last_load = {"identity": identity, "kind": kind, "restored": True,
                          "max_sampler_pause_seconds": 0.0,         # nothing was served before it
                          "load_seconds": round(time.perf_counter() - t0, 6),
                          "bytes_read": sum(_dir_bytes(Path(e.get("dir") or e.get("path"))) for e in chain),
                          "deltas_since_base": self.deltas_since_base}
        return identity

    def _replay(self, chain: list[dict], target):
        """Rebuild the weights of a state.json chain into `target`; returns (bf16 dict, kind)."""
        weights, prev, kind = None, None, None
        for entry in chain:
            k = entry["kind"]
            if k == "materialized":
                from safetensors.torch import load_file
                weights = load_file(entry["path"])
            elif k == "base":
                weights = _ckpt().load_base_weights(entry["dir"])
            elif k == "lora":
                weights = self._merge_lora(Path(entry["dir"]), target)
            elif k == "delta" and _ckpt().snapshot_kind(Path(entry["dir"])) == "base":
                # Rewritten as a full copy of the same weights since it was loaded (a trainer re-saving
                # unchanged weights as a base, see LocalTorchTrainer.save_sampler): load it as one.
                weights = _ckpt().load_base_weights(entry["dir"])
            elif k == "delta":
                if weights is None:
                    raise ValueError("state.json chain starts with a delta")
                weights = decode_delta(entry["dir"], weights, prev)
            else:
                raise ValueError(f"unknown chain entry kind {k!r}")
            prev, kind = entry["identity"], entry.get("as_kind", k)
        check_finite(weights, prev)
        if kind != "lora":
            self._load_into(target, weights)
        return weights, kind

    # ---- status -----------------------------------------------------------------------------------
    def status(self) -> dict:
        with self._state_lock:
            replica = {
                "replica_id": f"{self.deployment_id}-0",
                "current_snapshot_identity": self.current_identity,
                "readiness": bool(self.ready),
                "loading_state": dict(self.loading_state),
            }
            if self.current_kind == "lora" and self.current_identity:
                replica["loaded_adapters"] = [{"identity": self.current_identity, "status": "loaded"}]
            if self.last_load:
                replica["last_load"] = dict(self.last_load)   # workbench's own (additive): see _load
        return {"replicas": [replica]}

    # ---- hot load ---------------------------------------------------------------------------------
    def hotload(self, identity, metadata=None, snapshot_root: str | None = None,
                source_url: str | None = None, reset_prompt_cache: bool = False, drain: bool | None = None) -> dict:
        """Load snapshot `identity` and swap it in; blocks until done. Raises HotloadError."""
        identity = _check_identity(identity)
        meta = _check_metadata(metadata)
        set_torch_threads()                    # runs in a server executor thread
        with self._state_lock:
            if self._lock.locked():
                self.loading_state = {"stage": "pending", "target_snapshot_identity": identity}
        with self._lock:
            if not self.ready:
                raise self._fail(identity, 503 if self.startup_error is None else 422,
                                 f"replica is not serving: {self.startup_error or 'still starting'}")
            if identity == self.current_identity:
                snapshot_candidates(identity, snapshot_root, source_url, self.allowed_roots())  # still 400/403
                # what is held already (managed mode re-sends it): nothing to read, nothing to swap
                with self._state_lock:
                    self.loading_state = {"stage": "done", "target_snapshot_identity": identity}
                return {"status": "ok", "identity": identity, "kind": self.current_kind, "noop": True,
                        "load_seconds": 0.0}
            with self._state_lock:
                self.loading_state = {"stage": "loading", "target_snapshot_identity": identity}
            t0 = time.perf_counter()
            try:
                result = self._run_in_loader(self._load_keeping_spares, identity, meta, snapshot_root, source_url,
                                             self.drain_default if drain is None else drain)
            except HotloadError as e:
                raise self._fail(identity, e.status, e.message, e.field)
            except Exception as e:
                traceback.print_exc()
                if isinstance(e, _delta_error_types()):
                    raise self._fail(identity, 422, f"delta snapshot {identity!r} rejected: {e}")
                raise self._fail(identity, 422, f"failed to load snapshot {identity!r}: {type(e).__name__}: {e}")
            if reset_prompt_cache:
                self.prompt_cache_resets += 1   # no KV state outlives a request here: nothing to clear
            result["load_seconds"] = round(time.perf_counter() - t0, 6)
            with self._state_lock:
                self.last_load = {k: result[k] for k in _LAST_LOAD_KEYS if k in result}
            return result

    def _fail(self, identity: str, status: int, message: str, field: str | None = None) -> HotloadError:
        with self._state_lock:
            self.loading_state = {"stage": "error", "target_snapshot_identity": identity, "message": message}
        print(f"hotload {identity!r} failed ({status}): {message}", flush=True)
        return HotloadError(status, message, field)

    def _fault(self, stage: str) -> None:
        """Test hook: `fault_hook(stage)` may raise to simulate a failure at "persist" or "swap"."""
        if self.fault_hook is not None:
            self.fault_hook(stage)

    def _load(self, identity: str, meta: dict | None, snapshot_root, source_url, drain: bool) -> dict:
        """Build the snapshot's weights in the spare model, record them in state.json, then swap.

        Order matters (so the answer, the live weights and the restart state always agree): nothing
        visible changes until state.json names the new snapshot; if writing it fails, the previous
        snapshot keeps serving and the answer is an error; if the swap then fails, state.json is put
        back before the error is answered."""
        ck = _ckpt()
        src, via = self._resolve(identity, snapshot_root, source_url)
        self.engine.watch_pauses()          # reading and decoding compete with sampling for the CPU too
        try:
            kind = ck.snapshot_kind(src)
        except Exception as e:
            raise HotloadError(422, f"{src} is not a readable snapshot: {e}")
        t_read = time.perf_counter()
        entry = {"identity": identity, "kind": kind, "dir": str(src)}
        if kind == "delta":
            if meta is None:
                raise HotloadError(400, f"snapshot {identity!r} is a delta: the hot load needs "
                                        "incremental_snapshot_metadata naming the snapshot it applies to")
            prev = meta["previous_snapshot_identity"]
            if prev != self.current_identity:
                raise HotloadError(409, f"delta {identity!r} applies to {prev!r}, but this replica holds "
                                        f"{self.current_identity!r}; hot-load a full (base) snapshot first")
            weights = decode_delta(src, self.current_bf16, self.current_identity, meta, out=self._take_retired())
            chain = self.chain + [entry]
            since_base = self.deltas_since_base + 1
        elif kind == "base":
            # a full snapshot is valid whatever metadata came with it (flow4c: a LoRA policy's syncer
            # may send delta metadata for what is really a full save)
            weights = ck.load_base_weights(src, out=self._take_retired())
            chain, since_base = [entry], 0
        elif kind == "lora":
            weights = self._merge_lora(src, self._spare_model())   # merges straight into the spare
            chain, since_base = [entry], 0
        else:
            raise HotloadError(422, f"snapshot {identity!r} has unknown kind {kind!r}")
        check_finite(weights, identity)
        t_decoded = time.perf_counter()
        if kind != "lora":
            self._load_into(self._spare_model(), weights)
        t_copied = time.perf_counter()

        old_state = self._read_state()
        chain = self._persist(identity, kind, chain, weights, since_base)      # 507 / 422 if it cannot
        t_persisted = time.perf_counter()
        try:
            self._fault("swap")
            done = self.engine.swap_model(self.spare, identity, drain=drain)
            # the engine switches between two steps; wait for it so the identity is never ahead of the weights
            if not done.wait(SWAP_WAIT_DRAIN_S if drain else SWAP_WAIT_S) and not self.engine.retract_swap(done):
                raise TimeoutError("the engine did not take the new weights in time")
        except BaseException as e:
            self._restore_state_file(old_state)
            self.engine.pauses_seen()
            if isinstance(e, Exception):
                raise HotloadError(503, f"snapshot {identity!r} was not swapped in ({type(e).__name__}: {e}); "
                                        "the previous snapshot keeps serving") from None
            raise
        t_swapped = time.perf_counter()
        retired = self.current_bf16
        with self._state_lock:
            self.model, self.spare = self.spare, self.model
            self.current_identity, self.current_kind = identity, kind
            self.current_bf16, self.chain, self.deltas_since_base = weights, chain, since_base
            self.loading_state = {"stage": "done", "target_snapshot_identity": identity}
        if retired is not None and retired is not weights:
            self._retired_bf16 = retired
        self._prune_materialized()
        return {"status": "ok", "identity": identity, "kind": kind, "source": via,
                "bytes_read": _dir_bytes(src), "deltas_since_base": since_base,
                "read_decode_seconds": round(t_decoded - t_read, 6),
                "copy_seconds": round(t_copied - t_decoded, 6),
                "persist_seconds": round(t_persisted - t_copied, 6),
                "swap_wait_seconds": round(t_swapped - t_persisted, 6),
                "max_sampler_pause_seconds": round(self.engine.pauses_seen(), 6),
                "drained": bool(drain)}

    def _spare_model(self):
        """The fp32 model a load writes into while the engine computes with the other. Made (a copy of the
        active model) at the first load that needs it, not at start: a replica that is never hot-loaded
        holds one model, and READY comes with one model's memory less (bench/cold_start.py)."""
        if self.spare is None:
            self.spare = copy.deepcopy(self.model)
        return self.spare

    def _take_retired(self) -> dict | None:
        """The bf16 tensors the last swap retired, for this load to write into (see _load_keeping_spares)."""
        recycled, self._retired_bf16 = self._retired_bf16, None
        return recycled

    def _load_keeping_spares(self, *args) -> dict:
        """_load; if it fails, the retired bf16 tensors it may have written into serve nothing, so they
        stay the spares of the next load (fresh memory is what they save: see checkpoints/delta_codec.py)."""
        from workbench.checkpoints.delta_codec import paced

        retired = self._retired_bf16
        try:
            window_ms = os.environ.get("WORKBENCH_HOTLOAD_STEP_WINDOW_MS")
            window_s = HOTLOAD_STEP_WINDOW_S if window_ms is None else float(window_ms) / 1000
            with paced(_StepWindowPacer(self.engine, window_s)):
                return self._load(*args)
        except BaseException:
            held = {id(t) for t in (self.current_bf16 or {}).values()}
            if retired is not None and self._retired_bf16 is None and not any(id(t) in held for t in retired.values()):
                self._retired_bf16 = retired
            raise

    def _resolve(self, identity: str, snapshot_root, source_url) -> tuple[Path, str]:
        """The snapshot directory and the header that named it (sources.py: 400 / 403 / 404)."""
        def is_snapshot(path: Path) -> bool:
            try:
                _ckpt().snapshot_kind(path)
                return True
            except Exception:
                return False
        return find_snapshot(identity, snapshot_root, source_url, self.allowed_roots(), is_snapshot)

    def allowed_roots(self) -> list[Path]:
        return allowed_roots(self.config)

    def _merge_lora(self, adapter_dir: Path, target) -> dict:
        """Merge a PEFT adapter onto the base weights inside `target` (one of our fp32 models);
        returns the merged weights rounded to bf16.

        The base here is the base model's own fp32 weights (not the bf16-rounded ones the replica
        serves with identity null): that is what the trainer's LoRA forward runs on, and what
        `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)` computes. The
        merge runs in fp32 and `target` keeps the exact merged values for compute."""
        import torch
        from peft import PeftModel

        from workbench.models import qwen3_torch

        if not (adapter_dir / "adapter_config.json").exists():
            raise HotloadError(422, f"{adapter_dir} has no adapter_config.json")
        if isinstance(target, qwen3_torch.Qwen3ForCausalLM):
            # PEFT wraps transformers' classes: merge in a fresh transformers model (the base's fp32 weights),
            # then copy the result into the plain-torch target, whose parameter names are the same
            from workbench import models
            merged = PeftModel.from_pretrained(models.load_model(self.base_model), str(adapter_dir)).merge_and_unload()
            self._load_into(target, merged.state_dict())     # ties or unties the head as the merged model has it
            return {k: v.detach().to(torch.bfloat16) for k, v in merged.state_dict().items()}
        if self._base_fp32 is None:     # loaded on the first LoRA load only: full-parameter runs never pay
            from workbench import models
            self._base_fp32 = _clone_sharing(models.load_model(self.base_model).state_dict())
        self._load_into(target, self._base_fp32)
        try:
            merged = PeftModel.from_pretrained(target, str(adapter_dir)).merge_and_unload()
        except Exception:
            # peft injects its layers into `target` before it loads the adapter: a failure half-way
            # would leave a modified model; rebuild the spare from the clean active model
            if target is self.spare:
                self.spare = None               # made afresh from the clean active model at the next load
            raise
        finally:
            # peft swaps modules in and out (modules_to_save puts a trained copy of lm_head in place
            # of the original): the cached name -> tensor map of `target` is stale now
            self._targets.pop(target, None)
        if merged is not target:
            raise RuntimeError("peft merge_and_unload returned a new model object")
        return {k: v.detach().to(torch.bfloat16) for k, v in merged.state_dict().items()}

    def _load_into(self, model, weights: dict) -> None:
        """Copy a bf16 state dict into an fp32 model; reject one that does not fit the base model.

        Straight `copy_` into each tensor of a cached name -> tensor map (load_state_dict's module
        walk and hooks cost more than the copy itself for small models). Checked before anything is
        written, so a snapshot that does not fit never leaves the model half overwritten."""
        import torch
        if self.tied_base:
            # a model of a tied base (plain-torch or transformers') takes the tying of the weights it is given:
            # an adapter merged with a head of its own unties it, weights without a separate head (a base
            # snapshot) tie it again. Decided from the base, not the model's config: PEFT's merge sets
            # tie_word_embeddings=False in the config of the model it untied.
            head, embedding = weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")
            tied = head is None or (embedding is not None and head.data_ptr() == embedding.data_ptr())
            if tied != head_is_tied(model):
                set_head_tied(model, tied)
                self._targets.pop(model, None)
        targets = self._targets.get(model)
        if targets is None:
            targets = self._targets[model] = (model.state_dict(keep_vars=True), _tied_names(model))
        tensors, tied = targets
        unexpected = sorted(weights.keys() - tensors.keys())
        missing = sorted(k for k in tensors.keys() - weights.keys() if not (tied.get(k, set()) & weights.keys()))
        wrong = [f"{k}: {tuple(v.shape)} vs {tuple(tensors[k].shape)}" for k, v in weights.items()
                 if k in tensors and tuple(v.shape) != tuple(tensors[k].shape)]
        if missing or unexpected or wrong:
            raise HotloadError(422, f"snapshot does not fit base model {self.base_model}: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
        with torch.no_grad():
            for k, v in weights.items():
                target = tensors[k]
                if target.numel() > _COPY_SLICE and target.is_contiguous() and v.is_contiguous():
                    flat, src = target.view(-1), v.view(-1)
                    for a in range(0, flat.numel(), _COPY_SLICE):   # bounded slices (see _StepWindowPacer)
                        flat[a:a + _COPY_SLICE].copy_(src[a:a + _COPY_SLICE])
                        _pace()
                else:
                    target.copy_(v)
                    _pace()

    def _read_state(self) -> bytes | None:
        try:
            return self.layout.state_file.read_bytes()
        except FileNotFoundError:
            return None

    def _persist(self, identity: str, kind: str, chain: list[dict], weights: dict, since_base: int) -> list[dict]:
        """Record the snapshot about to be served in state.json (atomically); returns the chain as
        recorded (compacted into a materialized file past MAX_CHAIN_DELTAS deltas). Raises
        HotloadError (507 when the disk is full) with nothing changed."""
        written = None
        try:
            if sum(1 for e in chain if e["kind"] == "delta") > MAX_CHAIN_DELTAS:
                chain, written = self._materialize(identity, kind, chain, weights)
            self._fault("persist")
            write_json_atomic(self.layout.state_file, {
                "version": 1, "identity": identity, "kind": kind, "chain": chain,
                "deltas_since_base": since_base, "updated_at": time.time()})
        except OSError as e:
            if written is not None:
                written.unlink(missing_ok=True)
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise HotloadError(507 if full else 422,
                               f"could not record snapshot {identity!r} in {self.layout.state_file} "
                               f"({e.strerror or e}); it was not swapped in, the previous snapshot keeps serving")
        return chain

    def _restore_state_file(self, old: bytes | None) -> None:
        """Put state.json back as it was before a load that then failed to swap."""
        try:
            if old is None:
                self.layout.state_file.unlink(missing_ok=True)
            else:
                atomic_write_bytes(self.layout.state_file, old)
        except OSError:
            traceback.print_exc()

    def _materialize(self, identity: str, kind: str, chain: list[dict], weights: dict) -> tuple[list[dict], Path]:
        from safetensors.torch import save_file
        out = self.layout.materialized
        out.mkdir(exist_ok=True)
        path = out / f"{identity}.safetensors"
        tmp = out / f".{identity}.{os.getpid()}.tmp"
        try:
            save_file({k: v.contiguous() for k, v in _untie(weights).items()}, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return [{"identity": identity, "kind": "materialized", "path": str(path), "as_kind": kind,
                 "replaces": [e.get("dir") for e in chain]}], path

    def _prune_materialized(self) -> None:
        out = self.layout.materialized
        if not out.is_dir():
            return
        keep = {e.get("path") for e in self.chain}
        for f in out.glob("*.safetensors"):
            if str(f) not in keep:
                f.unlink(missing_ok=True)

    def _run_in_loader(self, fn, *args):
        """fn(*args) in the hot-load thread, a dedicated one (optionally at a lower priority, see
        HOTLOAD_NICE: reading, decoding and copying compete with the engine for the cores, and a
        sampler pause is the engine waiting for a core). Dedicated, because a thread's nice value cannot
        be raised back without privileges, and the server's executor threads serve requests too."""
        if self._loader is None:
            from concurrent.futures import ThreadPoolExecutor
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="hotload", initializer=_loader_thread_setup)
        return self._loader.submit(fn, *args).result()

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        if self._loader is not None:
            self._loader.shutdown(wait=False)


def _loader_thread_setup() -> None:
    set_torch_threads()
    nice = int(os.environ.get("WORKBENCH_HOTLOAD_NICE", HOTLOAD_NICE))
    try:    # Linux: PRIO_PROCESS with a thread id sets that thread's nice value only
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (OSError, AttributeError):
        pass                                # not permitted or not Linux: same priority as the engine


def decode_delta(src: Path, held_bf16: dict, held_identity: str | None, request_meta: dict | None = None,
                 out: dict | None = None) -> dict:
    """The one place a delta snapshot is decoded: the new bf16 weights from the weights held now.
    Decodes by the format the snapshot records (workbench.checkpoints.formats), verifies the delta's
    base and checksums (raises checkpoints.DeltaError). A request naming another compression_format
    or checksum_format than the snapshot's is a 400 naming both (HotloadError). `out`: retired bf16
    tensors the decode may overwrite (workbench_v1 writes into them)."""
    ck = _ckpt()
    meta = request_meta or {}
    try:
        return ck.apply_delta(src, held_bf16, held_identity, compression_format=meta.get("compression_format"),
                              checksum_format=meta.get("checksum_format"), out=out)
    except ck.DeltaFormatError as e:
        raise HotloadError(e.http_status, f"delta snapshot {Path(src).name!r} refused: {e}") from e


def check_finite(weights: dict, identity: str | None) -> None:
    """Refuse weights with NaN or infinity (422): served, they would poison every logprob.

    A tensor is finite iff its min and max are (aminmax propagates NaN, and an infinity is an
    extreme): one read pass and no temporary, where `isfinite(t).all()` writes a bool per element
    into fresh memory (bf16, 4.7M elements: 178 ms against 0.8 ms on this VM)."""
    import torch

    for name, t in weights.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
            raise HotloadError(422, f"snapshot {identity!r} has non-finite values (NaN or inf) in {name}; "
                                    "refused, the previous snapshot keeps serving")
        _pace()


def _pace() -> None:
    """delta_codec.pace() (the hot-load pacing hook), without importing delta_codec where nothing has yet:
    pace() acts only inside a `paced(...)` block, which only that module can have opened, and importing it
    (zstandard) costs a replica ~2 MiB at READY for nothing (the base model's check at start)."""
    codec = sys.modules.get("workbench.checkpoints.delta_codec")
    if codec is not None:
        codec.pace()


class _StepWindowPacer:
    """The hot-load thread's `paced` hook (checkpoints/delta_codec.py), called after each bounded slice of
    its work (a tensor read or decoded, 4 MiB copied): while a decode step has been running for more
    than `window_s`, wait for it to end (Engine.wait_for_step_window); with nothing to decode, go on
    at full speed. The swap itself stays a reference change between two decode steps (engine.swap_model).
    An engine whose steps this process does not see (vLLM's run in its engine-core process) is not paced."""

    def __init__(self, engine, window_s: float):
        self.wait = getattr(engine, "wait_for_step_window", None) if window_s > 0 else None
        self.window_s = window_s

    def __call__(self) -> None:
        if self.wait is not None:
            self.wait(self.window_s, _PACE_WAIT_MAX_S)


def _dir_bytes(path: Path) -> int:
    """Bytes of the files of a snapshot directory (what a load reads)."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except OSError:
        return 0


def head_is_tied(model) -> bool:
    """Whether the model's LM head is its input embedding (one Parameter)."""
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def set_head_tied(model, tied: bool) -> None:
    """Share the LM head with the input embedding (tied), or give it a weight of its own (a copy), as a
    transformers model whose head PEFT's modules_to_save replaced has. Works on workbench's plain-torch
    Qwen3 and on transformers' models alike (both have get_input/output_embeddings); the config's
    tie_word_embeddings is set to match, as PEFT's merge sets it when it unties."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings().weight
    if tied and head.weight is not embedding:
        head.weight = embedding
    elif not tied and head.weight is embedding:
        head.weight = type(embedding)(embedding.detach().clone(), requires_grad=embedding.requires_grad)
    if getattr(model, "config", None) is not None:
        model.config.tie_word_embeddings = tied


def _clone_sharing(state: dict) -> dict:
    """Clone a state dict's tensors, keeping names that share memory (a tied head) sharing one clone, so
    the copy still says whether the head is tied (_load_into decides the tying from that)."""
    clones, out = {}, {}
    for k, v in state.items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if key not in clones:
            clones[key] = v.detach().clone()
        out[k] = clones[key]
    return out


def _tied_names(model) -> dict[str, set[str]]:
    """name -> the other names of the same parameter (tied embeddings)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    out = {}
    for names in by_id.values():
        if len(names) > 1:
            for n in names:
                out[n] = set(names) - {n}
    return out


def _untie(weights: dict) -> dict:
    """safetensors refuses tensors sharing memory: keep the first name of each storage."""
    seen, out = set(), {}
    for k, v in weights.items():
        key = (v.data_ptr(), v.shape)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def _check_identity(identity) -> str:
    if not isinstance(identity, str) or not identity:
        raise HotloadError(400, "identity is required (the snapshot name from save_weights_for_sampler)", "identity")
    # a directory name, and echoed in HTTP headers: printable ASCII, no path separators
    if not _IDENTITY_RE.fullmatch(identity) or identity in (".", "..") or len(identity) > 255:
        raise HotloadError(400, f"identity {identity!r} is not a snapshot name", "identity")
    return identity


def _check_metadata(meta) -> dict | None:
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise HotloadError(400, "incremental_snapshot_metadata must be an object")
    unknown = set(meta) - {"previous_snapshot_identity", "compression_format", "checksum_format"}
    if unknown:
        raise HotloadError(400, f"incremental_snapshot_metadata: unknown fields {sorted(unknown)}")
    prev = meta.get("previous_snapshot_identity")
    if not isinstance(prev, str) or not prev:
        raise HotloadError(400, "incremental_snapshot_metadata.previous_snapshot_identity is required")
    from workbench.checkpoints.formats import CHECKSUM_FORMATS, DELTA_FORMATS

    cf = meta.get("compression_format", "arc_v2")
    if cf not in DELTA_FORMATS:
        raise HotloadError(400, f"incremental_snapshot_metadata.compression_format {cf!r} is not supported "
                                f"(supported: {', '.join(DELTA_FORMATS)})")
    sf = meta.get("checksum_format", "alder32")
    if sf not in CHECKSUM_FORMATS:
        raise HotloadError(400, f"incremental_snapshot_metadata.checksum_format {sf!r} is not supported "
                                f"(supported: {', '.join(CHECKSUM_FORMATS)})")
    return dict(meta)
