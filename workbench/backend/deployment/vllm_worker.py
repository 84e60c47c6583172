"""Worker extension that vLLM mixes into its worker class (`worker_extension_cls`): weight pushes.

    AsyncEngineArgs(..., worker_extension_cls="workbench.backend.deployment.vllm_worker.WeightPushExtension")
    await llm.collective_rpc("workbench_load_weights", args=("/dev/shm/wb-push-XXXX/model.safetensors",))

Runs inside vLLM's worker process (the engine core's on a single-device CPU/GPU deployment), so it imports
nothing of workbench: only torch and safetensors. Tensors cannot travel as collective_rpc arguments (vLLM
decodes utility arguments without type information), so the replica writes the weights to a safetensors
file (a base snapshot's own `model.safetensors`, or the decoded delta in shared memory) and passes its
path. The worker then streams it into the running model through vLLM's own in-place reload
(`model_runner.reload_weights(weights_iterator=...)`: the model's `load_weights` with its name mapping,
sharding and post-load processing), so no vLLM internals are copied here.
"""

from __future__ import annotations


class WeightPushExtension:
    """Methods callable by name through `collective_rpc`; `self` is vLLM's worker."""

    def workbench_load_weights(self, path: str) -> int:
        """Reload every tensor of the safetensors file `path` into the model in place; returns the count."""
        from safetensors import safe_open

        names = []

        def weights():
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    names.append(name)
                    yield name, f.get_tensor(name)

        self.model_runner.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        _refresh_tied_embeddings(self.model_runner.get_model())
        return len(names)


def _refresh_tied_embeddings(model) -> None:
    """Re-run weight post-processing of embedding layers whose weight another layer shares.

    A tied LM head (`tie_word_embeddings`) shares the input embedding's weight, so the checkpoint has
    no tensor for it and the in-place reload skips it. On a CPU, though, its post-processing packed a
    private GEMM copy of that weight at startup (`UnquantizedEmbeddingMethod` ->
    `dispatch_cpu_unquantized_gemm`), which would keep computing logits with the *startup* weights
    (measured: logprobs off by ~4 nats after training). Re-packing from the now-updated shared weight
    fixes that; on a GPU the step is a no-op."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    owners: dict[int, list] = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, VocabParallelEmbedding) and w is not None:
            owners.setdefault(id(w), []).append(module)
    for modules in owners.values():
        if len(modules) > 1:
            for module in modules:
                method = getattr(module, "quant_method", None)
                if method is not None:
                    method.process_weights_after_loading(module)
