"""The N-rank trainer: torch.distributed processes, FSDP2-sharded model, sharded DCP train states.

    launch.py  — job.json topology -> torchrun's elastic agent starting this node's ranks
    worker.py  — one rank: process group, model, ShardedEngine; rank 0 serves HTTP
    ranks.py   — rank 0 broadcasts each operation, the others follow in the same order
    engine.py  — ShardedEngine: Engine with fully_shard, data-parallel forward/backward, gathers
"""
