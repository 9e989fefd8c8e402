"""Weight files: safetensors (one file, or shards + `*.index.json`) and torch `.pt` / `.pth` / `.bin` (read with
`weights_only=True`), as one flat state dict `{name: tensor}` in the file's own key names."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Iterator, List

import torch

from osp_megatron.weights.paths import WeightsError

StateDict = Dict[str, torch.Tensor]
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (".safetensors",) + TORCH_SUFFIXES


def _load_torch(path: Path) -> StateDict:
    obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a flat dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


def _load_file(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in TORCH_SUFFIXES:
        return _load_torch(path)
    raise WeightsError(f"{path}: not a weights file (expected one of {', '.join(WEIGHT_SUFFIXES)})")


def weight_files(folder: Path) -> List[Path]:
    """The files holding one model in `folder`: the shards an index names, else its single weights file."""
    index = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.bin.index.json"))
    if index:
        names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise WeightsError(f"{index[0]} names shard {missing[0]}, which is missing in {folder}")
        return [folder / n for n in names]
    for suffixes in ((".safetensors",), TORCH_SUFFIXES):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)
        if len(files) == 1:
            return files
        if len(files) > 1:
            raise WeightsError(f"{folder}: {len(files)} weight files ({', '.join(p.name for p in files[:4])}) and no "
                               "*.index.json naming the shards; give the one file, or add the index")
    raise WeightsError(f"{folder}: no weights (*.safetensors, or a shard index, or one .pt/.pth/.bin file)")


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """A weights file, or a folder (index-aware: every shard an `*.index.json` names, checked complete)."""
    p = Path(path)
    if p.is_file():
        return _load_file(p)
    if not p.is_dir():
        raise WeightsError(f"{p}: no such file or folder")
    files = weight_files(p)
    sd: StateDict = {}
    for f in files:
        sd.update(_load_file(f))
    index = sorted(p.glob("*.index.json"))
    if index:
        missing = sorted(set(json.loads(index[0].read_text())["weight_map"]) - set(sd))
        if missing:
            raise WeightsError(f"{index[0]}: keys listed in the index but absent from the shards: {missing[:10]}")
    return sd


def weight_keys(path: Path) -> List[str]:
    """Tensor names of a weights file or folder without loading safetensors data (format detection)."""
    files = [path] if path.is_file() else weight_files(path)
    keys: List[str] = []
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt", device="cpu") as fh:
                keys += list(fh.keys())
        else:
            keys += list(_load_file(f))
    return keys


class LazySafetensors(Mapping):
    """Read-only mapping over a .safetensors file that loads a tensor only when it is looked up, so each rank
    holds one full tensor at a time (plus its shard of the model) instead of the whole model."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self._file = safe_open(path, framework="pt", device="cpu")
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._key_set


def save_safetensors_dir(sd: StateDict, path: str | os.PathLike, basename: str, max_shard_bytes: int = 5 * 2**30,
                         config: dict | None = None) -> None:
    """Write `basename.safetensors` (or shards + `basename.safetensors.index.json`) and config.json atomically
    (each file written to a temporary folder inside `path`, then renamed into place)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out))
    try:
        shards: List[Dict[str, torch.Tensor]] = [{}]
        size = 0
        for k in sorted(sd):
            t = sd[k].contiguous()
            nb = t.numel() * t.element_size()
            if shards[-1] and size + nb > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = t
            size += nb
        names = []
        if len(shards) == 1:
            names.append(f"{basename}.safetensors")
            save_file(shards[0], str(tmp / names[0]), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"{basename}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                names.append(name)
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in sd.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / f"{basename}.safetensors.index.json").write_text(json.dumps(index, indent=2))
            names.append(f"{basename}.safetensors.index.json")
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            names.append("config.json")
        for n in names:
            os.replace(tmp / n, out / n)
    finally:
        for f in tmp.glob("*"):
            f.unlink()
        tmp.rmdir()
