"""The bytes of the `workbench_v1` sampler delta format: bf16 weights encoded against the previous snapshot.

A delta turns the weights a deployment already holds (`old`, identified by its snapshot name) into
the trainer's new weights, bit for bit. This is workbench's own format, one of the four a trainer
job can write (formats.py; Fireworks' arc_v1/arc_v2/arc_v3 come from fireworks-delta-compression),
documented byte by byte in docs/delta-format.md together with the measurements that chose it
(`bench/delta_codec.py` compares it with the others).

    blob = encode(new_bf16, old_bf16, base_identity="step-1-1a2b3c4d")   # bytes
    new = decode(blob, old_bf16, base_identity="step-1-1a2b3c4d")        # NEW dict; old untouched
    new = decode(blob, old_bf16, "step-1-1a2b3c4d", out=spare_bf16)        # written into spare's tensors
    header = read_header(blob)                                            # identity, per-tensor records

How a tensor is encoded. Each element's change is the wrapping difference `new - old` of the bf16
bit patterns, zigzag-mapped to an unsigned 16-bit code (0 = unchanged, 1 = -1 ulp, 2 = +1 ulp, ...).
An optimizer step moves most weights by 0 or a few ulps, so codes are small. Per tensor, the
smallest of these layouts is kept (format version 2; zstd level 1):
  gaps      distance to each changed element (uint32 byte planes) + the changed codes: sparse changes;
  packed2g  2 bits per element (codes 0-3: 0, -1, +1, -2 ulp); larger codes are listed separately,
            with their positions as gaps (their field holds 0): a third of the elements change;
  packed4g  4 bits per element (codes 0-15), likewise: most elements change a few ulps;
  packed8g  a byte per element: the difference itself as a signed byte (XOR: its low byte), likewise
            for the rest: many elements change by tens of ulps;
  dense     all codes as byte planes (low bytes; high bytes only if any is non-zero): large changes;
  same      nothing changed, no data.
Version 1's packed2/packed4 (an all-ones field marked an escape, found by searching) are still read.
Each section is one zstd frame, or (version 2) its plain bytes when zstd would save under RAW_BELOW of
them: near-random planes (the low bytes of large changes) and sections of a few bytes.
Why the difference rather than XOR: a +1 ulp step XORs to 1, 3, 7, 15... depending on the carry
chain, information the decoder already has in `old`, while the difference is always 1 (8-19%
smaller on a real AdamW trajectory). `transform="xor"` is kept so the benchmark can show it.
Why packed codes rather than a changed-element bitmap + values: zstd's Huffman stage then codes 4
(or 2) elements per byte symbol, and decoding is one table lookup per byte (8% smaller, ~2x faster).

Why a hand-written container rather than safetensors: on the ~5M test model a sparse delta is
~80 KB, and a safetensors header listing every section was ~25 KB; here the header is zstd'd (~1.5 KB).

Decoding is single-threaded numpy/torch, streamed in chunks through reused scratch buffers, and
verifies each tensor's adler32 (the SDK's checksum_format name is "alder32") after reconstruction,
which also catches a wrong base, plus checksums of the header and the payload. It never modifies its
inputs; every failure raises DeltaError. Costs that dominated before they were cut (bench/delta_codec.py,
docs/delta-format.md "Decode and encode speed"):
  - zlib's adler32 runs at ~0.6 ns per element; zlib-ng's (SIMD, same checksum) at ~0.07, so it is
    used when the `zlib-ng` package is installed (plain zlib otherwise);
  - first touch of fresh memory: on this VM a page fault costs 12-100 us (3+ ns per byte, more than
    the whole decode), so a caller that decodes repeatedly passes `out=`, the tensors of a snapshot it
    no longer needs (a deployment recycles the one its last swap retired), and nothing is allocated.
    The per-tensor buffers (packed bytes, escaped codes, changed positions) are the calling thread's,
    kept between calls (_Scratch.for_this_thread) for the same reason;
  - finding escaped codes (version 1): numpy's nonzero costs ~1 ns per element even on its branch-free
    path (the mask is padded onto it, _escape_positions), the largest cost of a one-step 75M decode;
    version 2 lists their positions (packed*g: a cumulative sum over the listed codes only);
  - glibc's memmove (np.copyto) runs 5-8x slower here at some relative alignments: see _copy;
  - fixed costs per tensor (68 in the 5M model): numpy views of tensor memory without torch views
    (_memory_bits), gap positions in three passes, numpy's add.at where few elements changed.
Where the time goes now (perf, 75M model, one-step lr 1e-4, packed2g): the table lookup ~15% (and ~5
widening its indices), zstd ~16, adding the held weights ~10 (it reads them from memory), placing the
listed codes ~8, their positions ~5, adler32 ~4, the interpreter ~17; each one numpy pass near its
floor on this VM. Fewer passes would need a fused kernel (look up, add and checksum in one loop),
which numpy and torch do not offer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import struct
import threading

import zstandard

from workbench.common import LazyModule

try:  # zlib-ng's adler32 is the same function, SIMD-vectorised: ~8x zlib's on a long buffer
    from zlib_ng.zlib_ng import adler32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; plain zlib gives the same values
    from zlib import adler32

# numpy and torch are imported on first use: the control plane imports DeltaError without tensors.
np = LazyModule("numpy")
torch = LazyModule("torch")

MAGIC = b"WBDELTA\0"
FORMAT_VERSION = 2          # what encode writes
READ_VERSIONS = (1, 2)      # what decode reads (version 1: no raw sections, no packed2g/4g/8g)
TRANSFORMS = ("sub", "xor")
LAYOUTS = ("same", "dense", "packed2", "packed4", "gaps", "packed2g", "packed4g", "packed8g")
ZSTD_LEVEL = 1  # calibration: level 3 is never more than 2-3% smaller and encodes slower
# A section is stored raw when zstd would save less than this share of its bytes: decoding zstd costs
# ~1.1 ns per output byte on this VM, a raw section nothing (it is read in place).
RAW_BELOW = 0.10
# magic, version (u16), flags (u16), header length (u32), header adler32 (u32), payload length (u64),
# payload adler32 (u32); little-endian. The payload checksum makes any damaged byte an error, even one
# that would decode to the same weights (e.g. a packed byte's unused padding fields).
_PREAMBLE = struct.Struct("<8sHHIIQI")
# Gap indices are uint32: a tensor may hold at most 2**32 - 1 elements (8 GB of bf16 in one tensor).
_MAX_ELEMENTS = 2**32 - 1


class DeltaError(ValueError):
    """A delta that cannot be applied: wrong base, unknown version, corrupted, truncated or missing data."""


# --------------------------------------------------------------------------------------------------
# pacing: a hook between bounded slices of work

class _Pacing(threading.local):
    hook = None  # the class default: reading an unset hook never raises (getattr catching AttributeError: ~1 us a tensor)


_pacing = _Pacing()


@contextlib.contextmanager
def paced(hook):
    """Within this block, the calling thread's snapshot reads and delta decodes (here and in formats.py)
    call `hook()` after every bounded slice of work (a tensor, or 256 KiB of an arc_v2 patch). A
    deployment's hot-load thread uses it to hand the CPU to its engine between slices (weights.py)."""
    previous = _pacing.hook
    _pacing.hook = hook
    try:
        yield
    finally:
        _pacing.hook = previous


