"""Sampler delta formats: which exist, how a trainer job picks one, and the two functions that write and read them.

    stats = write_delta(tmp_dir, new_bf16, old_bf16, base_identity="step-1", delta_format="arc_v2")
    new = read_delta(snapshot_dir, current_bf16, delta_format="arc_v2")      # checksums verified
    fmt = sniff_delta_format(snapshot_dir)        # what the files say (for deltas without a manifest)
    fmt = choose_job_format(extra_values, extra_args, default="arc_v2")       # a trainer job's format

| name           | file in the snapshot            | written by                                   |
|----------------|---------------------------------|----------------------------------------------|
| `arc_v2`       | delta.safetensors               | fireworks_delta_compression: XOR + zstd (default; the SDK's DEFAULT_DELTA_COMPRESSION) |
| `arc_v1`       | delta.safetensors               | fireworks_delta_compression: XOR + zlib      |
| `arc_v3`       | delta.safetensors               | fireworks_delta_compression: typed mantissa coding, races candidates |
| `workbench_v1` | delta.wbd                       | workbench's own codec (delta_codec.py, docs/delta-format.md) |

The arc_* files are exactly what the published library writes (`delta_compress_dicts_to_file`: a
safetensors file of per-tensor uint8 patches, adler32 checksums in its metadata), so the library
alone reads them back, and a delta directory it wrote (any *.safetensors name, shards included)
reads here. arc_v3 patches are pickles: each is checked with safe_pickle.loads_plain before the
library unpickles it, so a crafted patch is a DeltaError and runs nothing.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

from workbench.common import LazyModule

torch = LazyModule("torch")  # imported on first use: the control plane reads formats without tensors

from .delta_codec import DeltaError, pace, reusable

# arc2's decoder wraps zstd's read-only output in a tensor it only reads; torch warns about that once.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

DEFAULT_DELTA_FORMAT = "arc_v2"          # what WeightSyncer and hot-load requests name by default
WORKBENCH_DELTA_FORMAT = "workbench_v1"
LIBRARY_FORMATS = ("arc_v2", "arc_v1", "arc_v3")
DELTA_FORMATS = (*LIBRARY_FORMATS, WORKBENCH_DELTA_FORMAT)
CHECKSUM_FORMAT = "alder32"              # the SDK's spelling of adler32, the only checksum every format uses
CHECKSUM_FORMATS = ("alder32", "adler32")
LIBRARY_DELTA_FILE = "delta.safetensors"
WORKBENCH_DELTA_FILE = "delta.wbd"
# How a user picks a trainer job's format (README "Delta formats"); the serve-wide default comes from
# `workbench serve --compression-format` through this environment variable.
EXTRA_VALUES_KEY = "compression_format"
EXTRA_ARG = "--compression-format"
DEFAULT_ENV = "WORKBENCH_DELTA_FORMAT"
HOW_TO_CHOOSE = (f"choose the trainer's format when creating the job with TrainerJobConfig(extra_values="
                 f"{{'{EXTRA_VALUES_KEY}': ...}}) or `workbench serve {EXTRA_ARG} ...`, and pass the same name "
                 f"to WeightSyncer(compression_format=...)")

_ARC3_PREFIX = b"ARC3_ENVELOPE\0"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_HEADER = 100 << 20


class DeltaFormatError(DeltaError):
    """A hot-load that names a different delta or checksum format than the snapshot was written in."""

    http_status = 400


def check_format(name, field: str = "compression_format") -> str:
    """`name` if it is a delta format, else ValueError naming `field` and the formats."""
    if not isinstance(name, str) or name not in DELTA_FORMATS:
        raise ValueError(f"{field} {name!r} is not a delta format; choose one of {', '.join(DELTA_FORMATS)}")
    return name


def choose_job_format(extra_values=None, extra_args=None, default: str | None = None) -> str:
    """A trainer job's delta format: extraValues["compression_format"], else `--compression-format X` in
    extraArgs, else `default` (the serve default, WORKBENCH_DELTA_FORMAT, else arc_v2). ValueError names the field."""
    if extra_values is not None and not isinstance(extra_values, dict):
        raise ValueError("extraValues must be an object of strings")
    if extra_values and extra_values.get(EXTRA_VALUES_KEY) is not None:
        return check_format(extra_values[EXTRA_VALUES_KEY], f"extraValues.{EXTRA_VALUES_KEY}")
    args = list(extra_args or [])
    for i, arg in enumerate(args):
        if isinstance(arg, str) and arg.startswith(EXTRA_ARG + "="):
            return check_format(arg.split("=", 1)[1], f"trainingConfig.extraArgs {EXTRA_ARG}")
        if arg == EXTRA_ARG:
            return check_format(args[i + 1] if i + 1 < len(args) else None, f"trainingConfig.extraArgs {EXTRA_ARG}")
    chosen = default or os.environ.get(DEFAULT_ENV) or DEFAULT_DELTA_FORMAT
    return check_format(chosen, f"the serve default ({DEFAULT_ENV})")


# ---- safetensors headers (JSON: read without loading any tensor) ------------------------------------

def safetensors_header(path: Path) -> tuple[dict, dict]:
    """(tensor entries, __metadata__) of a safetensors file, checked against the file's size.

    ValueError if the header is unreadable, an entry is malformed, or the data section is not exactly
    what the entries describe (a truncated or padded file).
    """
    entries, metadata, _ = _safetensors_layout(path)
    return entries, metadata


def _safetensors_layout(path: Path) -> tuple[dict, dict, int]:
    """safetensors_header's (entries, metadata) and the file offset where the tensor data starts."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name}: {size} bytes, too short for a safetensors file")
        n = struct.unpack("<Q", head)[0]
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path.name}: header length {n} does not fit in the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path.name}: header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for key, entry in header.items():
        try:
            start, stop = (int(x) for x in entry["data_offsets"])
            dtype, shape = str(entry["dtype"]), [int(d) for d in entry["shape"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path.name}: malformed entry for {key!r}") from e
        if not 0 <= start <= stop or any(d < 0 for d in shape) or not dtype:
            raise ValueError(f"{path.name}: malformed entry for {key!r}")
        end = max(end, stop)
    if 8 + n + end != size:
        raise ValueError(f"{path.name}: the tensors need {8 + n + end} bytes, the file has {size} (truncated or corrupt)")
    return header, metadata if isinstance(metadata, dict) else {}, 8 + n


def is_delta_header(entries: dict, metadata: dict) -> bool:
    """A library-written delta: every tensor a 1-D uint8 patch with a checksum in the metadata."""
    return bool(entries) and all(e.get("dtype") == "U8" and len(e.get("shape", ())) == 1 and str(metadata.get(k, "")).isdigit()
                                 for k, e in entries.items())


def library_delta_files(directory: Path) -> list[Path]:
    """The *.safetensors files of `directory` that are library-written deltas (all of them, or none).

    ValueError if some are deltas and some are not, or a file is unreadable.
    """
    files = sorted(p for p in Path(directory).glob("*.safetensors") if p.is_file())
    kinds = {p: is_delta_header(*safetensors_header(p)) for p in files}
    deltas = [p for p, d in kinds.items() if d]
    if deltas and len(deltas) != len(files):
        raise ValueError(f"{directory} mixes delta patches ({deltas[0].name}) with full tensors "
                         f"({next(p.name for p, d in kinds.items() if not d)})")
    return deltas


# ---- format of a patch ----------------------------------------------------------------------------

def _patch_format(patch: bytes) -> str | None:
    if patch.startswith(_ARC3_PREFIX):
        return "arc_v3"
    if patch.startswith(_ZSTD_MAGIC):
        return "arc_v2"
    if len(patch) >= 2 and patch[0] & 0x0F == 8 and (patch[0] << 8 | patch[1]) % 31 == 0:
        return "arc_v1"          # a zlib stream header
    if len(patch) >= 9 and patch[8:9] == b"{":
        return "arc_v3"          # arc_v3's fallback: a one-tensor safetensors blob holding an arc_v2 patch
    return None


def read_tensors(files: list[Path], out: dict | None = None) -> dict[str, "torch.Tensor"]:
    """Every tensor of these safetensors files, one tensor at a time.

    `out`: bf16 tensors the caller no longer needs (a deployment's retired snapshot). A BF16 entry
    with a tensor of its name and shape there (contiguous, CPU) is read straight into it with
    `readinto`, and that tensor is returned in its place: no fresh memory, whose first touch costs
    more than the read on this VM (see delta_codec.py), and the GIL is free during the read. After a
    failure their contents are undefined. Other entries are read with safetensors' `safe_open`.

    Not `load_file`/`load(bytes)`: those build the whole file while holding the GIL (a 90 MB file
    stalled every other thread for 96 ms and 2.1 s here), which a deployment's decode thread would
    feel as a sampler pause; `safe_open` releases it between tensors."""
    from safetensors import safe_open

    weights: dict[str, "torch.Tensor"] = {}
    for f in files:
        into = {}
        if out:
            entries, _, data_start = _safetensors_layout(f)
            for key, entry in entries.items():
                t = reusable(out, key, entry["shape"])
                start, stop = (int(x) for x in entry["data_offsets"])
                if t is not None and entry["dtype"] == "BF16" and stop - start == 2 * t.numel():
                    into[key] = (t, data_start + start)
        if into:
            with open(f, "rb", buffering=0) as raw:
                for key, (t, offset) in into.items():
                    raw.seek(offset)
                    _read_exactly(raw, t.view(-1).view(torch.uint8).numpy(), f)
                    weights[key] = t
                    pace()
        with safe_open(str(f), framework="pt") as opened:
            for key in opened.keys():
                if key not in into:
                    weights[key] = opened.get_tensor(key)
                    pace()
    return weights


def _read_exactly(raw, buf, path) -> None:
    """Fill the uint8 array `buf` from the unbuffered file `raw` (readinto may return less than asked)."""
    view, got = memoryview(buf), 0
    while got < len(view):
        n = raw.readinto(view[got:])
        if not n:
            raise ValueError(f"{Path(path).name}: ends early (truncated)")
        got += n


def _load_patches(files: list[Path]) -> tuple[dict, dict]:
    """(key -> its patch, key -> its checksum string). A patch is a read-only memoryview of the file,
    mapped rather than read: no copy, and no fresh memory to fault in (see read_tensors)."""
    import mmap

    patches, checksums = {}, {}
    for path in files:
        try:
            entries, metadata, data_start = _safetensors_layout(path)
            with open(path, "rb") as f:
                view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) if entries else None
        except (OSError, ValueError) as e:
            raise DeltaError(f"{path.name}: unreadable safetensors ({type(e).__name__}: {e})") from e
        for key, entry in entries.items():
            start, stop = (int(x) for x in entry["data_offsets"])
            if entry["dtype"] != "U8" or [int(d) for d in entry["shape"]] != [stop - start]:
                raise DeltaError(f"{path.name}: tensor {key!r} is not a 1-D uint8 patch of its {stop - start} bytes")
            if key in patches:
                raise DeltaError(f"tensor {key!r} appears in two delta files")
            patches[key], checksums[key] = view[data_start + start:data_start + stop], str(metadata[key])
    return patches, checksums


