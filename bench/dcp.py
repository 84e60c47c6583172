"""DCP train-state save/load against torch.save/torch.load of the same weights + AdamW state.

    python bench/dcp.py                      # 1M (qwen3-tiny) and 5M (qwen3-small), one process
    python bench/dcp.py --ranks 2            # the same through workbench.checkpoints inside a 2-rank gloo group
    python bench/dcp.py --sizes 75           # add a ~75M-parameter Qwen3 (random weights, built in memory)

Each configuration: a model with one AdamW step taken (so exp_avg / exp_avg_sq exist), then `--repeats`
saves and loads of the same state by `workbench.checkpoints.save_train_state` / `load_train_state`
(staged, manifest last, fsync, rename) and by `torch.save` / `torch.load` (one file, plus fsync, the
same durability). Prints median seconds and the ratio torch/DCP (>1 means DCP is slower).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(size: str):
    from workbench import models

    if size == "1":
        model = models.load_model(models.DEFAULT_MODEL)
    elif size == "5":
        model = models.load_model(models.SMALL_MODEL)
    else:   # ~75M: a wider/deeper config of the same architecture, random init (no download)
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(models.local_path(models.SMALL_MODEL))
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 512, 1536, 20
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 8, 4, 64
        cfg.vocab_size = 8192
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def measure(model, opt, root: Path, repeats: int, rank: int) -> dict:
    import torch.distributed as dist

    from workbench.checkpoints import load_train_state, save_train_state

    distributed = dist.is_available() and dist.is_initialized()
    out = {"dcp_save": [], "dcp_load": [], "torch_save": [], "torch_load": []}
    for i in range(repeats):
        dest = root / f"dcp-{i}"
        if distributed:
            dist.barrier()
        t = time.perf_counter()
        save_train_state(dest, model, opt, {"step": 1, "base_model": "bench", "lora_rank": 0})
        out["dcp_save"].append(time.perf_counter() - t)
        if distributed:
            dist.barrier()
        t = time.perf_counter()
        load_train_state(dest, model, opt)
        out["dcp_load"].append(time.perf_counter() - t)
        if rank == 0:
            target = root / f"torch-{i}.pt"
            t = time.perf_counter()
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, target)
            _fsync_file(target)
            out["torch_save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            state = torch.load(target, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            out["torch_load"].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in out.items() if v}


def run(sizes: list[str], repeats: int, rank: int = 0) -> None:
    for size in sizes:
        model, opt = build(size)
        if torch.distributed.is_initialized():
            from torch.distributed.fsdp import fully_shard

            for m in model.modules():
                if type(m).__name__.endswith("DecoderLayer"):
                    fully_shard(m)
            fully_shard(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            ids = torch.randint(0, model.config.vocab_size, (1, 16))
            model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
            opt.step()
            opt.zero_grad()
        params = sum(p.numel() for p in model.parameters())
        root = Path(tempfile.mkdtemp(prefix="bench-dcp-")) if rank == 0 else None
        if torch.distributed.is_initialized():
            box = [str(root) if root else None]
            torch.distributed.broadcast_object_list(box, src=0)
            root = Path(box[0])
        m = measure(model, opt, root, repeats, rank)
        if rank == 0:
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            line = (f"{params / 1e6:6.1f}M params, {world} rank(s): DCP save {m['dcp_save']:.3f}s load "
                    f"{m['dcp_load']:.3f}s")
            if "torch_save" in m and world == 1:
                line += (f" | torch.save {m['torch_save']:.3f}s load {m['torch_load']:.3f}s | throughput DCP/torch "
                         f"save {m['torch_save'] / m['dcp_save']:.2f}x load {m['torch_load'] / m['dcp_load']:.2f}x")
            print(line + f" (load average {' '.join(open('/proc/loadavg').read().split()[:3])})", flush=True)
            shutil.rmtree(root, ignore_errors=True)


def _rank_main(rank: int, world: int, port: int, sizes: list[str], repeats: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run(sizes, repeats, rank)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,5", help="comma-separated: 1 (qwen3-tiny), 5 (qwen3-small), 75")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    torch.set_num_threads(1)
    if args.ranks == 1:
        run(sizes, args.repeats)
        return
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(args.ranks, port, sizes, args.repeats), nprocs=args.ranks)


if __name__ == "__main__":
    main()
