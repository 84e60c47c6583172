"""The delta codec's bytes: bit-exact round trips in every layout, compression, and every way a delta can be bad."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from workbench.checkpoints import delta_codec as dc
from workbench.checkpoints.delta_codec import DeltaError

BF16 = torch.bfloat16
WRITTEN_LAYOUTS = {"same", "dense", "packed2g", "packed4g", "packed8g", "gaps"}  # version 2; packed2/packed4 are read only


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def same_bits(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)


def clone(d: dict) -> dict:
    return {k: v.clone() for k, v in d.items()}


def ulp_steps(t: torch.Tensor, fraction: float, max_steps: int, seed: int) -> torch.Tensor:
    """`t` with `fraction` of its elements moved by 1..max_steps ulps either way (bit-pattern arithmetic)."""
    g = torch.Generator().manual_seed(seed)
    raw = bits(t).to(torch.int32)
    moved = torch.rand(t.shape, generator=g) < fraction
    step = torch.randint(1, max_steps + 1, t.shape, generator=g) * (torch.randint(0, 2, t.shape, generator=g) * 2 - 1)
    return torch.where(moved, raw + step, raw).to(torch.int16).view(BF16)


def weights(seed: int, shape=(64, 96)) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(BF16)


@pytest.fixture
def mixed():
    """Old and new weights that exercise every layout, both value planes and awkward bit patterns."""
    old = {f"t.{i}": weights(i) for i in range(7)}
    old["special"] = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 3e38, -1e-38,
                                   65504.0], dtype=BF16)
    old["scalar"] = torch.tensor(0.5, dtype=BF16)
    old["empty"] = torch.zeros(0, dtype=BF16)
    new = {
        "t.0": ulp_steps(old["t.0"], 0.9, 4, 10),        # most move a few ulps: packed4
        "t.1": ulp_steps(old["t.1"], 0.3, 1, 11),        # a third move one ulp: packed2
        "t.2": ulp_steps(old["t.2"], 0.004, 1, 12),      # a few move: gaps
        "t.3": old["t.3"].clone(),                       # nothing moves: same
        "t.4": ulp_steps(old["t.4"], 0.2, 2000, 13),     # some jump far: escapes with two byte planes
        "t.5": ulp_steps(old["t.5"], 1.0, 3000, 14),     # everything jumps far: dense, two byte planes
        "t.6": ulp_steps(old["t.6"], 0.9, 60, 15),       # most move tens of ulps: packed8g
        # sign flips, NaN payload change, inf -> finite, wrap-around differences
        "special": torch.tensor([-0.0, 0.0, -1.0, 1.0, 1.0, float("nan"), float("inf"), -3e38, 1e-38, 65504.0],
                                dtype=BF16),
        "scalar": torch.tensor(0.25, dtype=BF16),
        "empty": torch.zeros(0, dtype=BF16),
    }
    new["special"].view(torch.int16)[5] = 0x7FC1  # a NaN with a different payload must survive too
    return old, new


def test_zigzag_is_a_bijection_on_all_16_bit_values():
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    codes = dc._zigzag(every)
    assert np.unique(codes).size == 65536
    assert codes[0] == 0 and codes[0xFFFF] == 1 and codes[1] == 2  # 0, -1, +1
    assert np.array_equal(dc._unzigzag_inplace(codes.copy()), every)


@pytest.mark.parametrize("transform", ["sub", "xor"])
def test_round_trip_is_bit_exact_in_every_layout(mixed, transform):
    old, new = mixed
    old_copy = clone(old)
    blob = dc.encode(new, old, "snap-0", transform=transform)
    header = dc.read_header(blob)
    assert header["base_identity"] == "snap-0" and header["format_version"] == dc.FORMAT_VERSION
    assert header["transform"] == transform
    layouts = {rec["name"]: rec["layout"] for rec in header["tensors"]}
    assert layouts["t.3"] == layouts["empty"] == "same" and layouts["t.2"] == "gaps"
    assert any(rec.get("value_planes") == 2 for rec in header["tensors"])
    if transform == "sub":  # XOR codes of the same steps are larger, so their best layouts differ
        assert (layouts["t.0"], layouts["t.1"], layouts["t.5"], layouts["t.6"]) == ("packed4g", "packed2g", "dense", "packed8g")
        assert set(layouts.values()) == set(WRITTEN_LAYOUTS)
    # sections zstd cannot shrink (the near-random low bytes of large jumps, a few bytes) are stored raw
    assert any(rec.get("raw") for rec in header["tensors"])

    out = dc.decode(blob, old, "snap-0")
    assert same_bits(out, new)
    assert all(out[k].shape == new[k].shape and out[k].dtype == BF16 for k in new)
    assert same_bits(old, old_copy)
    out["t.3"].view(torch.int16)[0, 0] += 1  # results never alias the inputs
    assert same_bits(old, old_copy)


def test_decode_into_recycled_buffers_writes_them_and_skips_ones_that_do_not_fit(mixed):
    old, new = mixed
    blob = dc.encode(new, old, "snap-0")
    spare = {k: torch.full_like(v, 7.0) for k, v in old.items()}
    spare["t.1"] = spare["t.1"].t()                     # not contiguous: not used
    spare["t.2"] = torch.zeros(3, dtype=BF16)           # wrong shape: not used
    spare["t.4"] = old["t.4"]                           # the tensor decoded from: never written
    del spare["t.5"]                                    # missing: a fresh tensor
    kept = {k: v for k, v in spare.items()}
    old_copy = clone(old)
    out = dc.decode(blob, old, "snap-0", out=spare)
    assert same_bits(out, new) and same_bits(old, old_copy)
    for k in ("t.0", "t.3", "special", "scalar"):
        assert out[k] is kept[k]                        # written in place, nothing allocated
    for k in ("t.1", "t.2", "t.4", "t.5"):
        assert all(out[k].data_ptr() != v.data_ptr() for v in [*old.values(), *kept.values()] if v.numel())


def plain_xor_zstd_size(new: dict, old: dict) -> int:
    xor = b"".join((dc.bf16_bits(new[k]) ^ dc.bf16_bits(old[k])).tobytes() for k in new)
    return len(zstandard.ZstdCompressor(level=1).compress(xor))


@pytest.mark.parametrize("lr", [1e-4, 1e-5, 1e-6])
def test_smaller_than_plain_xor_zstd_on_an_adam_like_step(lr):
    # Adam moves every fp32 master weight by about lr; the bf16 copy changes where that crosses a rounding step.
    g = torch.Generator().manual_seed(0)
    master = {f"w{i}": torch.randn(256, 384, generator=g) * 0.02 for i in range(3)}
    old = {k: v.to(BF16) for k, v in master.items()}
    new = {k: (v - lr * torch.randn(v.shape, generator=g).clamp(-2, 2)).to(BF16) for k, v in master.items()}
    blob = dc.encode(new, old, "s")
    assert same_bits(dc.decode(blob, old, "s"), new)
    assert plain_xor_zstd_size(new, old) / len(blob) >= 1.5


def test_wrong_base_identity_is_refused(mixed):
    old, new = mixed
    blob = dc.encode(new, old, "snap-0")
    with pytest.raises(DeltaError, match="'snap-0'.*'snap-7'"):
        dc.decode(blob, old, "snap-7")


def test_right_name_wrong_bytes_fails_the_checksum(mixed):
    old, new = mixed
    blob = dc.encode(new, old, "snap-0")
    for name in ("t.0", "t.1", "t.2", "t.3", "t.5"):  # every layout
        other = clone(old)
        other[name].view(torch.int16).view(-1)[7] ^= 1
        with pytest.raises(DeltaError, match=f"tensor {name}: checksum mismatch"):
            dc.decode(blob, other, "snap-0")


def test_every_corrupted_byte_is_detected(mixed):
    old, new = mixed
    old_copy = clone(old)
    blob = dc.encode(new, old, "snap-0")
    header = dc.read_header(blob)
    # Every preamble/header byte, and a sample of payload bytes across all sections.
    positions = list(range(header["payload_offset"]))
    positions += list(range(header["payload_offset"], len(blob), max(1, (len(blob) - header["payload_offset"]) // 300)))
    for pos in positions:
        corrupted = bytearray(blob)
        corrupted[pos] ^= 0x24
        with pytest.raises(DeltaError):
            dc.decode(bytes(corrupted), old, "snap-0")
    assert same_bits(old, old_copy)


def test_truncated_or_padded_files_are_refused(mixed):
    old, new = mixed
    blob = dc.encode(new, old, "snap-0")
    offset = dc.read_header(blob)["payload_offset"]
    for length in (0, 5, 19, offset - 1, offset, offset + 1, len(blob) - 1):
        with pytest.raises(DeltaError, match="truncated"):
            dc.decode(blob[:length], old, "snap-0")
    with pytest.raises(DeltaError, match="longer than its header says"):
        dc.decode(blob + b"\0", old, "snap-0")


def test_unknown_version_and_foreign_files_are_refused(mixed):
    old, new = mixed
    blob = bytearray(dc.encode(new, old, "snap-0"))
    struct.pack_into("<H", blob, 8, dc.FORMAT_VERSION + 1)
    with pytest.raises(DeltaError, match=f"unknown delta format version {dc.FORMAT_VERSION + 1}"):
        dc.decode(bytes(blob), old, "snap-0")
    with pytest.raises(DeltaError, match="not a workbench delta"):
        dc.decode(b"PK\x03\x04" + bytes(100), old, "snap-0")


def test_current_weights_must_match_the_delta_tensors(mixed):
    old, new = mixed
    blob = dc.encode(new, old, "snap-0")
    missing = {k: v for k, v in old.items() if k != "t.1"}
    with pytest.raises(DeltaError, match="not in current weights: \\['t.1'\\]"):
        dc.decode(blob, missing, "snap-0")
    with pytest.raises(DeltaError, match="not in delta: \\['extra'\\]"):
        dc.decode(blob, {**old, "extra": torch.zeros(2, dtype=BF16)}, "snap-0")
    reshaped = {**old, "t.0": old["t.0"].reshape(96, 64)}
    with pytest.raises(DeltaError, match="shape"):
        dc.decode(blob, reshaped, "snap-0")


def test_encode_rejects_inputs_it_cannot_represent(mixed):
    old, new = mixed
    with pytest.raises(ValueError, match="bfloat16"):
        dc.encode({**new, "t.0": new["t.0"].float()}, old, "snap-0")
    with pytest.raises(ValueError, match="tensor names"):
        dc.encode({k: v for k, v in new.items() if k != "t.0"}, old, "snap-0")
    with pytest.raises(ValueError, match="base_identity"):
        dc.encode(new, old, "")


def long_tensors(seed: int) -> tuple[dict, dict]:
    """Old and new weights longer than the decoder's chunk (of an odd length, so the last packed byte is
    partial), one per layout and plane count the decoder reads differently."""
    shape = (263, 1001)  # 263,263 elements: more than two chunks of 2**16 or 2**17
    assert shape[0] * shape[1] > 2 * dc._CHUNK
    g = torch.Generator().manual_seed(seed)
    old = {name: (torch.randn(shape, generator=g) * 0.02).to(BF16)
           for name in ("packed4", "packed2", "packed2-rare-escapes", "packed8", "dense", "gaps-near", "gaps-far")}
    new = {
        "packed4": ulp_steps(old["packed4"], 0.9, 4, seed + 1),
        "packed2": ulp_steps(old["packed2"], 0.25, 2, seed + 2),               # ~12% escape: the padded nonzero
        "packed2-rare-escapes": ulp_steps(old["packed2-rare-escapes"], 0.3, 1, seed + 3),
        "packed8": ulp_steps(old["packed8"], 0.9, 60, seed + 6),
        "dense": ulp_steps(old["dense"], 1.0, 3000, seed + 4),
        "gaps-near": ulp_steps(old["gaps-near"], 0.07, 1, seed + 5),          # gaps and codes of one byte
        "gaps-far": old["gaps-far"].clone(),
    }
    flat = new["packed2-rare-escapes"].view(torch.int16).view(-1)
    flat[::9001] += 40                                                        # a few escapes, far apart
    new["packed8"].view(torch.int16).view(-1)[::5001] += 1000                 # codes over 255, listed
    far = new["gaps-far"].view(torch.int16).view(-1)
    far[[0, 1, 70_000, 200_001, far.numel() - 1]] += torch.tensor([1000, -1000, 3, -2, 700], dtype=torch.int16)
    return old, new


@pytest.mark.parametrize("transform", ["sub", "xor"])
def test_round_trip_across_chunks_in_every_layout_and_plane_count(transform):
    old, new = long_tensors(5)
    blob = dc.encode(new, old, "snap-0", transform=transform)
    records = {rec["name"]: rec for rec in dc.read_header(blob)["tensors"]}
    if transform == "sub":
        assert {name: rec["layout"] for name, rec in records.items()} == {
            "packed4": "packed4g", "packed2": "packed2g", "packed2-rare-escapes": "packed2g", "packed8": "packed8g",
            "dense": "dense", "gaps-near": "gaps", "gaps-far": "gaps"}
        # listed codes in every chunk, and ones whose gaps need a second byte plane
        assert records["packed2"]["escapes"] > 263_263 // 32 and records["packed2"]["gap_planes"] == 1
        assert records["packed2-rare-escapes"]["escapes"] > 0 and records["packed2-rare-escapes"]["gap_planes"] == 2
        assert records["packed8"]["escapes"] >= 263_263 // 5001
        assert (records["gaps-near"]["gap_planes"], records["gaps-near"]["value_planes"]) == (1, 1)
        assert (records["gaps-far"]["gap_planes"], records["gaps-far"]["value_planes"]) == (3, 2)
        assert records["gaps-far"]["changed"] < dc._SMALL_SCATTER <= records["gaps-near"]["changed"]  # both scatters
        assert records["dense"]["value_planes"] == 2
    old_copy = clone(old)
    assert same_bits(dc.decode(blob, old, "snap-0"), new)
    spare = {k: torch.full_like(v, 3.0) for k, v in old.items()}
    out = dc.decode(blob, old, "snap-0", out=spare)
    assert same_bits(out, new) and all(out[k] is spare[k] for k in new)
    # weights held transposed (not contiguous) or as parameters decode the same, and are not modified
    held = {k: (v.t().contiguous().t() if i % 2 else v.clone().requires_grad_()) for i, (k, v) in enumerate(old.items())}
    assert not held["packed2"].is_contiguous()
    assert same_bits(dc.decode(blob, held, "snap-0", out=spare), new)
    assert same_bits(old, old_copy) and same_bits({k: v.detach() for k, v in held.items()}, old_copy)


def test_current_weights_that_are_not_bf16_on_the_cpu_are_refused(mixed):
    old, new = mixed
    blob = dc.encode(new, old, "snap-0")
    with pytest.raises(DeltaError, match="tensor t.1: bad record .*bfloat16"):
        dc.decode(blob, {**old, "t.1": old["t.1"].float()}, "snap-0")
    with pytest.raises(DeltaError, match="tensor t.1: bad record .*CPU"):
        dc.decode(blob, {**old, "t.1": old["t.1"].to("meta")}, "snap-0")


# --------------------------------------------------------------------------------------------------
# files written by an older encoder

def _hash(n: int, seed: int) -> np.ndarray:
    """n pseudo-random uint32s from integer arithmetic alone (splitmix-style), the same on every platform
    and numpy/torch version: the golden files' weights are recomputed from it, never stored."""
    x = np.arange(n, dtype=np.uint64) + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    x *= np.uint64(0xBF58476D1CE4E5B9)  # uint64 arrays wrap silently, as intended
    x ^= x >> np.uint64(31)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(29)
    return (x & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _as_bf16(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.uint16).view(np.int16).copy()).view(BF16)


