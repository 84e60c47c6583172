"""The bytes of a workbench sampler delta: bf16 weights encoded against the previous snapshot.

A delta turns the weights a deployment already holds (`old`, identified by its snapshot name) into
the trainer's new weights, bit for bit. The SDK calls this format "arc_v2" on the wire; Fireworks'
own arc_v2 layout is not public, so this is workbench's format, versioned and documented byte by
byte in docs/delta-format.md together with the measurements that chose it (`bench/delta_codec.py`
repeats them).

    blob = encode(new_bf16, old_bf16, base_identity="step-1-1a2b3c4d")   # bytes
    new = decode(blob, old_bf16, base_identity="step-1-1a2b3c4d")        # NEW dict; old untouched
    header = read_header(blob)                                            # identity, per-tensor records

How a tensor is encoded. Each element's change is the wrapping difference `new - old` of the bf16
bit patterns, zigzag-mapped to an unsigned 16-bit code (0 = unchanged, 1 = -1 ulp, 2 = +1 ulp, ...).
Training moves most weights by 0 or a few ulps, so codes are small and their high byte is usually
zero. The codes are stored in whichever of three layouts is smallest for that tensor:
  dense   all n codes as byte planes (low bytes; high bytes only if any is non-zero), each zstd'd;
  bitmap  a packed changed-element bitmap + the codes of the changed elements as byte planes;
  gaps    the distance to each changed element (uint32 byte planes) + their codes as byte planes.
Why the difference rather than XOR: a +1 ulp step XORs to 1, 3, 7, 15... depending on the carry
chain, information the decoder already has in `old`, while the difference is always 1 (on a real
AdamW trajectory ~10% smaller). `transform="xor"` is kept so the benchmark can show that comparison.

Why a hand-written container rather than safetensors: on the ~5M test model a sparse delta is
~80 KB, and safetensors' per-section JSON header alone was ~25 KB; here the header is zstd'd (~3 KB).

Decode is single-threaded numpy/torch, avoids boolean-mask scatters (slow on random masks) in favour
of index arrays and torch's scatter_add_, and verifies each tensor's adler32 (zlib's; the SDK's
checksum_format name is "alder32") after reconstruction, which also catches a wrong base. It never
modifies its inputs; every failure raises DeltaError.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import torch
import zstandard

MAGIC = b"WBDELTA\0"
FORMAT_VERSION = 1
TRANSFORMS = ("sub", "xor")
LAYOUTS = ("same", "dense", "bitmap", "gaps")
ZSTD_LEVEL = 1  # calibration: level 3 is never more than 2-3% smaller and encodes slower
# magic, version (u16), flags (u16), header length (u32), header adler32 (u32), payload length (u64),
# payload adler32 (u32); little-endian. The payload checksum makes any damaged byte an error, even one
# that would decode to the same weights (e.g. a bitmap's padding bits).
_PREAMBLE = struct.Struct("<8sHHIIQI")
# Gap indices are uint32: a tensor may hold at most 2**32 - 1 elements (8 GB of bf16 in one tensor).
_MAX_ELEMENTS = 2**32 - 1


class DeltaError(ValueError):
    """A delta that cannot be applied: wrong base, unknown version, corrupted, truncated or missing data."""


# --------------------------------------------------------------------------------------------------
# bf16 <-> uint16 views (zero-copy) and the zigzag code

def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """The bit patterns of a CPU bf16 tensor as a flat uint16 numpy array (a view when contiguous)."""
    if t.dtype != torch.bfloat16:
        raise ValueError(f"expected a bfloat16 tensor, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"expected a CPU tensor, got one on {t.device}")
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)


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

def _compress_planes(values: np.ndarray, cctx: zstandard.ZstdCompressor) -> list[bytes]:
    """Little-endian byte planes of an unsigned integer array, each zstd-compressed.

    Plane i holds byte i of every value (grouping bytes of the same significance is what lets zstd's
    Huffman stage see their skewed distribution). Top planes that are all zero are not stored (the
    record keeps the plane count), the common case for the high byte of small codes.
    """
    top = int(values.max()) if values.size else 0
    n_planes = max(1, (top.bit_length() + 7) // 8)
    if n_planes == 1:
        return [cctx.compress(values.astype(np.uint8))]
    as_bytes = values.astype(values.dtype.newbyteorder("<"), copy=False).view(np.uint8)
    as_bytes = as_bytes.reshape(-1, values.dtype.itemsize)
    return [cctx.compress(np.ascontiguousarray(as_bytes[:, i])) for i in range(n_planes)]


def _decompress(frame, expected_size: int, dctx: zstandard.ZstdDecompressor, what: str) -> bytes:
    # The frame's declared size is checked first: it rejects a mismatched section cheaply and never
    # lets corrupted bytes ask for an enormous allocation.
    try:
        declared = zstandard.frame_content_size(frame)
        if declared != expected_size:
            raise DeltaError(f"{what}: frame declares {declared} bytes, expected {expected_size}")
        data = dctx.decompress(frame, max_output_size=expected_size)
    except zstandard.ZstdError as e:
        raise DeltaError(f"{what}: corrupted zstd data ({e})") from e
    if len(data) != expected_size:
        raise DeltaError(f"{what}: decompressed to {len(data)} bytes, expected {expected_size}")
    return data


def _decompress_planes(frames: list, count: int, dtype, dctx, what: str) -> np.ndarray:
    out = None
    for i, frame in enumerate(frames):
        plane = np.frombuffer(_decompress(frame, count, dctx, f"{what} byte plane {i}"), np.uint8)
        if out is None:
            out = plane.astype(dtype)
        else:
            shifted = plane.astype(dtype)
            shifted <<= 8 * i
            out |= shifted
    return out


# --------------------------------------------------------------------------------------------------
# encode

def _encode_tensor(new: np.ndarray, old: np.ndarray, transform: str, cctx) -> tuple[dict, list[bytes]]:
    """One tensor -> (record fields, its sections in layout order); the smallest layout wins."""
    record = {"adler32": zlib.adler32(new)}
    codes = _zigzag(new - old) if transform == "sub" else new ^ old  # uint16 arithmetic wraps
    changed = np.flatnonzero(codes)
    k = int(changed.size)
    record["changed"] = k
    if k == 0:
        record["layout"] = "same"
        return record, []

    candidates = []  # (layout, record fields, sections in the order the format fixes)
    dense = _compress_planes(codes, cctx)
    candidates.append(("dense", {"value_planes": len(dense)}, dense))
    if k < codes.size:
        values = _compress_planes(codes[changed], cctx)
        bitmap = cctx.compress(np.packbits(codes != 0))
        candidates.append(("bitmap", {"value_planes": len(values)}, [bitmap, *values]))
        gaps = np.diff(changed, prepend=-1)
        gaps -= 1  # zero-based: adjacent changed elements have gap 0
        gap_planes = _compress_planes(gaps.astype(np.uint32), cctx)
        candidates.append(("gaps", {"value_planes": len(values), "gap_planes": len(gap_planes)},
                           [*gap_planes, *values]))
    # min() keeps the first of equal sizes: dense, then bitmap, then gaps.
    layout, fields, sections = min(candidates, key=lambda c: sum(len(s) for s in c[2]))
    record["layout"] = layout
    record.update(fields)
    return record, sections


def encode(new_bf16: dict, old_bf16: dict, base_identity: str, *, transform: str = "sub",
           level: int = ZSTD_LEVEL) -> bytes:
    """Encode `new_bf16` as a delta over `old_bf16` (the snapshot named `base_identity`); return the file bytes.

    Both dicts must hold the same tensor names with equal shapes, all bf16 on CPU.
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
        fields, sections = _encode_tensor(bf16_bits(new_t), bf16_bits(old_t), transform, cctx)
        records.append({"name": name, "shape": list(new_t.shape), **fields,
                        "sections": [len(s) for s in sections]})
        payload.extend(sections)
    header = json.dumps({"base_identity": base_identity, "transform": transform, "checksum": "adler32",
                         "tensors": records}, separators=(",", ":")).encode()
    header = cctx.compress(header)
    payload_sum = 1  # adler32's initial value
    for section in payload:
        payload_sum = zlib.adler32(section, payload_sum)
    preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(header), zlib.adler32(header),
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
    if version != FORMAT_VERSION:
        raise DeltaError(f"unknown delta format version {version}; this workbench reads version {FORMAT_VERSION}")
    if flags != 0:  # reserved: a writer that sets them expects a reader that understands them
        raise DeltaError(f"unknown delta flags {flags:#06x} (version {version} defines none)")
    start = _PREAMBLE.size
    payload_offset = start + header_len
    if payload_offset + payload_len != len(view):
        what = "truncated" if payload_offset + payload_len > len(view) else "longer than its header says"
        raise DeltaError(f"delta is {what}: {len(view)} bytes, its preamble accounts for {payload_offset + payload_len}")
    if zlib.adler32(view[payload_offset:]) != payload_sum:
        raise DeltaError("delta data is corrupted (payload checksum mismatch)")
    packed = view[start:payload_offset]
    if zlib.adler32(packed) != header_sum:
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


def _decode_tensor(rec: dict, old_t: torch.Tensor, sections: list, transform: str, dctx) -> torch.Tensor:
    """The new tensor for one record; `sections` are this record's frames in layout order."""
    name, layout = rec["name"], rec["layout"]
    old = bf16_bits(old_t)
    n = old.size
    if layout not in LAYOUTS:
        raise DeltaError(f"tensor {name}: unknown layout {layout!r}")
    if layout == "same":
        if sections:
            raise DeltaError(f"tensor {name}: unchanged tensor with {len(sections)} data sections")
        return old_t.detach().clone(memory_format=torch.contiguous_format)
    k = int(rec["changed"])
    value_planes = int(rec["value_planes"])
    gap_planes = int(rec["gap_planes"]) if layout == "gaps" else 0
    expected = {"dense": value_planes, "bitmap": 1 + value_planes, "gaps": gap_planes + value_planes}[layout]
    if not 0 < k <= n or value_planes not in (1, 2) or not 0 <= gap_planes <= 4 or len(sections) != expected:
        raise DeltaError(f"tensor {name}: inconsistent record (changed={k} of {n}, value_planes={value_planes}, "
                         f"gap_planes={gap_planes}, {len(sections)} sections)")

    if layout == "dense":
        codes = _decompress_planes(sections, n, np.uint16, dctx, f"tensor {name}")
        if transform == "sub":
            np.add(_unzigzag_inplace(codes), old, out=codes)  # wraps mod 2**16: inverse of the subtraction
        else:
            np.bitwise_xor(codes, old, out=codes)
        return bits_to_bf16(codes, old_t.shape)

    values = _decompress_planes(sections[-value_planes:], k, np.uint16, dctx, f"tensor {name} values")
    if layout == "bitmap":
        packed = np.frombuffer(_decompress(sections[0], (n + 7) // 8, dctx, f"tensor {name} bitmap"), np.uint8)
        # As bool: numpy's nonzero has a fast path for bool, ~5x faster than on the uint8 0/1 bits.
        index = np.flatnonzero(np.unpackbits(packed, count=n).view(bool))
        if index.size != k:
            raise DeltaError(f"tensor {name}: bitmap marks {index.size} changed elements, header says {k}")
    else:
        index = _decompress_planes(sections[:gap_planes], k, np.uint32, dctx, f"tensor {name} gaps")
        index = index.astype(np.int64)
        index += 1
        np.cumsum(index, out=index)
        index -= 1
        if index[-1] >= n:
            raise DeltaError(f"tensor {name}: changed-element positions run past the tensor's {n} elements")

    new = old.copy()
    if transform == "sub":
        # torch's scatter_add_ does gather + add + scatter in one pass (~3x numpy's fancy indexing);
        # int16 addition wraps exactly like the encoder's uint16 subtraction.
        torch.from_numpy(new.view(np.int16)).scatter_add_(
            0, torch.from_numpy(index), torch.from_numpy(_unzigzag_inplace(values).view(np.int16)))
    else:
        new[index] ^= values
    return bits_to_bf16(new, old_t.shape)


def decode(blob, old_bf16: dict, base_identity: str) -> dict:
    """Apply the delta `blob` to `old_bf16` (the snapshot named `base_identity`); return a NEW bf16 dict.

    Raises DeltaError if the delta was made against another snapshot, has an unknown version, is
    truncated or corrupted, or a reconstructed tensor fails its checksum. `old_bf16` is never modified.
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
    dctx = zstandard.ZstdDecompressor()
    result = {}
    for rec in records:
        name = rec["name"]
        old_t = old_bf16[name]
        try:
            lengths = [int(n) for n in rec["sections"]]
            sections = []
            for length in lengths:
                sections.append(view[offset:offset + length])
                offset += length
            shape = tuple(int(s) for s in rec["shape"])
            if shape != tuple(old_t.shape):
                raise DeltaError(f"tensor {name}: delta shape {shape} differs from current {tuple(old_t.shape)}")
            new_t = _decode_tensor(rec, old_t, sections, header["transform"], dctx)
            expected = int(rec["adler32"])
        except DeltaError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise DeltaError(f"tensor {name}: bad record ({type(e).__name__}: {e})") from e
        if zlib.adler32(bf16_bits(new_t)) != expected:
            raise DeltaError(f"tensor {name}: checksum mismatch after applying the delta (corrupted delta, "
                             f"or the current weights are not really {base_identity!r})")
        result[name] = new_t
    return result
