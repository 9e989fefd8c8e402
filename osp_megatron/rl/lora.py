"""LoRA adapters on linear layers (plain `nn.Linear`, megatron `ColumnParallelLinear` / `RowParallelLinear`).

`apply_lora(model, rank, alpha, targets)` adds to every matching linear two fp32 parameters `lora_A [r, in]`,
`lora_B [out, r]` (B = 0, so the model is unchanged at start) and a buffer `lora_scaling = alpha / r`, and a
forward hook that adds `scaling · B(A(x))` to the output (to `out` of megatron's `(out, bias)`). The base weights
and their state-dict keys are untouched; LoRA keys are `<module>.lora_A`, `<module>.lora_B`, `<module>.lora_scaling`.

Tensor parallel (TP > 1, without sequence parallel):
- Column (weight sharded on out): A replicated, B sharded on out. `delta = B_local · copy_to_tp(A·x)`; the
  copy's backward all-reduces dL/d(Ax), so A's gradient is complete and identical on every TP rank.
- Row (weight sharded on in, `input_is_parallel`): A sharded on in, B replicated. `h = reduce_from_tp(A_local·x_local)`
  (the r-wide partial sums are all-reduced), `delta = B·h` is added after megatron's row reduce.
A is drawn from one seeded generator over the full shape and sliced, so TP=2 starts equal to TP=1.
A TP-split adapter carries megatron's `tensor_model_parallel` / `partition_dim` attributes (the shared grad norm
counts it on every TP rank, a replicated one once) and enters the layer's `sharded_state_dict` as a TP-sharded
tensor on that dim, so torch_dist checkpoints store the full adapter once.

`lora_disabled(model)` turns every adapter off (KL reference); `merge_lora(state_dict)` folds the adapters into the
weights for export (per TP shard); `lora_state_dict` / `load_lora_state_dict` carry only adapter tensors.
"""
from __future__ import annotations

import contextlib
import math
import re
import types
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor
LORA_KEYS = ("lora_A", "lora_B", "lora_scaling")


def _megatron_layers():
    try:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    except ImportError:  # pragma: no cover - megatron-core is a hard dependency
        return None, None
    return ColumnParallelLinear, RowParallelLinear


def _kind(module: nn.Module) -> Optional[str]:
    col, row = _megatron_layers()
    if col is not None and isinstance(module, col):
        return "column"
    if row is not None and isinstance(module, row):
        return "row"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _looks_linear(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Linear" in name


def _tp(module: nn.Module):
    group = getattr(module, "tp_group", None)
    if group is None:
        return None, 1, 0
    return group, group.size(), group.rank()


def _init_a(rank: int, in_features: int, seed: int, init: str = "kaiming") -> Tensor:
    """A `[r, in]` from a seeded CPU generator (same on every rank): `kaiming` = Kaiming-uniform(a=sqrt(5)) like
    nn.Linear / PEFT's default, `gaussian` = N(0, 1/r) like PEFT's `init_lora_weights="gaussian"`."""
    gen = torch.Generator().manual_seed(seed)
    if init == "gaussian":
        return torch.randn(rank, in_features, generator=gen, dtype=torch.float32) / rank
    if init != "kaiming":
        raise ValueError(f"LoRA init {init!r}: use kaiming or gaussian (grpo.lora.init)")
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=gen, dtype=torch.float32) * 2 - 1) * bound


