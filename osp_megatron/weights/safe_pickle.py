"""Checkpoints are data, not code: torch DCP's `.metadata` through a restricted unpickler.

torch's `FileSystemReader.read_metadata` (used by megatron's torch_dist loader and by torch DCP) unpickles
`<checkpoint>/.metadata` with plain `pickle.load`, so a crafted file runs code on load (a recomputed CRC in our
marker does not help). `install()` replaces the `pickle` that torch's filesystem module uses by a namespace
whose `load` admits only the classes a DCP metadata file is made of (the dataclasses of
`torch.distributed.checkpoint.metadata` / `planner` / `filesystem`, `torch.Size`, dtypes, layouts, memory
formats, and a few containers); anything else raises `UnsafeCheckpointError` naming the class. The other
pickle-based files of our checkpoints are read with `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import torch

_ALLOWED_MODULES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorProperties", "StorageMeta", "ChunkStorageMetadata", "TensorStorageMetadata",
        "MetadataIndex", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                             "LoadPlan", "ReadItem", "LoadItemType"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict", "defaultdict"},
    "builtins": {"set", "frozenset", "slice", "complex"},
    "pathlib": {"PosixPath", "PurePosixPath"},
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asks to load a class that the format does not use (refused, nothing executed)."""


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP metadata file needs (see module doc)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch":
            value = getattr(torch, name, None)
            if name == "Size" or isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        elif name in _ALLOWED_MODULES.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load {module}.{name} from a checkpoint file: DCP metadata holds only torch's checkpoint "
            "dataclasses (a crafted or foreign file?); load only checkpoints you trust")


def restricted_load(file: BinaryIO, **_kwargs) -> Any:
    return RestrictedUnpickler(file).load()


def load_dcp_metadata(path: str | Path) -> Any:
    """Unpickle a `.metadata` file with the restricted unpickler."""
    with open(path, "rb") as fh:
        return restricted_load(io.BufferedReader(fh))


class _SafePickle:
    """Stands in for the `pickle` module inside torch's DCP filesystem module: restricted loads, normal dumps."""

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    @staticmethod
    def load(file, **kwargs):
        return restricted_load(file, **kwargs)

    @staticmethod
    def loads(data, **kwargs):
        return restricted_load(io.BytesIO(data), **kwargs)


def _load_bytes_weights_only(self, read_item, value) -> None:
    """DefaultLoadPlanner.load_bytes with `torch.load(..., weights_only=True)` (torch's uses weights_only=False)."""
    obj = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        from torch.distributed.checkpoint._traverse import set_element

        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


def install() -> None:
    """Make every DCP read in this process data-only (idempotent): `.metadata` through the restricted
    unpickler, byte items (python objects inside `.distcp` files) through `torch.load(weights_only=True)`."""
    from torch.distributed.checkpoint import default_planner, filesystem

    if not isinstance(getattr(filesystem, "pickle", None), _SafePickle):
        filesystem.pickle = _SafePickle()
    if default_planner.DefaultLoadPlanner.load_bytes is not _load_bytes_weights_only:
        default_planner.DefaultLoadPlanner.load_bytes = _load_bytes_weights_only