def golden_weights() -> tuple[dict, dict]:
    """Old and new weights for the golden files: one tensor per version-1 layout and plane count, the
    packed2 one longer than a decode chunk with escapes over 1/32 (the padded escape search)."""
    def old(n, seed):   # bf16 bit patterns of small weights of either sign (2**-11 to 2**-8), any mantissa
        h = _hash(n, seed)
        return (h & 0x807F) | (0x3A00 + ((h >> 8) & 0x3) * 0x80)

    def moved(o, seed, fraction, steps):  # `fraction` of the elements moved by 1..steps ulps either way
        h = _hash(o.size, seed)
        move = (h % 1000) < fraction * 1000
        step = ((h >> 10) % steps + 1).astype(np.int64) * np.where((h >> 20) & 1, 1, -1)
        return ((o.astype(np.int64) + np.where(move, step, 0)) & 0xFFFF).astype(np.uint16)

    sizes = {"packed4": 20_000, "packed2": 140_001, "packed2-rare-escapes": 9_000, "dense": 3_000,
             "gaps-near": 30_000, "gaps-far": 70_003, "same": 1_000}
    olds = {name: old(n, i + 1) for i, (name, n) in enumerate(sizes.items())}
    news = {"packed4": moved(olds["packed4"], 11, 0.9, 5), "packed2": moved(olds["packed2"], 12, 0.25, 2),
            "packed2-rare-escapes": moved(olds["packed2-rare-escapes"], 13, 0.3, 1),
            "dense": moved(olds["dense"], 14, 1.0, 3000), "gaps-near": moved(olds["gaps-near"], 15, 0.05, 1),
            "gaps-far": olds["gaps-far"].copy(), "same": olds["same"].copy()}
    news["packed4"][::997] += 30
    news["packed2-rare-escapes"][::1001] += 40
    news["packed2-rare-escapes"][500] += 2000   # an escaped code over 255: two value planes
    news["gaps-far"][[0, 1, 300, 70_002]] += np.array([1000, 65535 - 999, 3, 700], np.uint16)
    olds["scalar"], news["scalar"] = np.array([0x3F00], np.uint16), np.array([0x3E80], np.uint16)
    olds["empty"] = news["empty"] = np.zeros(0, np.uint16)
    old_t = {k: _as_bf16(v) for k, v in olds.items()}
    new_t = {k: _as_bf16(v) for k, v in news.items()}
    old_t["scalar"], new_t["scalar"] = old_t["scalar"].reshape(()), new_t["scalar"].reshape(())
    old_t["dense"], new_t["dense"] = old_t["dense"].reshape(30, 100), new_t["dense"].reshape(30, 100)
    return old_t, new_t