def pace() -> None:
    """The end of one slice of work: run the calling thread's `paced` hook, if any."""
    hook = _pacing.hook
    if hook is not None:
        hook()


# --------------------------------------------------------------------------------------------------
# bf16 <-> uint16 views (zero-copy) and the zigzag code

def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """The bit patterns of a CPU bf16 tensor as a flat uint16 numpy array (a view when contiguous)."""
    if t.dtype != torch.bfloat16:
        raise ValueError(f"expected a bfloat16 tensor, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"expected a CPU tensor, got one on {t.device}")
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)


class _Memory:
    """Exposes a memory range to numpy (the array interface protocol) without holding what owns it."""
    __slots__ = ("__array_interface__",)


def _memory_bits(t: torch.Tensor) -> np.ndarray:
    """The bit patterns of a contiguous CPU bf16 tensor as a flat uint16 array over its memory.

    Valid only while the caller holds `t` (decode holds every tensor it reads or writes until it
    returns). Why not bf16_bits: its t.view(int16).numpy() makes a torch view and ties it to the
    array, ~9 us per tensor on this VM against ~2 here, which was a tenth of a 5M model's decode."""
    n = t.numel()
    if n == 0:
        return np.empty(0, np.uint16)
    memory = _Memory()
    memory.__array_interface__ = {"data": (t.data_ptr(), False), "shape": (n,), "typestr": "<u2", "version": 3}
    return np.asarray(memory)


def bits_to_bf16(bits: np.ndarray, shape) -> torch.Tensor:
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).reshape(tuple(shape))


def _zigzag(diff: np.ndarray) -> np.ndarray:
    """Wrapping uint16 difference -> zigzag code: 0->0, -1->1, +1->2, -2->3, ..."""
    s = diff.view(np.int16)
    return ((s << 1) ^ (s >> 15)).view(np.uint16)


def _unzigzag_inplace(code: np.ndarray) -> np.ndarray:
    """Inverse of _zigzag on a writable uint16 array, in place (four cheap vector passes)."""
    sign = code & 1
    np.negative(sign, out=sign)  # 0 -> 0, 1 -> 0xFFFF
    code >>= 1
    code ^= sign
    return code


# --------------------------------------------------------------------------------------------------
# byte planes

