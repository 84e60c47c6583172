"""Reading pickles we did not write without running them: a plain-data unpickler and a DCP-metadata check.

A pickle is a program: GLOBAL/REDUCE opcodes import and call anything, so `pickle.loads` on bytes
from a file someone else could have written runs their code. Two formats workbench reads carry
pickles: arc_v3 delta patches (an envelope pickle around a compressed payload pickle) and DCP train
states (`.metadata`, which torch reads with `pickle.load`). Both are checked here first:

    data = loads_plain(blob)                 # dict/list/tuple/set of bytes, str, int, float, bool, None
    check_dcp_metadata(checkpoint_dir)       # raises UnsafePickleError unless only DCP's own classes appear

`loads_plain` refuses, before unpickling, every opcode that can name or call an object (GLOBAL,
STACK_GLOBAL, INST, OBJ, REDUCE, NEWOBJ, BUILD, EXT*, persistent ids); its unpickler's find_class
also refuses everything, so nothing is imported or called either way. `check_dcp_metadata` lets
through only the classes torch's DCP writes (its metadata dataclasses, torch.Size, torch dtypes,
torch's layout lookup, pathlib paths), each of which only stores its arguments.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path

import torch

__all__ = ["UnsafePickleError", "loads_plain", "check_dcp_metadata"]

# Opcodes that fetch or call objects; a plain-data pickle never needs one.
_CALLING_OPCODES = frozenset({
    "GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD",
    "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID",
})
_MAX_PICKLE_BYTES = 1 << 34   # a pickle larger than 16 GiB is refused outright (no such delta patch exists)


class UnsafePickleError(ValueError):
    """A pickle that would import or call something we do not allow (or is not a pickle at all)."""


def _scan(data: bytes, what: str) -> None:
    if len(data) > _MAX_PICKLE_BYTES:
        raise UnsafePickleError(f"{what}: pickle of {len(data)} bytes is too large")
    try:
        for opcode, _arg, _pos in pickletools.genops(data):
            if opcode.name in _CALLING_OPCODES:
                raise UnsafePickleError(f"{what}: pickle uses {opcode.name}, which can import or call code; "
                                        "only plain data (containers, bytes, str, numbers) is accepted")
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or not a pickle: genops raises ValueError and friends
        raise UnsafePickleError(f"{what}: not a readable pickle ({type(e).__name__}: {e})") from e


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # never reached after _scan; kept as the second lock
        raise UnsafePickleError(f"refusing to load {module}.{name} from a pickle")

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a persistent id in a pickle")


def loads_plain(data: bytes, what: str = "pickle"):
    """Unpickle `data` if it holds only plain data; UnsafePickleError (executing nothing) otherwise."""
    data = bytes(data)
    _scan(data, what)
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as e:
        raise UnsafePickleError(f"{what}: cannot unpickle ({type(e).__name__}: {e})") from e


_DCP_MODULES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if name in _DCP_MODULES.get(module, ()):
            return super().find_class(module, name)
        raise UnsafePickleError(f"DCP metadata names {module}.{name}, which a DCP checkpoint never holds")

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a persistent id in DCP metadata")


def check_dcp_metadata(directory: Path):
    """Unpickle `directory/.metadata` allowing only DCP's own classes; returns the Metadata object.

    Raises UnsafePickleError for anything else (nothing outside that list is imported or called) and
    FileNotFoundError if there is no .metadata.
    """
    path = Path(directory) / ".metadata"
    data = path.read_bytes()
    try:
        metadata = _DcpMetadataUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as e:
        raise UnsafePickleError(f"{path}: not readable DCP metadata ({type(e).__name__}: {e})") from e
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise UnsafePickleError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata
