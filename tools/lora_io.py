"""Read LoRA adapters (from osp-grpo or a plain file) as one full, unsharded adapter state dict.

Accepted `--lora` paths: a GRPO run dir (`grpo_checkpoints/latest`), a folder with `latest`, an `iter_*` folder
(`lora_tpNN.pt`, one per TP rank: {"lora": {...}}), or a single `.pt` / `.safetensors` file of adapter tensors.
Keys are `<module>.lora_A [r, in]`, `<module>.lora_B [out, r]`, `<module>.lora_scaling`; TP shards are joined:
column-parallel adapters (A spans the weight's full input width) concatenate B on dim 0, row-parallel ones
A on dim 1.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

import torch

StateDict = Dict[str, torch.Tensor]


class LoraFormatError(ValueError):
    """Unusable LoRA input; the message names the path and the fix."""


def _strip(sd: StateDict) -> StateDict:
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def _load_file(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "lora" in obj and isinstance(obj["lora"], dict):
        obj = obj["lora"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoraFormatError(f"--lora {path}: expected a dict of adapter tensors (or {{'lora': ...}})")
    return obj


def _shard_files(path: Path) -> List[Path]:
    p = path
    if (p / "grpo_checkpoints" / "latest").is_file():
        p = p / "grpo_checkpoints"
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    files = sorted(p.glob("lora_tp*.pt"))
    if not files:
        raise LoraFormatError(f"--lora {path}: no lora_tpNN.pt files (give a GRPO run/iter folder or a .pt/.safetensors)")
    return files


def join_tp_shards(shards: List[StateDict], weights: StateDict) -> StateDict:
    """Per-TP-rank adapter dicts -> full adapters, using the full weights' shapes [out, in] to tell
    column-parallel (A spans the full input: join B on dim 0) from row-parallel (join A on dim 1)."""
    if len(shards) == 1:
        return dict(shards[0])
    out: StateDict = {}
    for key in shards[0]:
        if not key.endswith(".lora_A"):
            continue
        prefix = key[: -len(".lora_A")]
        w = weights.get(f"{prefix}.weight")
        if w is None:
            raise LoraFormatError(f"LoRA {prefix}: no weight {prefix}.weight in the model (different model?)")
        a = [s[key] for s in shards]
        b = [s[f"{prefix}.lora_B"] for s in shards]
        if a[0].shape[1] == w.shape[1]:  # column parallel: A replicated, B sharded on out
            out[key], out[f"{prefix}.lora_B"] = a[0], torch.cat(b, 0)
        else:  # row parallel: A sharded on in, B replicated
            out[key], out[f"{prefix}.lora_B"] = torch.cat(a, 1), b[0]
        if f"{prefix}.lora_scaling" in shards[0]:
            out[f"{prefix}.lora_scaling"] = shards[0][f"{prefix}.lora_scaling"]
    return out


def read_lora(path: str, weights: StateDict) -> StateDict:
    """Full adapter state dict (our module names, no `module.` prefix) for the full model `weights`."""
    p = Path(path)
    if not p.exists():
        raise LoraFormatError(f"--lora {path}: does not exist")
    if p.is_file():
        sd = _strip(_load_file(p))
    else:
        files = _shard_files(p)
        ranks = [int(re.search(r"lora_tp(\d+)", f.name).group(1)) for f in files]
        if ranks != list(range(len(files))):
            raise LoraFormatError(f"--lora {path}: TP shard files {[f.name for f in files]} are not 0..N-1")
        sd = join_tp_shards([_strip(_load_file(f)) for f in files], weights)
    if not any(k.endswith(".lora_A") for k in sd):
        raise LoraFormatError(f"--lora {path}: no `*.lora_A` tensors inside")
    return sd
