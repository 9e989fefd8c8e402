"""Shared pieces of the state-dict adapters: key maps and strict checking (file I/O: `osp_megatron.weights`)."""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Tuple

import torch

StateDict = Dict[str, torch.Tensor]


class StateDictMismatch(KeyError):
    """Missing or unexpected keys when converting/loading weights (the message lists them)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def our_keys(num_layers: int) -> List[str]:
    """Every parameter name of the (unsharded, single-stage) OSPNextDiT, in a stable order."""
    keys = ["patch_embedding.weight", "patch_embedding.bias"]
    for m in ("time_embedding.linear_1", "time_embedding.linear_2", "time_projection",
              "text_embedding.linear_1", "text_embedding.linear_2"):
        keys += [f"{m}.weight", f"{m}.bias"]
    for i in range(num_layers):
        p = f"blocks.{i}."
        for a in ("self_attention", "cross_attention"):
            for lin in ("linear_q", "linear_k", "linear_v", "linear_proj"):
                keys += [f"{p}{a}.{lin}.weight", f"{p}{a}.{lin}.bias"]
            keys += [f"{p}{a}.q_norm.weight", f"{p}{a}.k_norm.weight"]
        keys += [f"{p}norm2.weight", f"{p}norm2.bias", f"{p}mlp.linear_fc1.weight", f"{p}mlp.linear_fc1.bias",
                 f"{p}mlp.linear_fc2.weight", f"{p}mlp.linear_fc2.bias", f"{p}modulation"]
    keys += ["head.modulation", "head.linear.weight", "head.linear.bias"]
    return keys


def check_keys(got: Iterable[str], expected: Iterable[str], what: str) -> None:
    got, expected = set(got), set(expected)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        lines = [f"{what}: state dict does not match the model"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
        lines.append("  check the model size/num_layers and the source format (diffusers, wan, osp-next, megatron)")
        raise StateDictMismatch("\n".join(lines))


def rename(sd: StateDict, rules: List[Tuple[str, str]], what: str) -> StateDict:
    """Apply regex rename rules (first match wins); a key no rule matches is an error."""
    out: StateDict = {}
    unmatched = []
    for k, v in sd.items():
        for pat, rep in rules:
            if re.fullmatch(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            unmatched.append(k)
    if unmatched:
        raise StateDictMismatch(f"{what}: unexpected keys with no mapping: {', '.join(sorted(unmatched)[:20])}")
    return out


def num_layers_in(sd: StateDict, prefix: str = "blocks.") -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def import_state_dict(state_dict: StateDict, rules, model_config, what: str) -> StateDict:
    """External keys -> our full keys via `rules`; Conv3d patch weight -> Linear [C, in*pt*ph*pw]; strict."""

    layers = model_config.resolve().num_layers
    out = rename(state_dict, rules, what)
    w = out.get("patch_embedding.weight")
    if w is not None and w.dim() == 5:
        out["patch_embedding.weight"] = w.reshape(w.shape[0], -1)
    check_keys(out, our_keys(layers), f"{what} ({num_layers_in(state_dict)} blocks in the file, {layers} in the model)")
    return out


def export_state_dict(state_dict: StateDict, rules, model_config, what: str) -> StateDict:
    """Our full keys -> external keys via `rules`; Linear patch weight back to Conv3d [C, in, pt, ph, pw]; strict."""

    d = model_config.resolve()
    check_keys(state_dict, our_keys(d.num_layers), what)
    out = rename(state_dict, rules, what)
    w = out["patch_embedding.weight"]
    out["patch_embedding.weight"] = w.reshape(w.shape[0], d.in_channels, *d.patch_size)
    return out