GOLDEN = Path(__file__).parent / "data"


@pytest.mark.parametrize("transform", ["sub", "xor"])
def test_files_of_format_version_1_still_decode(transform):
    # Written by the version-1 encoder (commit 6544dc8) from golden_weights(), kept byte for byte:
    #   blob = delta_codec.encode(new, old, "golden-base", transform=T); tests/data/delta_v1_T.wbd
    old, new = golden_weights()
    blob = (GOLDEN / f"delta_v1_{transform}.wbd").read_bytes()
    header = dc.read_header(blob)
    assert header["format_version"] == 1 and header["transform"] == transform
    records = {rec["name"]: rec for rec in header["tensors"]}
    assert not any("raw" in rec for rec in records.values())
    if transform == "sub":  # every version-1 layout, escapes in two planes, and the padded escape search
        assert {rec["layout"] for rec in records.values()} == {"same", "dense", "packed2", "packed4", "gaps"}
        assert records["packed2-rare-escapes"]["value_planes"] == 2 and records["gaps-far"]["gap_planes"] == 3
        assert 140_001 // 32 <= records["packed2"]["escapes"] < 140_001 // 8 and 140_001 > dc._CHUNK
    old_copy = clone(old)
    assert same_bits(dc.decode(blob, old, "golden-base"), new)
    spare = {k: torch.full_like(v, 3.0) for k, v in old.items()}
    assert same_bits(dc.decode(blob, old, "golden-base", out=spare), new) and same_bits(old, old_copy)
    with pytest.raises(DeltaError, match="tensor packed2: checksum mismatch"):
        wrong = clone(old)
        wrong["packed2"].view(torch.int16)[-1] ^= 4
        dc.decode(blob, wrong, "golden-base")