def _sniff_patches(patches: dict) -> str:
    found = {_patch_format(bytes(p[:16])) for p in patches.values()}
    if len(found) != 1 or None in found:
        raise DeltaError(f"delta patches are not in one known arc format (found {sorted(map(str, found))})")
    return found.pop()


def sniff_delta_format(directory: Path) -> str:
    """The format a delta snapshot's files are in (workbench_v1 or arc_v1/v2/v3); DeltaError if none."""
    directory = Path(directory)
    if (directory / WORKBENCH_DELTA_FILE).is_file():
        return WORKBENCH_DELTA_FORMAT
    try:
        files = library_delta_files(directory)
    except (OSError, ValueError) as e:
        raise DeltaError(f"{directory}: {e}") from e
    if not files:
        raise DeltaError(f"{directory} holds no delta ({WORKBENCH_DELTA_FILE} or library-written *.safetensors)")
    return _sniff_patches(_load_patches(files)[0])


# ---- arc_v3 envelopes: plain data only ------------------------------------------------------------

def _check_arc3_patch(key: str, patch: bytes, numel: int) -> None:
    """Refuse an arc_v3 patch whose pickles hold anything but plain data, before the library unpickles it."""
    import bz2

    import zstd

    from .safe_pickle import UnsafePickleError, loads_plain

    if not patch.startswith(_ARC3_PREFIX):
        return                    # the safetensors fallback: no pickle in it
    try:
        envelope = loads_plain(patch[len(_ARC3_PREFIX):], f"tensor {key}: arc_v3 envelope")
        if not isinstance(envelope, dict) or not isinstance(envelope.get("data"), bytes):
            raise DeltaError(f"tensor {key}: arc_v3 envelope is not {{'codec', 'data'}}")
        codec, data = envelope.get("codec"), envelope["data"]
        limit = 64 * numel + (1 << 20)       # a payload is a few bytes per element at most
        if codec == "zstd":
            declared = _zstd_content_size(data)
            if declared is None or declared > limit:
                raise DeltaError(f"tensor {key}: arc_v3 payload declares {declared} bytes (limit {limit})")
            raw = zstd.decompress(data)
        elif codec == "bz2":
            d = bz2.BZ2Decompressor()
            raw = d.decompress(data, max_length=limit)
            if not d.eof:
                raise DeltaError(f"tensor {key}: arc_v3 payload larger than {limit} bytes or truncated")
        else:
            raise DeltaError(f"tensor {key}: arc_v3 codec {codec!r} is not zstd or bz2")
        payload = loads_plain(raw, f"tensor {key}: arc_v3 payload")
    except UnsafePickleError as e:
        raise DeltaError(str(e)) from e
    except (zstd.Error, OSError, EOFError, ValueError) as e:
        if isinstance(e, DeltaError):
            raise
        raise DeltaError(f"tensor {key}: corrupt arc_v3 payload ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict):
        raise DeltaError(f"tensor {key}: arc_v3 payload is not a dictionary")


def _zstd_content_size(frame: bytes) -> int | None:
    import zstandard

    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        return None
    return None if size < 0 else size


# ---- the two narrow functions ---------------------------------------------------------------------

def write_delta(directory: Path, new_bf16: dict, old_bf16: dict, base_identity: str,
                delta_format: str = DEFAULT_DELTA_FORMAT) -> dict:
    """Write `new_bf16` as a delta over `old_bf16` into `directory` (a staging dir) in `delta_format`.

    Returns {"delta_format", "file", "delta_bytes", "raw_bytes", "changed_elements", "total_elements"}.
    """
    check_format(delta_format, "delta_format")
    if set(new_bf16) != set(old_bf16):
        raise ValueError("new and old weights differ in tensor names")
    directory = Path(directory)
    if delta_format == WORKBENCH_DELTA_FORMAT:
        from . import delta_codec

        blob = delta_codec.encode(new_bf16, old_bf16, base_identity)
        path = directory / WORKBENCH_DELTA_FILE
        path.write_bytes(blob)
    else:
        from fireworks_delta_compression import delta_compress_dicts_to_file

        path = directory / LIBRARY_DELTA_FILE
        # src = the weights the reader holds, dst = the new ones (the library's naming).
        delta_compress_dicts_to_file(src=old_bf16, dst=new_bf16, diff_file=str(path), compression_format=delta_format)
    changed = sum(int(torch.count_nonzero(new_bf16[k].view(torch.int16) != old_bf16[k].view(torch.int16)))
                  for k in new_bf16)
    return {"delta_format": delta_format, "file": path.name, "delta_bytes": path.stat().st_size,
            "raw_bytes": sum(t.numel() * t.element_size() for t in new_bf16.values()),
            "changed_elements": changed, "total_elements": sum(t.numel() for t in new_bf16.values())}


def read_delta(directory: Path, current: dict, delta_format: str, base_identity: str | None = None,
               out: dict | None = None) -> dict:
    """NEW dict: the delta in `directory` (in `delta_format`) applied to `current`, every checksum verified.

    `base_identity` is what `current` is (checked by workbench_v1, whose file records its base).
    `out`: bf16 tensors the caller no longer needs, which workbench_v1 (delta_codec.decode) and arc_v2
    (_Arc2Decoder) decode into instead of fresh memory; arc_v1 and arc_v3 go through the library's
    decoder, which allocates its own.
    Raises DeltaError (DeltaFormatError if the files are in another format); `current` is never modified.
    """
    directory = Path(directory)
    check_format(delta_format, "compression_format")
    wbd = directory / WORKBENCH_DELTA_FILE
    if delta_format == WORKBENCH_DELTA_FORMAT:
        from . import delta_codec

        try:
            blob = wbd.read_bytes()
        except FileNotFoundError as e:
            found = "no" if not list(directory.glob("*.safetensors")) else "a library-written"
            raise DeltaError(f"{directory}: {WORKBENCH_DELTA_FILE} is missing ({found} arc_* delta there)") from e
        except OSError as e:
            raise DeltaError(f"cannot read {wbd}: {e}") from e
        return delta_codec.decode(blob, current, base_identity, out=out)
    if wbd.is_file():
        raise DeltaFormatError(f"the delta is {WORKBENCH_DELTA_FORMAT!r}, not {delta_format!r}")
    try:
        files = library_delta_files(directory)
    except (OSError, ValueError) as e:
        raise DeltaError(f"{directory}: {e}") from e
    if not files:
        raise DeltaError(f"{directory}: the delta file ({LIBRARY_DELTA_FILE}) is missing")
    patches, checksums = _load_patches(files)
    found = _sniff_patches(patches)
    if found != delta_format:
        raise DeltaFormatError(f"the delta is {found!r}, not {delta_format!r}")
    if set(patches) != set(current):
        missing, extra = sorted(set(current) - set(patches)), sorted(set(patches) - set(current))
        raise DeltaError(f"delta tensors do not match the current weights (not in delta: {missing[:5]}, "
                         f"not in current weights: {extra[:5]})")
    from fireworks_delta_compression import delta_decompress

    result, arc2 = {}, _Arc2Decoder() if delta_format == "arc_v2" else None
    for key, patch in patches.items():
        old = current[key]
        if arc2 is not None and old.numel():
            result[key] = arc2.apply(key, patch, old, checksums[key], reusable(out, key, old.shape, avoid=old))
            continue
        if delta_format == "arc_v3":
            _check_arc3_patch(key, bytes(patch), old.numel())
        try:
            compressed = torch.frombuffer(patch, dtype=torch.uint8) if len(patch) else torch.empty(0, dtype=torch.uint8)
            result[key] = delta_decompress(src=old, compressed_diff=compressed, checksum=checksums[key],
                                           compression_format=delta_format)
        except Exception as e:   # the library raises ValueError/RuntimeError/zstd.Error/zlib.error/KeyError
            if "checksum mismatch" in str(e).lower():
                raise DeltaError(f"tensor {key}: checksum mismatch after applying the delta (corrupted delta, or the "
                                 f"current weights are not the snapshot it was made against): {e}") from e
            raise DeltaError(f"tensor {key}: corrupt {delta_format} patch ({type(e).__name__}: {e})") from e
        if result[key].data_ptr() == old.data_ptr():
            result[key] = result[key].clone()
        pace()
    return result


class _Arc2Decoder:
    """arc_v2 patches applied in bounded chunks: zstd-decompress a chunk of the XOR into a reused
    scratch buffer, XOR it onto the held bytes into the result, carry the adler32 along.

    Bit for bit what the library's `delta_decompress` computes (tests/test_delta_formats.py checks
    it on the same files), but the library's decoder allocates the whole decompressed XOR and the
    whole result per tensor (two fresh copies of every weight: their first touch costs more than the
    decode on this VM) and uses zlib's adler32 (~10x zlib-ng's). Here the result goes into `target`
    (a tensor the caller no longer needs) when given, and every step is one short C call that frees
    the GIL: a deployment's sampler threads keep running while it decodes."""

    CHUNK = 1 << 18          # bytes per step: stays in L2, few Python steps per tensor

    def __init__(self):
        import zstandard

        self.zstd = zstandard
        self.dctx = zstandard.ZstdDecompressor()
        self.scratch = None

    def apply(self, key: str, patch, old, expected: str, target=None):
        import numpy as np

        from .delta_codec import adler32

        nbytes = old.numel() * old.element_size()
        try:
            declared = self.zstd.frame_content_size(patch)
        except self.zstd.ZstdError as e:
            raise DeltaError(f"tensor {key}: corrupt arc_v2 patch (not a zstd frame: {e})") from e
        if declared not in (nbytes, -1):    # -1: a frame that does not declare its size (checked below)
            raise DeltaError(f"tensor {key}: corrupt arc_v2 patch (it holds {declared} bytes, the tensor {nbytes})")
        if self.scratch is None:
            self.scratch = np.empty(self.CHUNK, np.uint8)
        result = target if target is not None else torch.empty_like(old, memory_format=torch.contiguous_format)
        src = old.detach().contiguous().view(-1).view(torch.uint8).numpy()
        dst = result.view(-1).view(torch.uint8).numpy()
        reader = self.dctx.stream_reader(patch, read_across_frames=False)
        checksum = 1            # adler32's initial value
        try:
            for a in range(0, nbytes, self.CHUNK):
                c = min(self.CHUNK, nbytes - a)
                xor = self.scratch[:c]
                view, got = memoryview(xor), 0
                while got < c:
                    n = reader.readinto(view[got:])
                    if n == 0:
                        raise DeltaError(f"tensor {key}: corrupt arc_v2 patch (it ends after {a + got} of {nbytes} bytes)")
                    got += n
                np.bitwise_xor(src[a:a + c], xor, out=dst[a:a + c])
                checksum = adler32(dst[a:a + c], checksum)
                pace()
            if reader.read(1):
                raise DeltaError(f"tensor {key}: corrupt arc_v2 patch (longer than the tensor's {nbytes} bytes)")
        except self.zstd.ZstdError as e:
            raise DeltaError(f"tensor {key}: corrupt arc_v2 patch ({e})") from e
        if str(checksum) != expected:
            raise DeltaError(f"tensor {key}: checksum mismatch after applying the delta (corrupted delta, or the "
                             f"current weights are not the snapshot it was made against): {checksum} != {expected}")
        return result