def _byte_planes(values: np.ndarray) -> list[np.ndarray]:
    """Little-endian byte planes of an unsigned integer array (uncompressed).

    Plane i holds byte i of every value (grouping bytes of the same significance is what lets zstd's
    Huffman stage see their skewed distribution). Top planes that are all zero are not stored (the
    record keeps the plane count), the common case for the high byte of small codes.
    """
    top = int(values.max()) if values.size else 0
    n_planes = max(1, (top.bit_length() + 7) // 8)
    if n_planes == 1:
        return [values.astype(np.uint8)]
    as_bytes = values.astype(values.dtype.newbyteorder("<"), copy=False).view(np.uint8)
    as_bytes = as_bytes.reshape(-1, values.dtype.itemsize)
    return [np.ascontiguousarray(as_bytes[:, i]) for i in range(n_planes)]


def _store(data: np.ndarray, cctx: zstandard.ZstdCompressor, raw_below: float) -> tuple[bytes, bool]:
    """(a section's bytes, whether they are stored raw): zstd, unless it saves under `raw_below` of the size.

    A plane zstd barely shrinks (near-random bytes) costs its whole zstd decode (~1.1 ns per byte on this
    VM) to save a few bytes; stored raw it is read in place, no copy."""
    compressed = cctx.compress(data)
    if len(compressed) > (1.0 - raw_below) * data.nbytes:
        return data.tobytes(), True
    return compressed, False


class _FrameReader:
    """Sequential reads from one zstd frame into caller-owned buffers (no per-call allocation).

    The frame's declared size is checked up front: it rejects a mismatched section cheaply and never
    lets damaged bytes ask for an enormous allocation.
    """

    def __init__(self, frame, size: int, dctx: zstandard.ZstdDecompressor, what: str):
        self.what, self.remaining = what, size
        try:
            declared = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as e:
            raise DeltaError(f"{what}: not a zstd frame ({e})") from e
        if declared != size:
            raise DeltaError(f"{what}: frame declares {declared} bytes, expected {size}")
        self._reader = dctx.stream_reader(frame, read_across_frames=False)

    def read_into(self, out: np.ndarray) -> np.ndarray:
        """Fill the contiguous uint8 array `out` with the next len(out) bytes; returns it."""
        if out.size > self.remaining:
            raise DeltaError(f"{self.what}: needs more than the {self.remaining} bytes left in its section")
        view, got = memoryview(out), 0
        while got < out.size:
            try:
                n = self._reader.readinto(view[got:])
            except zstandard.ZstdError as e:
                raise DeltaError(f"{self.what}: corrupted zstd data ({e})") from e
            if n == 0:
                raise DeltaError(f"{self.what}: section ends early")
            got += n
        self.remaining -= got
        return out

    def take(self, n: int, buffer: np.ndarray) -> np.ndarray:
        """The next n bytes as a uint8 array: decompressed into buffer[:n]."""
        return self.read_into(buffer[:n])


class _RawReader:
    """Sequential reads from a section stored raw (version 2), with _FrameReader's methods."""

    def __init__(self, section, size: int, what: str):
        if len(section) != size:
            raise DeltaError(f"{what}: raw section of {len(section)} bytes, expected {size}")
        self.what, self._bytes, self._at = what, np.frombuffer(section, np.uint8), 0

    def take(self, n: int, buffer=None) -> np.ndarray:
        """The next n bytes as a uint8 array: a read-only view of the file's bytes, nothing copied."""
        if n > self._bytes.size - self._at:
            raise DeltaError(f"{self.what}: needs more than the {self._bytes.size - self._at} bytes left in its section")
        self._at += n
        return self._bytes[self._at - n:self._at]

    def read_into(self, out: np.ndarray) -> np.ndarray:
        np.copyto(out, self.take(out.size))
        return out


def _open(section, size: int, raw: bool, dctx, what: str):
    """A reader of one section that holds `size` bytes: raw (version 2) or one zstd frame."""
    return _RawReader(section, size, what) if raw else _FrameReader(section, size, dctx, what)


class _PlaneReader:
    """Reads unsigned integers stored as little-endian byte planes (see _byte_planes), each a zstd frame
    or raw.

    Planes are read in lockstep, so each needs its own decompressor from `dctxs` (a zstd stream
    reader decompresses with its decompressor's context: two open readers on one would clash).
    """

    def __init__(self, frames: list, raw: list, count: int, dctxs: list, what: str):
        if len(frames) > len(dctxs):
            raise DeltaError(f"{what}: {len(frames)} byte planes, at most {len(dctxs)} expected")
        self._planes = [_open(f, count, r, d, f"{what} byte plane {i}")
                        for i, (f, r, d) in enumerate(zip(frames, raw, dctxs))]

    def read(self, out: np.ndarray, scratch: "_Scratch") -> np.ndarray:
        """Fill `out` (unsigned integers) with the next len(out) values; returns it. Planes are staged
        through `scratch`'s reused buffers (no per-call allocation)."""
        staging = scratch.grown("staging", out.size, np.uint8)
        for i, plane in enumerate(self._planes):
            data = plane.take(out.size, staging)
            if i == 0:
                np.copyto(out, data)
            else:
                wide = scratch.grown(out.dtype.char, out.size, out.dtype)  # keyed by type code (its str() is slow)
                np.left_shift(data, 8 * i, out=wide, dtype=out.dtype)
                out |= wide
        if not self._planes:
            out[:] = 0
        return out


# --------------------------------------------------------------------------------------------------
# packed codes: b bits per element; larger codes are listed separately

# packed2g/packed4g/packed8g (version 2, written): a field holds codes 0 .. 2**b - 1 (packed8g with
# "sub": the difference itself, a signed byte); larger codes are listed with their positions (as gaps)
# and their field holds 0. packed2/packed4 (version 1, read only): the
# field's all-ones value marks an escape, and escaped codes are listed in element order.
PACKED_BITS = {"packed2": 2, "packed4": 4, "packed2g": 2, "packed4g": 4, "packed8g": 8}
_ESCAPE_MARK = 0x8000  # what a version-1 lookup table yields for an escape field (overwritten once the escape is read)


def _pack(fields: np.ndarray, bits: int) -> np.ndarray:
    """Packed bytes of `fields` (uint8, each < 2**bits): element i sits in bits (i % per) * b of byte i // per."""
    per = 8 // bits
    if per == 1:
        return fields
    padded = np.zeros(-(-fields.size // per) * per, np.uint8)
    padded[:fields.size] = fields
    # Gather the `per` fields of each byte with whole-word shifts (field j sits at bit 8j of a
    # little-endian word) instead of strided column reads.
    words = padded.view(np.uint32 if per == 4 else np.uint16).astype(np.uint32)
    packed = words.copy()
    for j in range(1, per):
        packed |= words >> (j * (8 - bits))
    return packed.astype(np.uint8)


@functools.cache   # built on first decode, not at import: the control plane imports this module without numpy
def _lookup_table(bits: int, transform: str, escapes_in_fields: bool) -> np.ndarray:
    """byte -> its `8 // bits` decoded uint16 values (difference or XOR), as one numpy item per byte.

    One fancy-index take of this table expands packed bytes to values in a single pass; items are
    8 (packed2) or 4 (packed4) bytes wide, so the take moves whole words. `escapes_in_fields`: the
    version-1 layouts, whose all-ones field yields _ESCAPE_MARK.
    """
    per, top = 8 // bits, 1 << bits
    short = np.arange(top - 1 if escapes_in_fields else top, dtype=np.uint16)
    values = _unzigzag_inplace(short) if transform == "sub" else short
    if escapes_in_fields:
        values = np.append(values, np.uint16(_ESCAPE_MARK))
    byte = np.arange(256)
    table = np.stack([values[(byte >> (bits * j)) & (top - 1)] for j in range(per)], axis=1).astype(np.uint16)
    return np.ascontiguousarray(table).view(np.uint64 if per == 4 else np.uint32).reshape(256)


# --------------------------------------------------------------------------------------------------
# encode

def _gap_planes(positions: np.ndarray) -> list[np.ndarray]:
    """Byte planes of the uint32 gaps between increasing positions (g_j = i_j - i_(j-1) - 1, i_(-1) = -1)."""
    gaps = np.diff(positions, prepend=-1)
    gaps -= 1  # zero-based: adjacent positions have gap 0
    return _byte_planes(gaps.astype(np.uint32))


def _candidates(codes: np.ndarray, k: int, transform: str):
    """(layout, record fields, uncompressed sections in layout order) for the layouts worth trying.

    All of these are stored and the smallest is kept; cheap counts only skip layouts that lose by
    construction on every trajectory measured (bench/delta_codec.py): gaps when a quarter or more
    changed, packed when a quarter of its fields would overflow (or under 10% changed: gaps wins),
    packed8g and dense while under 1 in 16 codes overflow packed4's fields, and dense also when every
    code fits a byte (packed8g then holds the same bytes and decodes faster).
    """
    n = codes.size
    big = {bits: codes >= (1 << bits) for bits in (2, 4)}
    escapes = {bits: int(np.count_nonzero(mask)) for bits, mask in big.items()}
    if escapes[4] > n // 16:
        big[8] = codes >= 256
        escapes[8] = int(np.count_nonzero(big[8]))
        if escapes[8]:  # (every code under 256: packed8g holds the same bytes, and decodes faster)
            dense = _byte_planes(codes)
            yield "dense", {"value_planes": len(dense)}, dense
    for layout, bits in (("packed2g", 2), ("packed4g", 4), ("packed8g", 8)):
        if bits not in escapes or escapes[bits] > n // 4 or k < n // 10:
            continue
        fields = codes.astype(np.uint8)  # only the fields that hold their code are kept below
        if bits == 8 and transform == "sub":
            _unzigzag_inplace(fields)  # packed8g holds the difference itself (a signed byte): no zigzag to undo
        if escapes[bits]:
            at = np.flatnonzero(big[bits])
            fields[at] = 0
            gaps = _gap_planes(at)
            values = _byte_planes(codes[at] - (1 << bits))
            yield layout, {"escapes": escapes[bits], "gap_planes": len(gaps), "value_planes": len(values)}, \
                [_pack(fields, bits), *gaps, *values]
        else:
            yield layout, {"escapes": 0, "gap_planes": 0, "value_planes": 0}, [_pack(fields, bits)]
    if k <= n // 4:
        changed = np.flatnonzero(codes != 0)  # on bool: numpy's fast path
        values = _byte_planes(codes[changed])
        gaps = _gap_planes(changed)
        yield "gaps", {"value_planes": len(values), "gap_planes": len(gaps)}, [*gaps, *values]


def _encode_tensor(new: np.ndarray, old: np.ndarray, transform: str, cctx, raw_below: float) -> tuple[dict, list[bytes]]:
    """One tensor -> (record fields, its sections in layout order); the smallest layout wins."""
    record = {"adler32": adler32(new)}
    codes = _zigzag(new - old) if transform == "sub" else new ^ old  # uint16 arithmetic wraps
    k = int(np.count_nonzero(codes))
    record["changed"] = k
    if k == 0:
        record["layout"] = "same"
        return record, []
    best = None
    for layout, fields, planes in _candidates(codes, k, transform):
        stored = [_store(plane, cctx, raw_below) for plane in planes]
        size = sum(len(data) for data, _ in stored)
        if best is None or size < best[0]:  # ties keep the first, in the order _candidates yields them
            best = size, layout, fields, stored
    _, layout, fields, stored = best
    record["layout"] = layout
    record.update(fields)
    raw = [i for i, (_, is_raw) in enumerate(stored) if is_raw]
    if raw:
        record["raw"] = raw
    return record, [data for data, _ in stored]


def encode(new_bf16: dict, old_bf16: dict, base_identity: str, *, transform: str = "sub",
           level: int = ZSTD_LEVEL, raw_below: float = RAW_BELOW) -> bytes:
    """Encode `new_bf16` as a delta over `old_bf16` (the snapshot named `base_identity`); return the file bytes.

    Both dicts must hold the same tensor names with equal shapes, all bf16 on CPU. A section is stored
    raw when zstd saves under `raw_below` of its size (0: only when zstd does not shrink it at all).
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    if not isinstance(base_identity, str) or not base_identity:
        raise ValueError("base_identity is required (the name of the snapshot the delta applies to)")
    if set(new_bf16) != set(old_bf16):
        only_old, only_new = sorted(set(old_bf16) - set(new_bf16)), sorted(set(new_bf16) - set(old_bf16))
        raise ValueError(f"new and old weights differ in tensor names (only in old: {only_old[:5]}, "
                         f"only in new: {only_new[:5]})")
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    records, payload = [], []
    for name, new_t in new_bf16.items():
        old_t = old_bf16[name]
        if tuple(new_t.shape) != tuple(old_t.shape):
            raise ValueError(f"tensor {name}: shape {tuple(new_t.shape)} differs from base {tuple(old_t.shape)}")
        if new_t.numel() > _MAX_ELEMENTS:
            raise ValueError(f"tensor {name}: {new_t.numel()} elements, more than the format's 2**32 - 1")
        fields, sections = _encode_tensor(bf16_bits(new_t), bf16_bits(old_t), transform, cctx, raw_below)
        records.append({"name": name, "shape": list(new_t.shape), **fields,
                        "sections": [len(s) for s in sections]})
        payload.extend(sections)
    header = json.dumps({"base_identity": base_identity, "transform": transform, "checksum": "adler32",
                         "tensors": records}, separators=(",", ":")).encode()
    header = cctx.compress(header)
    payload_sum = 1  # adler32's initial value
    for section in payload:
        payload_sum = adler32(section, payload_sum)
    preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(header), adler32(header),
                              sum(len(s) for s in payload), payload_sum)
    return b"".join([preamble, header, *payload])


# --------------------------------------------------------------------------------------------------
# decode

def read_header(blob) -> dict:
    """The delta's header: format_version, base_identity, transform, checksum, tensors (records), payload_offset.

    Validates the preamble, the version, the length and both checksums; raises DeltaError if unusable.
    """
    view = memoryview(blob)
    if len(view) < _PREAMBLE.size:
        raise DeltaError(f"delta is truncated: {len(view)} bytes, shorter than its {_PREAMBLE.size}-byte preamble")
    magic, version, flags, header_len, header_sum, payload_len, payload_sum = _PREAMBLE.unpack(view[:_PREAMBLE.size])
    if magic != MAGIC:
        raise DeltaError(f"not a workbench delta (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version not in READ_VERSIONS:
        raise DeltaError(f"unknown delta format version {version}; this workbench reads versions "
                         f"{', '.join(map(str, READ_VERSIONS))} (a newer workbench wrote it: upgrade this one)")
    if flags != 0:  # reserved: a writer that sets them expects a reader that understands them
        raise DeltaError(f"unknown delta flags {flags:#06x} (version {version} defines none)")
    start = _PREAMBLE.size
    payload_offset = start + header_len
    if payload_offset + payload_len != len(view):
        what = "truncated" if payload_offset + payload_len > len(view) else "longer than its header says"
        raise DeltaError(f"delta is {what}: {len(view)} bytes, its preamble accounts for {payload_offset + payload_len}")
    if adler32(view[payload_offset:]) != payload_sum:
        raise DeltaError("delta data is corrupted (payload checksum mismatch)")
    packed = view[start:payload_offset]
    if adler32(packed) != header_sum:
        raise DeltaError("delta header is corrupted (checksum mismatch)")
    try:
        header = json.loads(zstandard.ZstdDecompressor().decompress(packed))
        records = header["tensors"]
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise TypeError("tensors is not a list of records")
        sections_len = sum(int(n) for r in records for n in r["sections"])
    except (zstandard.ZstdError, ValueError, KeyError, TypeError) as e:
        raise DeltaError(f"delta header is corrupted ({type(e).__name__}: {e})") from e
    if header.get("transform") not in TRANSFORMS or header.get("checksum") != "adler32":
        raise DeltaError(f"unsupported delta encoding: transform={header.get('transform')!r} "
                         f"checksum={header.get('checksum')!r}")
    if sections_len != payload_len:
        raise DeltaError(f"delta header is corrupted: sections total {sections_len} bytes, payload is {payload_len}")
    header["format_version"] = version
    header["payload_offset"] = payload_offset
    return header


# Elements decoded per step. Temporaries live in scratch buffers of this size, reused for every
# tensor: they stay in the CPU cache, and big fresh allocations are avoided (on this VM a page
# fault costs more than decoding the page). Memory use stays bounded for any tensor size.
_CHUNK = 1 << 17
# Under this many changed elements numpy's add.at scatters faster than torch's index_add_, whose fixed
# cost (three tensor wrappers and a dispatch) dominates: 2 vs 5 us at 500 changed, 21 vs 33 at 8000.
_SMALL_SCATTER = 1 << 14


class _Scratch:
    """Buffers reused by every tensor of one decode call, and a decompressor per concurrently open section.

    Chunk-sized ones are made up front; per-tensor ones (a tensor's packed bytes, escaped codes, changed
    positions) grow to the largest tensor seen and are reused, never freed and reallocated per tensor."""

    _local = threading.local()
    KEEP_BYTES = 64 << 20      # per-tensor buffers kept between calls, at most (a bigger tensor's are dropped)

    @classmethod
    def for_this_thread(cls) -> "_Scratch":
        """This thread's buffers, kept between decode calls: a deployment decodes every delta in one
        thread, and fresh buffers would cost their page faults again on every call."""
        scratch = getattr(cls._local, "scratch", None)
        if scratch is None:
            scratch = cls._local.scratch = cls(_CHUNK + 8)
        elif sum(b.nbytes for b in scratch._grown.values()) > cls.KEEP_BYTES:
            scratch._grown.clear()
        return scratch

    def __init__(self, size: int):
        self.dctx = [zstandard.ZstdDecompressor() for _ in range(4)]
        self.u8 = np.empty(size, np.uint8)
        self.u16 = np.empty(size, np.uint16)
        self.mask = np.empty(size + size // 8 + 1, np.bool_)  # + the padding _escape_positions adds
        self.index = np.empty(size // 2, np.intp)  # packed4 looks up half as many bytes as elements
        self._grown: dict = {}

    def arange(self, n: int) -> np.ndarray:
        """0, 1, ..., n - 1 as int64 (reused: filled again only when a larger one is needed)."""
        buf = self._grown.get("arange")
        if buf is None or buf.size < n:
            buf = self._grown["arange"] = np.arange(max(n, 2 * buf.size if buf is not None else 0), dtype=np.int64)
        return buf[:n]

    def grown(self, what: str, n: int, dtype) -> np.ndarray:
        """A reused array of at least n items of `dtype`, the first n of which are returned."""
        buf = self._grown.get(what)
        if buf is None or buf.size < n:
            buf = self._grown[what] = np.empty(max(n, 2 * buf.size if buf is not None else 0), dtype)
        return buf[:n]


def _copy(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[:] = src for equal-length uint16 arrays, through a ufunc loop rather than np.copyto.

    np.copyto ends in glibc's memmove, which on this VM runs 5-8x slower (~2 GB/s) for copies of a few
    hundred KB whose source and destination sit a few bytes apart modulo 4 KiB: a 768x256 tensor
    took 190 us instead of 25 (np.positive, an identity on unsigned integers, is a plain SIMD loop)."""
    np.positive(src, out=dst)


def _finish_chunk(values: np.ndarray, old: np.ndarray, transform: str, checksum: int) -> int:
    """values <- old (+|^) values in place (uint16 addition wraps like the encoder's subtraction); running adler32."""
    if transform == "sub":
        np.add(values, old, out=values)
    else:
        np.bitwise_xor(values, old, out=values)
    return adler32(values, checksum)


def _unzigzag_chunk(code: np.ndarray, sign: np.ndarray) -> None:
    np.bitwise_and(code, 1, out=sign)
    np.negative(sign, out=sign)
    code >>= 1
    code ^= sign


def _decode_dense(out, old, sections, raw, n, transform, s: _Scratch, name) -> int:
    planes = [_open(f, n, r, d, f"tensor {name} byte plane {i}") for i, (f, r, d) in enumerate(zip(sections, raw, s.dctx))]
    checksum = 1
    for a in range(0, n, _CHUNK):
        c = min(_CHUNK, n - a)
        values = out[a:a + c]
        np.copyto(values, planes[0].take(c, s.u8))
        if len(planes) == 2:
            high = s.u16[:c]
            np.copyto(high, planes[1].take(c, s.u8))
            high <<= 8
            values |= high
        if transform == "sub":
            _unzigzag_chunk(values, s.u16[:c])
        checksum = _finish_chunk(values, old[a:a + c], transform, checksum)
    return checksum


def _escape_positions(values: np.ndarray, mask: np.ndarray, dense: bool) -> np.ndarray:
    """Positions of the escape marks in `values` (`mask`: a scratch bool buffer with room for c + c // 8 + 1).

    numpy's nonzero takes a branch-free path only when more than a tenth of the mask is set; under
    that it jumps from one set element to the next (memchr), which costs ~1.7 ns per element at the
    5-10% escape rates of a one-step packed2 delta (mispredicted branches) against ~0.8 branch-free.
    When escapes are that common (`dense`), set elements are appended past the end to lift the share
    over a tenth, and their positions (all >= len(values), so last) are dropped from the result."""
    c = values.size
    pad = c // 8 + 1 if dense else 0
    np.equal(values, _ESCAPE_MARK, out=mask[:c])
    mask[c:c + pad] = True
    at = np.flatnonzero(mask[:c + pad])
    return at[:at.size - pad]


def _take_packed(values: np.ndarray, packed: np.ndarray, first: int, per: int, table: np.ndarray, s: _Scratch) -> None:
    """values <- the decoded fields of packed[first:], len(values) of them: one table lookup per byte."""
    c = values.size
    whole = c // per  # only the tensor's last byte can hold fewer than `per` values
    index = s.index[:-(-c // per)]
    np.copyto(index, packed[first:first + index.size])  # take is ~3x faster with intp indices
    table.take(index[:whole], out=values[:whole * per].view(table.dtype), mode="wrap")  # (np.take's wrapper: +1 us)
    if whole < index.size:
        values[whole * per:] = table[index[whole]:index[whole] + 1].view(np.uint16)[:c - whole * per]


def _decode_packed(out, old, sections, raw, n, bits, escapes, transform, s: _Scratch, name) -> int:
    """Version 1's packed2/packed4: escapes marked in the fields, found by searching each chunk."""
    per = 8 // bits
    table = _lookup_table(bits, transform, True)
    # The packed bytes (n/4 or n/2) and the escaped codes are small: read each in one go.
    nbytes = -(-n // per)
    packed = _open(sections[0], nbytes, raw[0], s.dctx[0], f"tensor {name} packed codes").take(
        nbytes, s.grown("packed", nbytes, np.uint8))
    if escapes:
        escaped = _PlaneReader(sections[1:], raw[1:], escapes, s.dctx[1:], f"tensor {name} escaped codes").read(
            s.grown("escaped", escapes, np.uint16), s)
        escaped += (1 << bits) - 1
        if transform == "sub":
            _unzigzag_inplace(escaped)
    checksum, seen = 1, 0
    dense_escapes = n // 32 <= escapes < n // 8  # over ~1/8, chunks pass a tenth unpadded (_escape_positions)
    for a in range(0, n, _CHUNK):
        c = min(_CHUNK, n - a)
        values = out[a:a + c]
        _take_packed(values, packed, a // per, per, table, s)
        if escapes:
            at = _escape_positions(values, s.mask, dense_escapes)
            if seen + at.size > escapes:
                raise DeltaError(f"tensor {name}: more escaped codes than the {escapes} the header lists")
            values[at] = escaped[seen:seen + at.size]
            seen += at.size
        checksum = _finish_chunk(values, old[a:a + c], transform, checksum)
    if seen != escapes:
        raise DeltaError(f"tensor {name}: {seen} escaped codes, header says {escapes}")
    return checksum


def _gap_positions(sections, raw, k: int, n: int, s: _Scratch, what: str) -> np.ndarray:
    """The k increasing positions (int64, < n) stored as gaps in these byte planes."""
    # position_j = sum of (gap_i + 1) for i <= j, minus 1 = (cumulative sum of the gaps)_j + j. The sum
    # runs in int64 on a widened copy, in place (numpy's cumsum casting uint8/uint32 on the fly is
    # slower, and its Python wrapper alone costs more than the add on a small tensor).
    index = s.grown("index", k, np.int64)
    if len(sections) == 1:  # every gap under 256 (the usual case): widen the one byte plane directly
        np.copyto(index, _open(sections[0], k, raw[0], s.dctx[0], f"{what} gaps").take(k, s.grown("staging", k, np.uint8)))
    else:
        np.copyto(index, _PlaneReader(sections, raw, k, s.dctx, f"{what} gaps").read(s.grown("gaps", k, np.uint32), s))
    np.add.accumulate(index, out=index)
    index += s.arange(k)
    if index[-1] >= n:  # gaps are >= 0, so positions increase and the last is the largest
        raise DeltaError(f"{what}: positions run past the tensor's {n} elements")
    return index


def _decode_packed_gaps(out, old, sections, raw, n, bits, escapes, gap_planes, transform, s: _Scratch, name) -> int:
    """Version 2's packed2g/packed4g/packed8g: codes that do not fit a field are listed with their positions.

    No search: the positions come from the gaps (a cumulative sum over the listed codes only), where
    version 1 found its escape marks with numpy's nonzero over every element (~1 ns each, the largest
    cost of a one-step 75M decode)."""
    per = 8 // bits
    table = _lookup_table(bits, transform, False) if per > 1 else None
    nbytes = -(-n // per)
    what = f"tensor {name}"
    packed = _open(sections[0], nbytes, raw[0], s.dctx[0], f"{what} packed codes").take(
        nbytes, s.grown("packed", nbytes, np.uint8))
    if escapes:
        at = _gap_positions(sections[1:1 + gap_planes], raw[1:1 + gap_planes], escapes, n, s, f"{what} listed codes'")
        escaped = _PlaneReader(sections[1 + gap_planes:], raw[1 + gap_planes:], escapes, s.dctx, f"{what} listed codes").read(
            s.grown("escaped", escapes, np.uint16), s)
        escaped += 1 << bits
        if transform == "sub":
            _unzigzag_inplace(escaped)
        # where each chunk's listed codes start and end (positions increase)
        bounds = np.searchsorted(at, np.arange(0, n + _CHUNK, _CHUNK)).tolist() if n > _CHUNK else (0, escapes)
    checksum = 1
    for i, a in enumerate(range(0, n, _CHUNK)):
        c = min(_CHUNK, n - a)
        values = out[a:a + c]
        if per > 1:
            _take_packed(values, packed, a // per, per, table, s)
        elif transform == "sub":  # a byte per element, the difference itself: sign-extend it
            np.copyto(values.view(np.int16), packed[a:a + c].view(np.int8))
        else:
            np.copyto(values, packed[a:a + c])
        if escapes:
            lo, hi = bounds[i], bounds[i + 1]
            out[at[lo:hi]] = escaped[lo:hi]  # fields of listed codes hold 0: overwritten here
        checksum = _finish_chunk(values, old[a:a + c], transform, checksum)
    return checksum


def _decode_gaps(out, old, sections, raw, n, k, gap_planes, transform, s: _Scratch, name) -> int:
    index = _gap_positions(sections[:gap_planes], raw[:gap_planes], k, n, s, f"tensor {name} changed-element")
    values = s.grown("values", k, np.uint16)
    planes, planes_raw = sections[gap_planes:], raw[gap_planes:]
    if len(planes) == 1 and transform == "sub":
        # one byte plane (every code < 256): undo the zigzag on the bytes, then widen with sign extension
        # (int8 -> int16), half the bytes of doing it on uint16
        code = _open(planes[0], k, planes_raw[0], s.dctx[0], f"tensor {name} values byte plane 0").read_into(
            s.grown("staging", k, np.uint8))
        sign = np.bitwise_and(code, 1, out=s.grown("sign", k, np.uint8))
        np.negative(sign, out=sign)
        code >>= 1
        code ^= sign
        np.copyto(values.view(np.int16), code.view(np.int8))
    else:
        _PlaneReader(planes, planes_raw, k, s.dctx, f"tensor {name} values").read(values, s)
        if transform == "sub":
            _unzigzag_chunk(values, s.grown("sign16", k, np.uint16))
    _copy(out, old)
    if transform == "sub" and k < _SMALL_SCATTER:
        np.add.at(out.view(np.int16), index, values.view(np.int16))
    elif transform == "sub":
        # torch's index_add_ gathers, adds and scatters in one pass (~2x numpy's fancy indexing);
        # int16 addition wraps exactly like the encoder's uint16 subtraction. (Per 64K-element chunk,
        # to meet each chunk in cache, was slower: ~40 us of fixed cost per index_add_ call.)
        torch.from_numpy(out.view(np.int16)).index_add_(0, torch.from_numpy(index), torch.from_numpy(values.view(np.int16)))
    else:
        out[index] ^= values
    return adler32(out)


def _decode_tensor(rec: dict, old: np.ndarray, out: np.ndarray, sections: list, transform: str, scratch: _Scratch) -> int:
    """Write the new bits of one record into `out`; return their adler32. `sections`: its frames in layout order."""
    name, layout = rec["name"], rec["layout"]
    n = old.size
    if layout not in LAYOUTS:
        raise DeltaError(f"tensor {name}: unknown layout {layout!r}")
    if layout == "same":
        if sections:
            raise DeltaError(f"tensor {name}: unchanged tensor with {len(sections)} data sections")
        _copy(out, old)
        return adler32(out)
    k = int(rec["changed"])
    value_planes = int(rec["value_planes"])
    escapes = int(rec.get("escapes", 0))
    gap_planes = int(rec.get("gap_planes", 0))
    listed = layout in ("packed2g", "packed4g", "packed8g")
    expected_sections = {"dense": value_planes, "gaps": gap_planes + value_planes}.get(
        layout, 1 + gap_planes + value_planes if listed else 1 + value_planes)
    raw_at = rec.get("raw", [])
    if not isinstance(raw_at, list) or not all(type(i) is int for i in raw_at) or len(set(raw_at)) != len(raw_at):
        raise DeltaError(f"tensor {name}: inconsistent record (raw={raw_at!r} is not a list of distinct section indices)")
    if (not 0 < k <= n or not 0 <= escapes <= k or value_planes not in ((0, 1, 2) if escapes == 0 else (1, 2))
            or not 0 <= gap_planes <= 4 or (listed and (gap_planes == 0) != (escapes == 0))
            or len(sections) != expected_sections or not all(0 <= i < len(sections) for i in raw_at)):
        raise DeltaError(f"tensor {name}: inconsistent record (changed={k} of {n}, escapes={escapes}, value_planes="
                         f"{value_planes}, gap_planes={gap_planes}, raw={raw_at}, {len(sections)} sections)")
    raw = [False] * len(sections)
    for i in raw_at:
        raw[i] = True
    if layout == "dense":
        return _decode_dense(out, old, sections, raw, n, transform, scratch, name)
    if listed:
        return _decode_packed_gaps(out, old, sections, raw, n, PACKED_BITS[layout], escapes, gap_planes, transform,
                                   scratch, name)
    if layout in PACKED_BITS:
        return _decode_packed(out, old, sections, raw, n, PACKED_BITS[layout], escapes, transform, scratch, name)
    return _decode_gaps(out, old, sections, raw, n, k, gap_planes, transform, scratch, name)


def decode(blob, old_bf16: dict, base_identity: str, out: dict | None = None) -> dict:
    """Apply the delta `blob` to `old_bf16` (the snapshot named `base_identity`); return a NEW bf16 dict.

    `out`: optional bf16 tensors to write the result into (a snapshot the caller no longer needs);
    each one of the same name and shape, contiguous on the CPU and not sharing memory with `old_bf16`,
    is overwritten and returned in place of a fresh tensor (others are ignored). After a failure its
    contents are undefined. Raises DeltaError if the delta was made against another snapshot, has an
    unknown version, is truncated or corrupted, or a reconstructed tensor fails its checksum.
    `old_bf16` is never modified.
    """
    header = read_header(blob)
    if header.get("base_identity") != base_identity:
        raise DeltaError(f"delta applies to snapshot {header.get('base_identity')!r}, but the current weights "
                         f"are {base_identity!r}: load that snapshot (or a full base) first")
    records = header["tensors"]
    names = [rec.get("name") for rec in records]
    if len(set(names)) != len(names) or set(names) != set(old_bf16):
        missing, extra = sorted(set(old_bf16) - set(names)), sorted(set(map(str, names)) - set(old_bf16))
        raise DeltaError(f"delta tensors do not match the current weights (not in delta: {missing[:5]}, "
                         f"not in current weights: {extra[:5]})")
    view = memoryview(blob)
    offset = header["payload_offset"]
    transform = header["transform"]
    scratch = _Scratch.for_this_thread()
    result = {}
    for rec in records:
        name = rec["name"]
        old_t = old_bf16[name]
        try:
            sections = []
            for length in rec["sections"]:
                end = offset + int(length)
                sections.append(view[offset:end])
                offset = end
            shape = tuple(map(int, rec["shape"]))
            if shape != old_t.shape:
                raise DeltaError(f"tensor {name}: delta shape {shape} differs from current {tuple(old_t.shape)}")
            if old_t.dtype != torch.bfloat16 or not old_t.is_cpu:
                bf16_bits(old_t)  # raises the ValueError that says what is wrong
            if not old_t.is_contiguous():
                old_t = old_t.contiguous()  # held until the next tensor: `old` below views its memory
            target = reusable(out, name, shape, avoid=old_t) if out else None
            new = _memory_bits(target) if target is not None else np.empty(old_t.numel(), np.uint16)
            checksum = _decode_tensor(rec, _memory_bits(old_t), new, sections, transform, scratch)
            expected = int(rec["adler32"])
        except DeltaError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise DeltaError(f"tensor {name}: bad record ({type(e).__name__}: {e})") from e
        if checksum != expected:
            raise DeltaError(f"tensor {name}: checksum mismatch after applying the delta (corrupted delta, "
                             f"or the current weights are not really {base_identity!r})")
        result[name] = target if target is not None else bits_to_bf16(new, shape)
        pace()
    return result


def reusable(out: dict | None, name: str, shape, avoid=None):
    """out[name] if a result of this name and shape may be written into it (see decode's `out`), else
    None: bf16, contiguous, on the CPU, non-empty, and not sharing memory with `avoid` (what it is
    decoded from)."""
    t = out.get(name) if out else None
    if (t is None or t.dtype != torch.bfloat16 or not t.is_cpu or not t.is_contiguous()
            or t.shape != (shape if type(shape) is tuple else tuple(int(d) for d in shape))):
        return None
    n = t.numel()
    if n == 0:
        return None
    if avoid is not None:
        start, a_start = t.data_ptr(), avoid.data_ptr()
        if start < a_start + avoid.numel() * avoid.element_size() and a_start < start + 2 * n:
            return None
    return t