@pytest.mark.parametrize("transform", ["sub", "xor"])
def test_raw_sections_round_trip_bit_exactly_in_every_layout(transform):
    old, new = long_tensors(7)
    # raw_below=1: every section is stored raw, whatever zstd would save
    blob = dc.encode(new, old, "snap-0", transform=transform, raw_below=1.0)
    records = dc.read_header(blob)["tensors"]
    assert all(rec["raw"] == list(range(len(rec["sections"]))) for rec in records if rec["sections"])
    if transform == "sub":
        assert {rec["layout"] for rec in records} == {"packed4g", "packed2g", "packed8g", "dense", "gaps"}
    assert same_bits(dc.decode(blob, old, "snap-0"), new)
    spare = {k: torch.full_like(v, 3.0) for k, v in old.items()}
    out = dc.decode(blob, old, "snap-0", out=spare)
    assert same_bits(out, new) and all(out[k] is spare[k] for k in new)
    # raw_below=0: raw only where zstd does not shrink a section at all (near-random bytes, a few bytes)
    tight = dc.encode(new, old, "snap-0", transform=transform, raw_below=0.0)
    header = dc.read_header(tight)
    offset, raw_sections = header["payload_offset"], 0
    for rec in header["tensors"]:
        for i, length in enumerate(rec["sections"]):
            if i in rec.get("raw", []):
                raw_sections += 1
                assert len(zstandard.ZstdCompressor(level=dc.ZSTD_LEVEL).compress(tight[offset:offset + length])) >= length
            offset += length
    assert 0 < raw_sections < sum(len(rec["sections"]) for rec in header["tensors"])