def _add_adapter(module: nn.Module, kind: str, rank: int, alpha: float, seed: int, dropout: float,
                 init: str = "kaiming") -> None:
    weight = module.weight
    group, tp, tp_rank = _tp(module) if kind != "linear" else (None, 1, 0)
    out_local, in_local = weight.shape
    if kind == "column":
        if tp > 1 and getattr(module, "sequence_parallel", False):
            raise NotImplementedError("LoRA on ColumnParallelLinear with sequence_parallel=True is not supported: "
                                      "set parallel.sequence_parallel=false for GRPO")
        if tp > 1 and getattr(module, "gather_output", False):
            raise NotImplementedError("LoRA on ColumnParallelLinear(gather_output=True) with TP > 1 is not supported")
        a = _init_a(rank, in_local, seed, init)
        b = torch.zeros(out_local, rank)
    elif kind == "row":
        if tp > 1 and (getattr(module, "sequence_parallel", False) or not getattr(module, "input_is_parallel", True)):
            raise NotImplementedError("LoRA on RowParallelLinear needs input_is_parallel=True and no sequence "
                                      "parallel when TP > 1: set parallel.sequence_parallel=false for GRPO")
        a = _init_a(rank, in_local * tp, seed, init)[:, tp_rank * in_local:(tp_rank + 1) * in_local].contiguous()
        b = torch.zeros(out_local, rank)
    else:
        a = _init_a(rank, in_local, seed, init)
        b = torch.zeros(out_local, rank)
    device = weight.device
    module.lora_A = nn.Parameter(a.to(device))
    module.lora_B = nn.Parameter(b.to(device))
    module.register_buffer("lora_scaling", torch.tensor(float(alpha) / rank, device=device))
    module.lora_A.lora_tp_split = "none" if kind != "row" or tp == 1 else "in"
    module.lora_B.lora_tp_split = "out" if kind == "column" and tp > 1 else "none"
    if tp > 1:
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        split = module.lora_B if kind == "column" else module.lora_A
        set_tensor_model_parallel_attributes(split, True, 0 if kind == "column" else 1, 1)
        module.sharded_state_dict = types.MethodType(_sharded_state_dict, module)
    module._lora_kind = kind
    module._lora_enabled = True
    module._lora_dropout = float(dropout)
    module._lora_handle = module.register_forward_hook(_lora_hook, with_kwargs=True)


def _sharded_state_dict(module: nn.Module, prefix: str = "", sharded_offsets=(), metadata=None):
    """The TP layer's sharded state with its split adapter sharded like the weight (column: B on dim 0, row: A
    on dim 1); the replicated adapter and `lora_scaling` stay replicated."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    axes = {"weight": 0, "bias": 0, "lora_B": 0} if module._lora_kind == "column" else {"weight": 1, "lora_A": 1}
    return make_sharded_tensors_for_checkpoint(module.state_dict(prefix="", keep_vars=True), prefix, axes,
                                               sharded_offsets, tp_group=module.tp_group,
                                               dp_cp_group=(metadata or {}).get("dp_cp_group"))


def _lora_delta(module: nn.Module, x: Tensor) -> Tensor:
    kind = module._lora_kind
    a = module.lora_A.to(x.dtype)
    b = module.lora_B.to(x.dtype)
    if module._lora_dropout > 0:
        x = F.dropout(x, module._lora_dropout, module.training)
    h = F.linear(x, a)
    group, tp, _ = _tp(module) if kind != "linear" else (None, 1, 0)
    if tp > 1:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        if kind == "column":
            h = copy_to_tensor_model_parallel_region(h, group=group)
        else:
            h = reduce_from_tensor_model_parallel_region(h, group=group)
    return F.linear(h, b) * module.lora_scaling.to(x.dtype)


def _lora_hook(module: nn.Module, args, kwargs, output):
    if not module._lora_enabled:
        return output
    x = args[0] if args else kwargs.get("input_", kwargs.get("input"))
    if isinstance(output, tuple):
        out, *rest = output
        return (out + _lora_delta(module, x).to(out.dtype), *rest)
    return output + _lora_delta(module, x).to(output.dtype)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str], seed: int = 0,
               dropout: float = 0.0, init: str = "kaiming") -> List[str]:
    """Add adapters to every linear whose qualified name matches one of the `targets` regexes (re.search).

    Freezes all other parameters. Returns the adapted module names; raises if none matched or a matching
    linear-like module is of an unsupported type (e.g. TransformerEngine layers).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank={rank}: must be >= 1")
    patterns = [re.compile(t) for t in targets]
    names: List[str] = []
    for name, module in model.named_modules():
        if not name or not any(p.search(name) for p in patterns):
            continue
        kind = _kind(module)
        if kind is None:
            if _looks_linear(module) and not list(module.children()):
                raise NotImplementedError(
                    f"LoRA target {name!r} is a {type(module).__name__}: only nn.Linear, ColumnParallelLinear and "
                    "RowParallelLinear are supported (use model.spec=local for GRPO)")
            continue
        if hasattr(module, "lora_A"):
            continue
        _add_adapter(module, kind, rank, alpha, seed + len(names), dropout, init)
        names.append(name)
    if not names:
        linears = [n for n, m in model.named_modules() if _kind(m) is not None][:12]
        raise ValueError(f"LoRA targets {list(targets)} matched no linear layer; linear names look like {linears}: "
                         "adjust grpo.lora.targets")
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.endswith(".lora_A") or pname.endswith(".lora_B"))
    return names


