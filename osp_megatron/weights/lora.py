"""LoRA adapters of osp-grpo checkpoints (or a plain file) as one full, unsharded adapter state dict.

osp-grpo writes torch_dist checkpoints `<run_dir>/grpo_checkpoints/iter_XXXXXXX/` (LoRA parameters, their Adam
state and EMA) with the full adapters as PEFT folders `adapter/` and `adapter_ema/` inside, and an atomic
`grpo_checkpoints/latest`; older runs wrote TP shard files `lora_tpNN.pt` (still read). Accepted paths: a GRPO run
dir, a folder with `latest`, an `iter_*` folder, or a single `.pt` / `.safetensors` file of adapter tensors.
Keys are `<module>.lora_A [r, in]`, `<module>.lora_B [out, r]`, `<module>.lora_scaling`; TP shards are joined:
column-parallel adapters (A spans the weight's full input width) concatenate B on dim 0, row-parallel ones A on
dim 1.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional

import torch

from osp_megatron.models.adapters import diffusers as dif
from osp_megatron.models.adapters.common import rename
from osp_megatron.weights.paths import WeightsError, read_latest

StateDict = Dict[str, torch.Tensor]
GRPO_CHECKPOINTS = "grpo_checkpoints"
ADAPTER, ADAPTER_EMA = "adapter", "adapter_ema"  # PEFT folders inside each GRPO checkpoint (live weights, EMA)


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


def read_shard(path: Path, ema: Optional[bool] = False) -> StateDict:
    """One adapter file: a GRPO shard (`lora`, with `ema=True` its `lora_ema` on top; `ema=None`: the EMA when
    the shard has one) or a plain tensor dict."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _strip(load_file(str(path)))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("lora"), dict):
        lora = dict(_tensors(obj["lora"], path))
        if ema is None:
            ema = bool(obj.get("lora_ema"))
        if ema:
            if not obj.get("lora_ema"):
                raise WeightsError(f"{path} has no LoRA EMA (the run had grpo.ema_decay=0): export without it")
            lora.update(_tensors(obj["lora_ema"], path))
        return _strip(lora)
    if ema:
        raise WeightsError(f"{path}: a plain adapter file has no LoRA EMA")  # (None: a plain file is what it is)
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


def _checkpoint_dir(p: Path) -> Path:
    if (p / GRPO_CHECKPOINTS / "latest").is_file():
        p = p / GRPO_CHECKPOINTS
    return read_latest(p) or p


def read_lora(path: str, weights: StateDict, ema: Optional[bool] = None) -> StateDict:
    """Full adapter state dict (our module names, no `module.` prefix) for the full model `weights`.

    `path`: a PEFT folder (`adapter_model.safetensors` + `adapter_config.json`), a GRPO run dir / folder with
    `latest` / `iter_*` folder (its `adapter_ema/` or `adapter/`), TP shard files `lora_tpNN.pt`, or one
    `.pt` / `.safetensors` file. `ema`: None takes the LoRA EMA when the checkpoint has one (the recommended
    export), True requires it, False takes the live weights."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"LoRA {path}: does not exist")
    if p.is_file():
        sd = read_shard(p, ema)
    elif (p / PEFT_CONFIG).is_file():
        sd = read_peft_adapter(p)
    else:
        ckpt = _checkpoint_dir(p)
        if (ckpt / ADAPTER).is_dir():
            has_ema = (ckpt / ADAPTER_EMA).is_dir()
            if ema and not has_ema:
                raise WeightsError(f"LoRA {path}: no {ADAPTER_EMA}/ (the run had grpo.ema_decay=0): take the live "
                                   "adapters instead")
            sd = read_peft_adapter(ckpt / (ADAPTER_EMA if has_ema and ema is not False else ADAPTER))
        else:
            sd = join_tp_shards([read_shard(f, ema) for f in shard_files(p)], weights)
    if not any(k.endswith(".lora_A") for k in sd):
        raise WeightsError(f"LoRA {path}: no `*.lora_A` tensors inside")
    return sd


# --------------------------------------------------------------------------------------------
# PEFT adapter folders (adapter_model.safetensors + adapter_config.json, diffusers module names)
# --------------------------------------------------------------------------------------------
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def _module_rename(module: str, to_diffusers: bool) -> str:
    rules = dif._TO_DIFFUSERS if to_diffusers else dif._TO_OURS
    return next(iter(rename({f"{module}.weight": None}, rules, "LoRA adapter names")))[: -len(".weight")]


def to_peft(adapters: StateDict) -> tuple:
    """Our full adapters -> (PEFT tensors `base_model.model.<diffusers module>.lora_{A,B}.weight`, the diffusers
    module names, r, alpha). One rank and scaling for all modules (as grpo.lora sets them)."""
    tensors: StateDict = {}
    modules, ranks, scalings = [], set(), set()
    for key in sorted(adapters):
        if not key.endswith(".lora_A"):
            continue
        ours = key[: -len(".lora_A")]
        name = _module_rename(ours, to_diffusers=True)
        a, b = adapters[key], adapters[f"{ours}.lora_B"]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().float().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().float().contiguous()
        modules.append(name)
        ranks.add(int(a.shape[0]))
        scalings.add(round(float(adapters.get(f"{ours}.lora_scaling", torch.tensor(1.0))), 12))
    if len(ranks) != 1 or len(scalings) != 1:
        raise WeightsError(f"LoRA export: adapters of ranks {sorted(ranks)} and scalings {sorted(scalings)}; a PEFT "
                           "folder holds one rank and alpha")
    r = ranks.pop()
    return tensors, modules, r, scalings.pop() * r


def write_peft_adapter(adapters: StateDict, folder, init: str = "gaussian", extra: Dict = None) -> Path:
    """Write full (TP-joined) adapters as a PEFT folder that `peft.PeftModel.from_pretrained(<diffusers
    WanTransformer3DModel>, folder)` loads; atomic (temp folder, then rename)."""
    import json
    import os
    import shutil

    from safetensors.torch import save_file

    tensors, modules, r, alpha = to_peft(adapters)
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "r": r, "lora_alpha": alpha,
              "lora_dropout": 0.0, "bias": "none", "target_modules": modules, "fan_in_fan_out": False,
              "init_lora_weights": init, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}}
    if extra:
        config.update(extra)
    final = Path(folder)
    tmp = final.with_name(f".tmp_{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def read_peft_adapter(folder) -> StateDict:
    """A PEFT adapter folder (diffusers module names) -> our full adapters (`lora_A`, `lora_B`, `lora_scaling`)."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / PEFT_CONFIG).read_text())
    if config.get("use_rslora") or config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise WeightsError(f"LoRA {folder}: rsLoRA / DoRA / per-module rank or alpha patterns are not supported")
    scaling = torch.tensor(float(config["lora_alpha"]) / float(config["r"]))
    out: StateDict = {}
    for key, value in load_file(str(folder / PEFT_WEIGHTS)).items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for part in ("lora_A", "lora_B"):
            if name.endswith(f".{part}.weight") or name.endswith(f".{part}.default.weight"):
                module = name.rsplit(f".{part}.", 1)[0]
                ours = _module_rename(module, to_diffusers=False)
                out[f"{ours}.{part}"] = value
                out[f"{ours}.lora_scaling"] = scaling
                break
        else:
            raise WeightsError(f"LoRA {folder}: unexpected tensor {key!r} (only lora_A / lora_B weights)")
    return out
