"""Every sampler-delta format side by side on the same tensors: arc_v1, arc_v2, arc_v3 (fireworks-delta-compression)
and workbench_v1, on a real AdamW trajectory.

    python bench/delta_codec.py [--model small|75m|<catalog name>] [--warmup 20] [--repeats 3] [--arc3-runs 3]
        [--formats arc_v2,workbench_v1] [--lrs 1e-4,1e-5] [--compare TREE] [--snapshots DIR]

Trains the model (fp32 AdamW, batches of 8 x 64 random tokens) at lr 1e-4, 1e-5 and 1e-6, takes bf16
snapshots after `warmup` steps, one step later and ten steps later, and for the 1-step and 10-step
deltas prints, per format, measured in one run through the code a trainer and a deployment run
(`formats.write_delta` into a directory, `formats.read_delta` back with every checksum verified, arc_v3
envelopes checked by the restricted unpickler first):

  the delta file's size, its ratio vs raw bf16 and vs arc_v2; workbench_v1 vs arc_v3;
  encode and decode MB/s of raw bf16 per CPU-second (time.process_time: all threads of this process,
  since arc_v3 encodes its candidates in a thread pool; one torch thread), best of `repeats`;
  workbench_v1's decode also into recycled buffers (`out=`, what a deployment does from its second
  delta on: on this VM first-touching fresh memory costs more than decoding).

`--compare TREE` (a checkout of another commit, e.g. `git worktree add --detach /tmp/before main`) also
times that tree's workbench_v1 codec (TREE/workbench/checkpoints/delta_codec.py) on the same deltas:
each tree encodes its own file (trees may write different format versions; both sizes are printed)
and decodes it, alternating with this tree, into fresh and recycled buffers: an A/B in one run, on a
shared machine where runs minutes apart differ by more than the change. `--snapshots DIR` keeps the trained
snapshots there and reuses them (the 75M model trains for minutes per learning rate).

arc_v3 races its candidate encodings against a deadline, so its size depends on timing and free
cores: it is encoded `arc3-runs` times and the min and max sizes are reported. "75m" builds the ~75M
Qwen3 of bench/hotload.py (random init, registered through a temporary catalog). Every decode is
checked bit for bit against the trainer's weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

LRS = (1e-4, 1e-5, 1e-6)
FORMATS = ("arc_v1", "arc_v2", "arc_v3", "workbench_v1")


def trajectory(model_name: str, lr: float, warmup: int, seed: int = 0, keep: Path | None = None) -> dict[int, dict]:
    """bf16 snapshots at steps warmup, warmup + 1 and warmup + 10 of an AdamW run (read from / saved to `keep`)."""
    from safetensors.torch import load_file, save_file

    from workbench.checkpoints import bf16_state
    from workbench.models import load_model

    steps = (warmup, warmup + 1, warmup + 10)
    files = {}
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        files = {step: keep / f"{model_name.replace('/', '_')}-lr{lr:g}-seed{seed}-step{step}.safetensors" for step in steps}
        if all(f.is_file() for f in files.values()):
            return {step: load_file(str(f)) for step, f in files.items()}

    torch.manual_seed(seed)
    model = load_model(model_name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    tokens = torch.Generator().manual_seed(seed + 1)
    vocab = model.config.vocab_size
    snapshots = {}
    for step in range(1, warmup + 11):
        x = torch.randint(0, vocab, (8, 64), generator=tokens)
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in steps:
            snapshots[step] = bf16_state(model)
    for step, f in files.items():
        save_file({k: v.contiguous() for k, v in snapshots[step].items()}, str(f))
    return snapshots


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


def timed(fn):
    gc.collect()
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def load_codec(tree: Path):
    """TREE's workbench_v1 codec module, loaded beside this tree's (it imports this tree's workbench.common)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compared_delta_codec", tree / "workbench/checkpoints/delta_codec.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_decoders(blob: bytes, new: dict, old: dict, other, repeats: int) -> dict:
    """workbench_v1 MB/s per CPU-second, this tree's and `other`'s, each decoding what its own encoder wrote
    (the trees may write different format versions), alternating; also both files' sizes and encode speeds."""
    from workbench.checkpoints import delta_codec

    raw = sum(t.numel() * 2 for t in new.values())
    blobs = {"this": blob}
    encode_times = {"this": [], "other": []}
    for _ in range(repeats):
        for label, codec in (("this", delta_codec), ("other", other)):
            blobs[label], seconds = timed(lambda: codec.encode(new, old, "prev"))
            encode_times[label].append(seconds)
    recycled = {k: v.clone() for k, v in new.items()}
    times = {}
    for _ in range(repeats):
        for label, codec in (("this", delta_codec), ("other", other)):
            for into in ("fresh", "recycled"):
                result, seconds = timed(lambda: codec.decode(blobs[label], old, "prev",
                                                             out=recycled if into == "recycled" else None))
                assert same_bits(result, new), f"{label} tree's decoder did not reconstruct bit for bit"
                del result
                times.setdefault((label, into), []).append(seconds)
    out = {key: raw / min(t) / 1e6 for key, t in times.items()}
    out.update({("size", label): len(b) for label, b in blobs.items()})
    out.update({("encode", label): raw / min(t) / 1e6 for label, t in encode_times.items()})
    return out


def measure(new: dict, old: dict, repeats: int, arc3_runs: int, scratch: Path, formats_: tuple = FORMATS,
            other=None) -> dict:
    from workbench.checkpoints import formats

    raw = sum(t.numel() * 2 for t in new.values())
    out = {"raw": raw}
    for fmt in formats_:
        sizes, enc_times, dec_times = [], [], []
        runs = max(repeats, arc3_runs if fmt == "arc_v3" else 0)
        for i in range(runs):
            d = scratch / f"{fmt}-{i}"
            d.mkdir()
            stats, seconds = timed(lambda: formats.write_delta(d, new, old, "prev", fmt))
            sizes.append(stats["delta_bytes"])
            enc_times.append(seconds)
            out["changed"] = stats["changed_elements"] / stats["total_elements"]
            if i < repeats:
                result, seconds = timed(lambda: formats.read_delta(d, old, fmt, "prev"))
                dec_times.append(seconds)
                assert same_bits(result, new), f"{fmt} did not reconstruct bit for bit"
                del result
        out[fmt] = {"min": min(sizes), "max": max(sizes), "enc": raw / min(enc_times) / 1e6,
                    "dec": raw / min(dec_times) / 1e6}
    if "workbench_v1" not in formats_:
        return out
    # what a deployment does from its second delta on: decode into the bf16 tensors its last swap
    # retired (already faulted in), not into fresh memory
    d = scratch / "workbench_v1-0"
    recycled = {k: v.clone() for k, v in new.items()}
    times = []
    for _ in range(repeats):
        result, seconds = timed(lambda: formats.read_delta(d, old, "workbench_v1", "prev", out=recycled))
        times.append(seconds)
        assert same_bits(result, new) and all(result[k] is recycled[k] for k in new)
    out["wb_recycled_dec"] = raw / min(times) / 1e6
    if other is not None:
        out["compare"] = compare_decoders((d / formats.WORKBENCH_DELTA_FILE).read_bytes(), new, old, other, repeats)
    return out


def kb(n: int) -> str:
    return f"{n / 1024:,.0f} KiB" if n >= 10 * 1024 else f"{n / 1024:.1f} KiB"


def resolve_model(name: str, where: Path) -> str:
    from workbench import models

    if name == "small":
        return models.SMALL_MODEL
    if name == "75m":
        sys.path.insert(0, str(Path(__file__).parent))
        from hotload import MEDIUM, make_medium

        catalog = where / "models.json"
        catalog.write_text(json.dumps({MEDIUM: str(make_medium(where))}))
        os.environ["WORKBENCH_MODEL_CATALOG"] = str(catalog)
        return MEDIUM
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", help="small (qwen3-small, ~5M), 75m, or a catalog model name")
    ap.add_argument("--warmup", type=int, default=20, help="AdamW steps before the first snapshot")
    ap.add_argument("--repeats", type=int, default=3, help="timed encode/decode runs per format (best is reported)")
    ap.add_argument("--arc3-runs", type=int, default=3, help="arc_v3 encodings per delta (min and max size reported)")
    ap.add_argument("--lrs", default=",".join(str(x) for x in LRS))
    ap.add_argument("--formats", default=",".join(FORMATS), help="which formats to measure (comma-separated)")
    ap.add_argument("--compare", type=Path, help="another checkout whose workbench_v1 decoder to time beside this one")
    ap.add_argument("--snapshots", type=Path, help="keep the trained snapshots here and reuse them")
    args = ap.parse_args()
    torch.set_num_threads(1)
    formats_ = tuple(f for f in FORMATS if f in args.formats.split(","))
    if args.compare is not None and "workbench_v1" not in formats_:
        ap.error("--compare times workbench_v1: include it in --formats")
    other = load_codec(args.compare) if args.compare is not None else None

    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = resolve_model(args.model, Path(tmp))
        for lr in (float(x) for x in args.lrs.split(",")):
            snaps = trajectory(model, lr, args.warmup, keep=args.snapshots)
            w = args.warmup
            for label, a, b in (("1 step", w, w + 1), ("10 steps", w, w + 10)):
                with tempfile.TemporaryDirectory(dir=tmp) as scratch:
                    rows.append((lr, label, measure(snaps[b], snaps[a], args.repeats, args.arc3_runs, Path(scratch),
                                                    formats_, other)))
            del snaps

    params = rows[0][2]["raw"] // 2
    load = os.getloadavg()
    print(f"model {model} ({params / 1e6:.2f}M bf16 values), AdamW fp32, batch 8x64 random tokens, snapshots after "
          f"step {args.warmup}; MB/s of raw bf16 per CPU-second (one torch thread; all threads counted), best of "
          f"{args.repeats}; arc_v3 size min-max of {max(args.repeats, args.arc3_runs)} encodings; "
          f"{time.perf_counter() - started:.0f} s in all; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n")
    if formats_ == FORMATS:
        print("| lr | delta | changed | raw bf16 | arc_v1 | arc_v2 | arc_v3 (min-max) | workbench_v1 | raw / size "
              "v1 / v2 / v3 / wb | wb vs arc_v2 | wb vs arc_v3 | encode MB/s v1 / v2 / v3 / wb "
              "| decode MB/s v1 / v2 / v3 / wb | wb decode MB/s into recycled buffers |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for lr, label, m in rows:
            v1, v2, v3, wb = (m[f] for f in FORMATS)
            ratios = " / ".join(f"{m['raw'] / m[f]['min']:.1f}x" for f in FORMATS)
            print(f"| {lr:g} | {label} | {m['changed']:.1%} | {kb(m['raw'])} | {kb(v1['min'])} | {kb(v2['min'])} "
                  f"| {kb(v3['min'])}-{kb(v3['max'])} | {kb(wb['min'])} | {ratios} | **{v2['min'] / wb['min']:.2f}x** "
                  f"| **{v3['min'] / wb['min']:.2f}-{v3['max'] / wb['min']:.2f}x** "
                  f"| {v1['enc']:.0f} / {v2['enc']:.0f} / {v3['enc']:.0f} / {wb['enc']:.0f} "
                  f"| {v1['dec']:.0f} / {v2['dec']:.0f} / {v3['dec']:.0f} / {wb['dec']:.0f} | {m['wb_recycled_dec']:.0f} |")
    else:
        names = " / ".join(formats_)
        recycled = "workbench_v1" in formats_
        print(f"| lr | delta | changed | raw bf16 | size {names} | raw / size | encode MB/s {names} "
              f"| decode MB/s {names} |" + (" wb decode MB/s into recycled buffers |" if recycled else ""))
        print("|---|---|---|---|---|---|---|---|" + ("---|" if recycled else ""))
        for lr, label, m in rows:
            sizes = " / ".join(kb(m[f]["min"]) for f in formats_)
            ratios = " / ".join(f"{m['raw'] / m[f]['min']:.1f}x" for f in formats_)
            enc = " / ".join(f"{m[f]['enc']:.0f}" for f in formats_)
            dec = " / ".join(f"{m[f]['dec']:.0f}" for f in formats_)
            print(f"| {lr:g} | {label} | {m['changed']:.1%} | {kb(m['raw'])} | {sizes} | {ratios} | {enc} | {dec} |"
                  + (f" {m['wb_recycled_dec']:.0f} |" if recycled else ""))
    if other is not None:
        print(f"\nworkbench_v1, this tree / {args.compare} (each tree decodes the file its own encoder wrote, "
              f"alternating; MB/s of raw bf16 per CPU-second, best of {args.repeats}):\n")
        print("| lr | delta | changed | size | encode MB/s | decode into fresh memory | decode into recycled buffers "
              "| recycled: speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        for lr, label, m in rows:
            c = m["compare"]
            print(f"| {lr:g} | {label} | {m['changed']:.1%} | {kb(c['size', 'this'])} / {kb(c['size', 'other'])} "
                  f"| {c['encode', 'this']:.0f} / {c['encode', 'other']:.0f} "
                  f"| {c['this', 'fresh']:.0f} / {c['other', 'fresh']:.0f} "
                  f"| {c['this', 'recycled']:.0f} / {c['other', 'recycled']:.0f} "
                  f"| {c['this', 'recycled'] / c['other', 'recycled']:.2f}x |")


if __name__ == "__main__":
    main()