def lora_modules(model: nn.Module) -> Iterator[nn.Module]:
    for m in model.modules():
        if hasattr(m, "_lora_kind"):
            yield m


def lora_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith(".lora_A") or n.endswith(".lora_B")]


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model (adapters off) inside the block, e.g. for the KL reference."""
    mods = list(lora_modules(model))
    saved = [m._lora_enabled for m in mods]
    for m in mods:
        m._lora_enabled = False
    try:
        yield model
    finally:
        for m, s in zip(mods, saved):
            m._lora_enabled = s


def lora_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """Only the adapter tensors (`*.lora_A`, `*.lora_B`, `*.lora_scaling`), detached CPU copies."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in LORA_KEYS}


def load_lora_state_dict(model: nn.Module, state: Dict[str, Tensor]) -> None:
    own = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in LORA_KEYS}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"LoRA state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]} "
                       "(same grpo.lora.targets/rank as the checkpoint?)")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"LoRA tensor {k}: checkpoint shape {tuple(v.shape)} != model {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


def merge_lora(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Fold adapters into the weights: `W += scaling · B @ A` (fp32 math, W's dtype kept); drops LoRA keys.

    Works on a full state dict or one TP shard's (Column: B and W sharded on out; Row: A and W sharded on in).
    """
    out = {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] not in LORA_KEYS}
    for key in state_dict:
        if not key.endswith(".lora_A"):
            continue
        prefix = key[: -len(".lora_A")]
        wkey = f"{prefix}.weight"
        if wkey not in state_dict or f"{prefix}.lora_B" not in state_dict:
            raise KeyError(f"merge_lora: {key} has no matching {wkey} / {prefix}.lora_B in the state dict")
        a = state_dict[key].float()
        b = state_dict[f"{prefix}.lora_B"].float()
        scaling = float(state_dict.get(f"{prefix}.lora_scaling", torch.tensor(1.0)))
        w = state_dict[wkey]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(f"merge_lora: {prefix}: B@A is {(b.shape[0], a.shape[1])} but weight is {tuple(w.shape)}")
        out[wkey] = (w.float() + scaling * (b @ a)).to(w.dtype)
    return out


def full_adapters(model: nn.Module, tensors: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
    """The adapters (or `tensors`, e.g. their EMA, keyed like `<module>.lora_A`) with TP shards joined into the
    full shapes: column-parallel B gathered on dim 0, row-parallel A on dim 1 (a collective over each module's TP
    group: every TP rank calls it). CPU float32 copies, plus `<module>.lora_scaling`."""
    import torch.distributed as dist

    own = dict(model.named_parameters())
    out: Dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if not hasattr(module, "_lora_kind"):
            continue
        group, tp, _ = _tp(module) if module._lora_kind != "linear" else (None, 1, 0)
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}"
            t = (tensors[key] if tensors is not None else own[key]).detach().float()
            split = getattr(own[key], "lora_tp_split", "none")
            if tp > 1 and split != "none":
                pieces = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(pieces, t.contiguous(), group=group)
                t = torch.cat(pieces, 0 if split == "out" else 1)
            out[key] = t.cpu().clone()
        out[f"{name}.lora_scaling"] = module.lora_scaling.detach().float().cpu().clone()
    return out