def _with_header(blob: bytes, edit) -> bytes:
    """`blob` with its header JSON changed by `edit(header)`, every checksum made consistent again."""
    header = dc.read_header(blob)
    offset = header.pop("payload_offset")
    version = header.pop("format_version")
    edit(header)
    packed = zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    payload = blob[offset:]
    return struct.pack("<8sHHIIQI", dc.MAGIC, version, 0, len(packed), zlib.adler32(packed), len(payload),
                       zlib.adler32(payload)) + packed + payload


def test_a_damaged_raw_section_is_caught_by_the_checksums(mixed):
    old, new = mixed
    blob = dc.encode(new, old, "snap-0", raw_below=1.0)
    header = dc.read_header(blob)
    offset = header["payload_offset"]
    for rec in header["tensors"]:
        if rec["name"] == "t.1":
            break
        offset += sum(rec["sections"])
    assert rec["raw"] == [0]  # t.1's packed fields, raw
    damaged = bytearray(blob)
    damaged[offset + 100] ^= 0x10
    with pytest.raises(DeltaError, match="payload checksum mismatch"):
        dc.decode(bytes(damaged), old, "snap-0")
    # the same damage with the payload checksum recomputed: the tensor's own checksum fails
    payload = bytes(damaged[header["payload_offset"]:])
    struct.pack_into("<I", damaged, 28, zlib.adler32(payload))
    with pytest.raises(DeltaError, match="tensor t.1: checksum mismatch"):
        dc.decode(bytes(damaged), old, "snap-0")


