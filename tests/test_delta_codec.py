"""The delta codec's bytes: bit-exact round trips in every layout, compression, and every way a delta can be bad."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import zstandard

from workbench.checkpoints import delta_codec as dc
from workbench.checkpoints.delta_codec import DeltaError

BF16 = torch.bfloat16


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
    old = {f"t.{i}": weights(i) for i in range(6)}
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
        assert (layouts["t.0"], layouts["t.1"], layouts["t.5"]) == ("packed4", "packed2", "dense")
        assert set(layouts.values()) == set(dc.LAYOUTS)

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
           for name in ("packed4", "packed2", "packed2-rare-escapes", "dense", "gaps-near", "gaps-far")}
    new = {
        "packed4": ulp_steps(old["packed4"], 0.9, 4, seed + 1),
        "packed2": ulp_steps(old["packed2"], 0.25, 2, seed + 2),               # ~12% escape: the padded nonzero
        "packed2-rare-escapes": ulp_steps(old["packed2-rare-escapes"], 0.3, 1, seed + 3),
        "dense": ulp_steps(old["dense"], 1.0, 3000, seed + 4),
        "gaps-near": ulp_steps(old["gaps-near"], 0.07, 1, seed + 5),          # gaps and codes of one byte
        "gaps-far": old["gaps-far"].clone(),
    }
    flat = new["packed2-rare-escapes"].view(torch.int16).view(-1)
    flat[::9001] += 40                                                        # a few escapes, far apart
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
            "packed4": "packed4", "packed2": "packed2", "packed2-rare-escapes": "packed2", "dense": "dense",
            "gaps-near": "gaps", "gaps-far": "gaps"}
        assert 263_263 // 8 > records["packed2"]["escapes"] >= 263_263 // 32 > records["packed2-rare-escapes"]["escapes"] > 0
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
