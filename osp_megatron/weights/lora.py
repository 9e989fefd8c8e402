"""LoRA adapters of osp-grpo checkpoints (or a plain file) as one full, unsharded adapter state dict.

osp-grpo writes `<run_dir>/grpo_checkpoints/iter_XXXXXXX/lora_tpNN.pt` (one per TP rank: {"lora": {...},
"optimizer": ..., "lora_ema": {...} | None}) and an atomic `grpo_checkpoints/latest`. Accepted paths: a GRPO run
dir, a folder with `latest`, an `iter_*` folder, or a single `.pt` / `.safetensors` file of adapter tensors.
Keys are `<module>.lora_A [r, in]`, `<module>.lora_B [out, r]`, `<module>.lora_scaling`; TP shards are joined:
column-parallel adapters (A spans the weight's full input width) concatenate B on dim 0, row-parallel ones A on
dim 1.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

import torch

from osp_megatron.weights.paths import WeightsError, read_latest

StateDict = Dict[str, torch.Tensor]
GRPO_CHECKPOINTS = "grpo_checkpoints"


def shard_name(tp_rank: int) -> str:
    """File of one TP rank's adapters inside a GRPO checkpoint directory."""
    return f"lora_tp{tp_rank:02d}.pt"


def _strip(sd: StateDict) -> StateDict:
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def _tensors(obj, path: Path) -> StateDict:
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"LoRA {path}: expected a dict of adapter tensors (or {{'lora': ...}})")
    return obj


def read_shard(path: Path, ema: bool = False) -> StateDict:
    """One adapter file: a GRPO shard (`lora`, with `ema=True` its `lora_ema` on top) or a plain tensor dict."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _strip(load_file(str(path)))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("lora"), dict):
        lora = dict(_tensors(obj["lora"], path))
        if ema:
            if not obj.get("lora_ema"):
                raise WeightsError(f"{path} has no LoRA EMA (the run had grpo.ema_decay=0): export without it")
            lora.update(_tensors(obj["lora_ema"], path))
        return _strip(lora)
    if ema:
        raise WeightsError(f"{path}: a plain adapter file has no LoRA EMA")
    return _strip(_tensors(obj, path))


def shard_files(path: Path) -> List[Path]:
    """`lora_tpNN.pt` files (ranks 0..N-1) of a GRPO run dir, a folder with `latest` or an `iter_*` folder."""
    p = path
    if (p / GRPO_CHECKPOINTS / "latest").is_file():
        p = p / GRPO_CHECKPOINTS
    p = read_latest(p) or p
    files = sorted(p.glob("lora_tp*.pt"))
    if not files:
        raise WeightsError(f"LoRA {path}: no lora_tpNN.pt files (give a GRPO run/iter folder or a .pt/.safetensors)")
    ranks = [int(re.search(r"lora_tp(\d+)", f.name).group(1)) for f in files]
    if ranks != list(range(len(files))):
        raise WeightsError(f"LoRA {path}: TP shard files {[f.name for f in files]} are not 0..N-1")
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
            raise WeightsError(f"LoRA {prefix}: no weight {prefix}.weight in the model (different model?)")
        a = [s[key] for s in shards]
        b = [s[f"{prefix}.lora_B"] for s in shards]
        if a[0].shape[1] == w.shape[1]:  # column parallel: A replicated, B sharded on out
            out[key], out[f"{prefix}.lora_B"] = a[0], torch.cat(b, 0)
        else:  # row parallel: A sharded on in, B replicated
            out[key], out[f"{prefix}.lora_B"] = torch.cat(a, 1), b[0]
        if f"{prefix}.lora_scaling" in shards[0]:
            out[f"{prefix}.lora_scaling"] = shards[0][f"{prefix}.lora_scaling"]
    return out


def read_lora(path: str, weights: StateDict, ema: bool = False) -> StateDict:
    """Full adapter state dict (our module names, no `module.` prefix) for the full model `weights`;
    `ema=True` takes the LoRA EMA of a GRPO checkpoint."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"LoRA {path}: does not exist")
    if p.is_file():
        sd = read_shard(p, ema)
    else:
        sd = join_tp_shards([read_shard(f, ema) for f in shard_files(p)], weights)
    if not any(k.endswith(".lora_A") for k in sd):
        raise WeightsError(f"LoRA {path}: no `*.lora_A` tensors inside")
    return sd