def test_inconsistent_raw_and_listed_code_fields_are_refused(mixed):
    old, new = mixed
    blob = dc.encode(new, old, "snap-0", transform="xor", raw_below=1.0)

    def record(header, name):
        return next(rec for rec in header["tensors"] if rec["name"] == name)

    cases = {
        "raw index past the sections": lambda h: record(h, "t.2").update(raw=[0, 1, 7]),
        "raw not a list": lambda h: record(h, "t.2").update(raw="all"),
        "raw index twice": lambda h: record(h, "t.2").update(raw=[0, 0, 1]),
        "a raw section marked zstd": lambda h: record(h, "t.2").update(raw=[0, 1]),
        "listed codes without positions": lambda h: record(h, "t.1").update(gap_planes=0),
        "more listed codes than stored": lambda h: record(h, "t.1").update(escapes=record(h, "t.1")["escapes"] + 1),
    }
    assert record(dc.read_header(blob), "t.1")["layout"] == "packed2g" and record(dc.read_header(blob), "t.1")["escapes"]
    for what, edit in cases.items():
        with pytest.raises(DeltaError, match="tensor t.[12]"):
            dc.decode(_with_header(blob, edit), old, "snap-0")
    assert same_bits(dc.decode(_with_header(blob, lambda h: None), old, "snap-0"), new)  # the helper itself is faithful
