"""Delta formats in-process (workbench.checkpoints.formats): every format round-trips bit for bit, the
library reads what workbench writes, format choice and mismatch errors, nothing untrusted is unpickled,
and a corrupt base directory is not listed as a promotable base."""

from __future__ import annotations

import io
import pickle
import zlib

import pytest
import torch

from workbench import checkpoints as ck
from workbench import models
from workbench.checkpoints import formats


def weights_pair(seed=0, scale=1e-3):
    g = torch.Generator().manual_seed(seed)
    old = {"a.weight": torch.randn(64, 48, generator=g).to(torch.bfloat16),
           "b.bias": torch.randn(48, generator=g).to(torch.bfloat16),
           "c.norm": torch.ones(16, dtype=torch.bfloat16)}
    new = {k: (v.float() * (1 + scale * torch.randn(v.shape, generator=g))).to(torch.bfloat16) for k, v in old.items()}
    new["c.norm"] = old["c.norm"].clone()           # an unchanged tensor too
    return new, old


def same_bits(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


@pytest.mark.parametrize("fmt", ck.DELTA_FORMATS)
def test_every_format_round_trips_and_records_its_stats(tmp_path, fmt):
    new, old = weights_pair()
    ck.save_sampler_base(tmp_path / "s-0", old, models.local_path(models.DEFAULT_MODEL), {})
    stats = ck.save_sampler_delta(tmp_path / "s-1", new, old, "s-0", {}, delta_format=fmt)
    meta = ck.read_manifest(tmp_path / "s-1")
    assert meta["delta_format"] == fmt == ck.delta_format_of(tmp_path / "s-1") == formats.sniff_delta_format(tmp_path / "s-1")
    assert meta["chain_length"] == 1 and meta["chain_base"] == "s-0" and meta["delta_bytes"] == stats["delta_bytes"] > 0
    assert 0 < meta["changed_fraction"] < 1 and meta["checksum_format"] == "alder32"
    assert same_bits(ck.apply_delta(tmp_path / "s-1", dict(old), "s-0", compression_format=fmt,
                                    checksum_format="alder32"), new)
    newer, _ = weights_pair(seed=1)
    ck.save_sampler_delta(tmp_path / "s-2", newer, new, "s-1", {}, delta_format=fmt)
    assert ck.read_manifest(tmp_path / "s-2")["chain_length"] == 2
    assert ck.detect_checkpoint_type(tmp_path / "s-2") == ck.INFERENCE_ARC_V2


@pytest.mark.parametrize("fmt", ["arc_v1", "arc_v2", "arc_v3"])
def test_library_reads_what_workbench_writes(tmp_path, fmt):
    from fireworks_delta_compression import delta_decompress_dict_from_file

    new, old = weights_pair()
    stats = ck.save_sampler_delta(tmp_path / "s-1", new, old, "s-0", {}, delta_format=fmt)
    out = delta_decompress_dict_from_file(src=dict(old), diff_file=str(tmp_path / "s-1" / stats["file"]),
                                          compression_format=fmt)
    assert same_bits(out, new)


def test_arc_v2_decodes_into_spare_tensors_as_the_library_does(tmp_path):
    """workbench decodes arc_v2 itself, in chunks, into the tensors a deployment retired: the same bits
    as the library's decoder on the same file, and a damaged patch is refused."""
    from fireworks_delta_compression import delta_decompress_dict_from_file

    new, old = weights_pair()
    g = torch.Generator().manual_seed(3)
    old["big.weight"] = torch.randn(1000, 333, generator=g).to(torch.bfloat16)    # several 256 KiB chunks
    new["big.weight"] = (old["big.weight"].float() * (1 + 1e-2 * torch.randn(1000, 333, generator=g))).to(torch.bfloat16)
    old["empty"], new["empty"] = torch.zeros(0, dtype=torch.bfloat16), torch.zeros(0, dtype=torch.bfloat16)
    stats = ck.save_sampler_delta(tmp_path / "s-1", new, old, "s-0", {}, delta_format="arc_v2")
    delta_file = tmp_path / "s-1" / stats["file"]
    library = delta_decompress_dict_from_file(src=dict(old), diff_file=str(delta_file), compression_format="arc_v2")
    spare = {k: torch.full_like(v, 7.0) for k, v in new.items()}
    spare["c.norm"] = torch.zeros(3, dtype=torch.bfloat16)                    # wrong shape: not written into
    got = formats.read_delta(tmp_path / "s-1", old, "arc_v2", "s-0", out=spare)
    assert same_bits(got, library) and same_bits(got, new)
    assert all(got[k] is spare[k] for k in ("a.weight", "b.bias", "big.weight")) and got["c.norm"] is not spare["c.norm"]
    assert same_bits(old, weights_pair()[1] | {"big.weight": old["big.weight"], "empty": old["empty"]})

    import zstandard
    blob = delta_file.read_bytes()
    patch = bytes(formats._load_patches([delta_file])[0]["big.weight"])
    raw = zstandard.ZstdDecompressor().decompress(patch)
    for bad, error in ((patch[: len(patch) // 2], "corrupt arc_v2"),                              # cut short
                       (zstandard.ZstdCompressor().compress(raw + b"\0\0"), "holds 666002 bytes"),  # too long
                       (zstandard.ZstdCompressor(write_content_size=False).compress(raw[:-2]), "ends after"),
                       (zstandard.ZstdCompressor().compress(bytes([raw[0] ^ 1]) + raw[1:]), "checksum mismatch")):
        delta_file.write_bytes(blob)
        _replace_patch(delta_file, "big.weight", bad)
        with pytest.raises(ck.DeltaError, match=f"big.weight.*{error}"):
            formats.read_delta(tmp_path / "s-1", old, "arc_v2", "s-0")


def test_base_weights_are_read_into_spare_tensors(tmp_path):
    new, old = weights_pair()
    ck.save_sampler_base(tmp_path / "s-0", new, models.local_path(models.DEFAULT_MODEL), {})
    spare = {k: torch.full_like(v, 7.0) for k, v in new.items()}
    spare["b.bias"] = spare["b.bias"].float()                                   # wrong dtype: not written into
    got = ck.load_base_weights(tmp_path / "s-0", out=spare)
    assert same_bits(got, new) and got["a.weight"] is spare["a.weight"] and got["b.bias"] is not spare["b.bias"]


def test_a_disagreeing_format_is_refused_naming_both(tmp_path):
    new, old = weights_pair()
    ck.save_sampler_delta(tmp_path / "s-1", new, old, "s-0", {}, delta_format="arc_v3")
    with pytest.raises(ck.DeltaFormatError, match=r"'arc_v2'.*'arc_v3'.*extra_values") as e:
        ck.apply_delta(tmp_path / "s-1", old, "s-0", compression_format="arc_v2")
    assert e.value.http_status == 400
    with pytest.raises(ck.DeltaFormatError, match=r"'crc32'.*'alder32'"):
        ck.apply_delta(tmp_path / "s-1", old, "s-0", compression_format="arc_v3", checksum_format="crc32")


def test_job_format_choice():
    assert ck.choose_job_format(None, None) == "arc_v2"
    assert ck.choose_job_format({"compression_format": "arc_v3"}, ["--compression-format=arc_v1"]) == "arc_v3"
    assert ck.choose_job_format({}, ["--lr", "1", "--compression-format=arc_v1"]) == "arc_v1"
    assert ck.choose_job_format({}, ["--compression-format", "workbench_v1"]) == "workbench_v1"
    assert ck.choose_job_format(None, None, default="arc_v3") == "arc_v3"
    with pytest.raises(ValueError, match=r"extraValues.compression_format 'arc_v9'.*arc_v2"):
        ck.choose_job_format({"compression_format": "arc_v9"})
    with pytest.raises(ValueError, match="extraArgs"):
        ck.choose_job_format({}, ["--compression-format"])


# ---- nothing untrusted is unpickled ---------------------------------------------------------------

class _Marker:
    """Unpickling this creates `path` (builtins.open in write mode): what a crafted pickle could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _replace_patch(delta_file, key, patch: bytes):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(delta_file))
    _, metadata = formats.safetensors_header(delta_file)
    tensors[key] = torch.frombuffer(bytearray(patch), dtype=torch.uint8)
    save_file(tensors, str(delta_file), metadata=metadata)


@pytest.mark.parametrize("where", ["envelope", "payload"])
def test_crafted_arc_v3_pickle_is_rejected_and_runs_nothing(tmp_path, where):
    import zstd

    new, old = weights_pair()
    stats = ck.save_sampler_delta(tmp_path / "s-1", new, old, "s-0", {}, delta_format="arc_v3")
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Marker(marker), protocol=pickle.HIGHEST_PROTOCOL)
    if where == "envelope":
        patch = b"ARC3_ENVELOPE\0" + evil
    else:
        patch = b"ARC3_ENVELOPE\0" + pickle.dumps({"codec": "zstd", "data": zstd.compress(evil, 1)})
    _replace_patch(tmp_path / "s-1" / stats["file"], "a.weight", patch)
    with pytest.raises(ck.DeltaError, match="REDUCE|STACK_GLOBAL|GLOBAL|import or call"):
        ck.apply_delta(tmp_path / "s-1", old, "s-0", compression_format="arc_v3")
    assert not marker.exists()
    pickle.loads(evil).close()                 # the same bytes really would have created it
    assert marker.exists()


def test_crafted_dcp_metadata_is_never_unpickled(tmp_path):
    model = models.load_model(models.DEFAULT_MODEL)
    job = tmp_path / "job"
    ck.save_train_state(job / "checkpoints" / "evil", model, None, {})
    marker = tmp_path / "pwned"
    (job / "checkpoints" / "evil" / ".metadata").write_bytes(pickle.dumps(_Marker(marker)))
    rows = ck.list_checkpoints(job)             # listing reads the manifest, not .metadata
    assert [r["checkpointType"] for r in rows] == [ck.TRAINING]
    with pytest.raises(ValueError, match="open"):
        ck.load_train_state(job / "checkpoints" / "evil", model, None)
    assert not marker.exists()


def test_dcp_metadata_check_accepts_real_checkpoints(tmp_path):
    from workbench.checkpoints.safe_pickle import check_dcp_metadata

    model = models.load_model(models.DEFAULT_MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 100, (1, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    ck.save_train_state(tmp_path / "s", model, opt, {})
    assert any(k.startswith("optim.") for k in check_dcp_metadata(tmp_path / "s").state_dict_metadata)


# ---- a corrupt base is not a promotable base (issue 13.13) ----------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "garbage-header", "no-config"])
def test_corrupt_base_directory_is_not_listed(tmp_path, damage):
    _, old = weights_pair()
    job = tmp_path / "job"
    ck.save_sampler_base(job / "sampler" / "good", old, models.local_path(models.DEFAULT_MODEL), {})
    ck.save_sampler_base(job / "sampler" / "bad", old, models.local_path(models.DEFAULT_MODEL), {})
    weights = job / "sampler" / "bad" / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) - 10])
    elif damage == "garbage-header":
        weights.write_bytes(data[:8] + b"\xff" * 32 + data[40:])
    else:
        (job / "sampler" / "bad" / "config.json").unlink()
    rows = ck.list_checkpoints(job)
    assert [(r["id"], r["checkpointType"], r["promotable"]) for r in rows] == [("good", ck.INFERENCE_BASE, True)]


def test_restricted_unpickler_takes_plain_data():
    from workbench.checkpoints.safe_pickle import UnsafePickleError, loads_plain

    data = {"a": (1, 2), "b": [b"x", "y", 1.5, None, True], "c": {"d": 10**30}}
    assert loads_plain(pickle.dumps(data, protocol=5)) == data
    assert loads_plain(pickle.dumps(data, protocol=3)) == data
    for bad in (pickle.dumps(io.BytesIO(b"")), pickle.dumps(zlib.compress), b"not a pickle"):
        with pytest.raises(UnsafePickleError):
            loads_plain(bad)
