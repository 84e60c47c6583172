"""A deployment replica served by vLLM: the same wire server, snapshots pushed into a running vLLM.

    $WORKBENCH_VLLM_VENV/bin/python -m workbench.backend.deployment.vllm_replica --deployment-dir DIR --port-file FILE

Started by the control plane (engines.replica_command) for deployments whose shape selects vLLM, with
vLLM's own interpreter and this checkout on PYTHONPATH. It serves exactly the HTTP surface of the
built-in replica (server.create_app: completions, SSE, hot load, health, 425 until the weights are in);
only the engine and the way weights reach it differ:

- generation: `VllmEngine` (vllm_engine.py), vLLM's AsyncLLM for the `replica.Replica` protocol;
- snapshots: `VllmWeightManager`, the built-in `WeightManager` (same snapshot resolution, delta
  decoding, checks, chain, state.json, materialization, error statuses) with the weight *application*
  replaced: the replica keeps the current snapshot as a CPU bf16 state dict (`current_bf16`, what every
  delta is decoded against); a load is validated against the base model's names and shapes (a snapshot
  that does not fit is refused before vLLM sees a byte), recorded in state.json, then written as one
  safetensors file (in /dev/shm when there is one) and pushed into the running engine with
  `collective_rpc` + the worker extension (vllm_worker.py: vLLM's in-place `reload_weights`), between
  two scheduler steps (`pause_generation(mode="keep")`, or "wait" to drain, ... `resume_generation()`).
  If the push fails, the previous weights are pushed back and state.json restored before the error is
  answered, so the previous snapshot keeps serving. `reset_prompt_cache` resets vLLM's prefix cache
  (running requests are recomputed on the new weights).
- LoRA: a PEFT adapter snapshot is served through vLLM's LoRA support (`enable_lora`, one adapter at
  a time). vllm_lora.py checks the adapter against the base model and vLLM's limits (422 before vLLM
  sees it) and writes the copy vLLM loads into the deployment dir (`vllm-adapters/<n>`). The swap then
  pushes the base weights the adapter applies to when the engine does not hold them already (the base
  model's own weights, as the trainer's LoRA forward uses them, plus any whole modules the adapter
  carries: PEFT `modules_to_save`, which vLLM's LoRA does not take), `add_lora`s the new adapter under
  a fresh id and a name of its own (so neither vLLM's adapter cache nor its prefix cache can serve the
  previous one), makes it the adapter of every new request, and removes the previous one. vLLM binds
  an adapter to a request when it is submitted, so a swap that changes adapters drains: requests in
  flight finish on the adapter they started with (`pause_generation(mode="wait")`), requests arriving
  meanwhile wait and start on the new one; each request is thus computed with one snapshot, the one
  it reports.
- restart: state.json is replayed at startup exactly as the built-in replica does, so a replica killed
  with SIGKILL comes back on its last good snapshot (a LoRA one included).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from .replica import GenerationRequest, GenerationSink, HotloadError, WeightManagedReplica
from .weights import WeightManager


def _configure_cpu_threads() -> None:
    """Before vLLM and torch are imported: vLLM's CPU backend pins one OpenMP thread per core and
    reserves a core for its scheduler; on a machine shared with trainers and notebooks, use the
    replica's thread budget (WORKBENCH_DEPLOYMENT_THREADS, default 1) without pinning instead."""
    threads = os.environ.get("WORKBENCH_DEPLOYMENT_THREADS", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")


def _die_with_replica() -> None:
    """In vLLM's engine-core and worker processes: die (SIGKILL) as soon as the process that started
    them does. vLLM's workers watch the engine core, but the engine core does not watch the replica,
    so a replica killed with SIGKILL would leave an orphaned engine holding the model's memory."""
    import ctypes
    import signal
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except OSError:
        return   # not Linux
    if os.getppid() == 1:   # the parent died before prctl took effect
        os._exit(1)


if __name__ == "__mp_main__":
    # multiprocessing's spawn re-imports the main module under this name in every child it starts:
    # here, vLLM's engine core (child of the replica) and its worker (child of the engine core)
    _die_with_replica()


def _push_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class _Held:
    """Stands where the built-in manager keeps an fp32 model (`model` / `spare`): what a snapshot puts
    in the engine, validated by `_load_into` (full weights) or `_merge_lora` (an adapter), waiting for
    `swap_model` to push it into vLLM. `model` is what vLLM serves now."""

    def __init__(self):
        self.weights: dict | None = None
        """The dense weights (for a LoRA snapshot: the base its adapter applies to)."""
        self.key: object | None = None
        """Names `weights`: the engine is not pushed weights it holds already (same key)."""
        self.adapter = None
        """vllm_lora.PreparedAdapter of a LoRA snapshot; None for full weights."""
        self.lora_id: int | None = None
        """vLLM's adapter id for it: new for every load."""


class VllmWeightManager(WeightManager):
    """WeightManager whose weights live in a running vLLM engine instead of an fp32 torch model.

    The built-in manager's hot load reads and decodes a snapshot, `_load_into(spare, weights)`, records
    it in state.json, then `engine.swap_model(spare, identity, drain)`. Here `_load_into` only checks
    that the weights fit the base model (nothing reaches vLLM yet), and the swap is the push."""

    def __init__(self, deployment_dir: Path, config: dict, options=None):
        super().__init__(deployment_dir, config)
        self.options = options
        self.model, self.spare = _Held(), _Held()
        self._reset_on_push = False
        self._param_shapes: dict[str, tuple] = {}
        self.last_push: dict = {}
        self._pause_s = 0.0
        self.base_fp32: dict | None = None     # the model files' own weights: what LoRA adapters apply to
        self._tied = False
        self._engine_key: object | None = None  # the _Held.key of the dense weights vLLM holds
        self._lora_ids = itertools.count(1)
        self._lora_base_key = object()          # _Held.key of base_fp32 alone (adapters without whole modules)
        self.adapters_dir = self.dir / "vllm-adapters"

    # ---- startup ----------------------------------------------------------------------------------
    def _startup(self) -> None:
        try:
            import json

            import torch
            from safetensors.torch import load_file

            from workbench import models
            from .vllm_engine import VllmEngine
            from .weights import check_finite

            model_dir = models.local_path(self.base_model)
            self.tokenizer = models.load_tokenizer(self.base_model)
            cfg = json.loads((model_dir / "config.json").read_text())
            self.vocab_size = int(cfg["vocab_size"])
            self.max_context = int(cfg.get("max_position_embeddings") or 1 << 30)
            # the CPU copy every delta decodes against: the base model rounded to bf16, which is what
            # a base snapshot of it holds and what the built-in replica serves with identity null
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise RuntimeError(f"{model_dir} has no *.safetensors weights")
            raw = {}
            for f in files:
                raw.update(load_file(str(f)))
            self.base_fp32 = raw
            self.base_bf16 = {k: v.to(torch.bfloat16) for k, v in raw.items()}
            check_finite(self.base_bf16, None)
            self._param_shapes = {k: tuple(v.shape) for k, v in self.base_bf16.items()}
            self._tied = bool(cfg.get("tie_word_embeddings", False))
            shutil.rmtree(self.adapters_dir, ignore_errors=True)   # copies of a previous process's adapters
            self.engine = VllmEngine(model_dir, options=self.options, max_context=self.max_context)
            self.engine.swap_model = self._swap_model
            self.engine.retract_swap = lambda done: False      # a push is synchronous: nothing to retract
            self.engine.watch_pauses = self._watch_pauses
            self.engine.pauses_seen = lambda: self._pause_s
            t0 = time.perf_counter()
            self.engine.start()
            self.engine_start_seconds = round(time.perf_counter() - t0, 3)
            print(f"vLLM engine ready in {self.engine_start_seconds:.1f} s", flush=True)
            self._engine_key = self._lora_base_key      # vLLM loaded the model files as they are
            restored = self._restore()
            if restored is not None:
                self._apply(self.model, restored)
            else:
                # serve the bf16-rounded base, as the built-in replica does, so identity null means one
                # thing (the embedded models' files are fp32)
                bf16 = all(v.dtype == torch.bfloat16 for v in raw.values())
                self.model.weights, self.model.key = self.base_bf16, (self._lora_base_key if bf16 else object())
                self._apply(self.model, None)
            with self._state_lock:
                self.ready = True
                if restored is None:
                    self.current_bf16 = self.base_bf16
                    if self.loading_state.get("stage") != "error":
                        self.loading_state = {"stage": "done"}
        except Exception as e:  # the process stays up to report it; inference answers 503
            self._record_startup_failure(e)
        finally:
            self._lock.release()

    # ---- hot load ---------------------------------------------------------------------------------
    def hotload(self, identity, metadata=None, snapshot_root=None, source_url=None,
                reset_prompt_cache: bool = False, drain: bool | None = None) -> dict:
        self._reset_on_push = bool(reset_prompt_cache)
        self.last_push = {}
        result = super().hotload(identity, metadata, snapshot_root=snapshot_root, source_url=source_url,
                                 reset_prompt_cache=reset_prompt_cache, drain=drain)
        result.update({f"push_{k}": v for k, v in self.last_push.items()})
        return result

    def _merge_lora(self, adapter_dir: Path, target: _Held) -> dict:
        """Prepare a LoRA snapshot for the swap (nothing reaches vLLM yet): check the adapter and write
        the copy vLLM loads (vllm_lora.py); `target` gets the adapter and the dense weights it applies
        to. Returns the adapter's tensors (what the caller checks for non-finite values)."""
        from .vllm_lora import prepare_adapter

        options = self.engine.options
        if not options.enable_lora:
            raise HotloadError(422, f"{adapter_dir.name} is a LoRA snapshot, and this vLLM deployment was "
                                    "started without LoRA (WORKBENCH_VLLM_LORA=0)")
        lora_id = next(self._lora_ids)
        adapter = prepare_adapter(adapter_dir, self.adapters_dir / str(lora_id), self._param_shapes,
                                  self._tied, options.max_lora_rank)
        target.adapter, target.lora_id = adapter, lora_id
        if adapter.full:
            target.weights, target.key = {**self.base_fp32, **adapter.full}, object()
        else:
            target.weights, target.key = self.base_fp32, self._lora_base_key
        return adapter.tensors

    def _load_into(self, model, weights: dict) -> None:
        """Check that `weights` fit the base model (names, shapes) and hold them for the swap."""
        shapes = self._param_shapes
        unexpected = sorted(weights.keys() - shapes.keys())
        missing = sorted(shapes.keys() - weights.keys())
        wrong = [f"{k}: {tuple(v.shape)} vs {shapes[k]}" for k, v in weights.items()
                 if k in shapes and tuple(v.shape) != shapes[k]]
        if missing or unexpected or wrong:
            raise HotloadError(422, f"snapshot does not fit base model {self.base_model}: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
        model.weights, model.key, model.adapter, model.lora_id = weights, object(), None, None

    def _watch_pauses(self) -> None:
        self._pause_s = 0.0

    def _swap_model(self, held: _Held, identity: str | None = None, drain: bool = False) -> threading.Event:
        """The engine's swap: put the held snapshot into vLLM now. If vLLM fails half-way, what was
        served before (`self.model`) is put back before the error propagates (the caller then restores
        state.json and answers that the previous snapshot keeps serving)."""
        previous, previous_identity = self.model, self.current_identity
        try:
            self._apply(held, identity, reset_prefix_cache=self._reset_on_push, drain=drain)
        except BaseException:
            traceback.print_exc()
            if previous.weights is not None:
                try:
                    self._apply(previous, previous_identity)
                except Exception:
                    traceback.print_exc()
            raise
        done = threading.Event()
        done.set()
        return done

    def _apply(self, held: _Held, identity: str | None, reset_prefix_cache: bool = False,
               drain: bool = False) -> None:
        """Make vLLM serve `held`: its dense weights (written to one safetensors file and reloaded in
        place, unless vLLM holds them already), then its adapter, if any, for every new request."""
        from safetensors.torch import save_file

        from .weights import _untie

        t0 = time.perf_counter()
        lora = None
        if held.adapter is not None:
            from vllm.lora.request import LoRARequest
            lora = LoRARequest(lora_name=f"{identity}#{held.lora_id}", lora_int_id=held.lora_id,
                               lora_path=str(held.adapter.path))
        with tempfile.TemporaryDirectory(prefix="wb-vllm-push-", dir=_push_dir()) as tmp:
            path = None
            if held.key is not self._engine_key:
                path = os.path.join(tmp, "model.safetensors")
                save_file({k: v.contiguous() for k, v in _untie(held.weights).items()}, path)
            t1 = time.perf_counter()
            try:
                n, paused = self.engine.call(self._apply_async(path, lora, identity, reset_prefix_cache, drain),
                                             timeout=600)
            except BaseException:
                if path is not None:
                    self._engine_key = None       # half pushed, maybe: the next apply pushes in full
                raise
        self._engine_key = held.key
        t2 = time.perf_counter()
        self.engine.pushes += path is not None
        self._pause_s = max(self._pause_s, paused)
        self.last_push = {"tensors": n, "write_seconds": round(t1 - t0, 6), "engine_seconds": round(t2 - t1, 6),
                          "generation_paused_seconds": round(paused, 6),
                          "prefix_cache_reset": bool(reset_prefix_cache),
                          "adapter": lora.lora_name if lora is not None else None}
        self._prune_adapters(held)

    async def _apply_async(self, path: str | None, lora, identity: str | None, reset_prefix_cache: bool,
                           drain: bool) -> tuple[int, float]:
        engine = self.engine
        llm = engine.llm
        # an adapter is bound to a request when it is submitted: a swap from or to one drains, and
        # requests arriving meanwhile wait for it (VllmEngine._run), so each runs on one snapshot
        switching = lora is not None or engine.lora_request is not None
        gate = asyncio.Event() if switching else None
        if gate is not None:
            engine.switching = gate
        t0 = time.perf_counter()
        n = 0
        try:
            # "keep": requests in flight are frozen between two steps and continue on the new weights;
            # "wait" (drain): they finish on the old weights first, new ones wait for the new weights
            await llm.pause_generation(mode="wait" if (drain or switching) else "keep", clear_cache=False)
            try:
                if path is not None:
                    counts = await llm.collective_rpc("workbench_load_weights", args=(path,))
                    n = int(counts[0]) if counts else 0
                old = engine.lora_request
                if lora is not None:
                    await llm.add_lora(lora)
                    if lora.lora_int_id not in await llm.list_loras():
                        raise RuntimeError(f"vLLM did not load adapter {lora.lora_name!r}")
                engine.lora_request = lora
                engine.snapshot = identity
                if old is not None and (lora is None or old.lora_int_id != lora.lora_int_id):
                    await llm.remove_lora(old.lora_int_id)
                if reset_prefix_cache:
                    # running requests are preempted and recomputed on the new weights
                    await llm.reset_prefix_cache(reset_running_requests=True)
            finally:
                await llm.resume_generation()
        finally:
            if gate is not None:
                engine.switching = None
                gate.set()
        return n, time.perf_counter() - t0

    def _prune_adapters(self, served: _Held) -> None:
        """Delete vLLM's copies of adapters other than the one served (retired or failed loads)."""
        keep = served.adapter.path.name if served.adapter is not None else None
        if self.adapters_dir.is_dir():
            for d in self.adapters_dir.iterdir():
                if d.name != keep:
                    shutil.rmtree(d, ignore_errors=True)


class VllmReplica(WeightManagedReplica):
    """`replica.Replica` served by vLLM: VllmWeightManager (snapshots) + VllmEngine (generation)."""

    def __init__(self, deployment_dir: Path, config: dict, options=None):
        super().__init__(VllmWeightManager(deployment_dir, config, options=options), config)

    def health(self) -> dict:
        out = self.engine.load() if self.engine is not None else {"engine": "vllm"}
        out["engine_start_seconds"] = getattr(self.weights, "engine_start_seconds", None)
        return out

    def submit(self, request: GenerationRequest, sink: GenerationSink):
        return self.engine.submit(request, sink)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()


def main(argv: list[str] | None = None) -> int:
    _configure_cpu_threads()
    from . import __main__ as replica_main
    return replica_main.main(argv, make_replica=VllmReplica)


if __name__ == "__main__":
    sys.exit(main())
