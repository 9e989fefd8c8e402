"""Shared pieces of the state-dict adapters: key maps, strict checking, safetensors (sharded) I/O."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
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
        lines.append("  check the model size/num_layers and the source format (--from diffusers|wan|megatron)")
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


# ------------------------------------------------------------------ safetensors I/O
def load_safetensors_dir(path: str | os.PathLike) -> StateDict:
    """A .safetensors file, or a folder with one file or a sharded `*.safetensors.index.json`."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_file():
        return load_file(str(p))
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or folder (expected safetensors weights)")
    index = sorted(p.glob("*.safetensors.index.json"))
    if index:
        meta = json.loads(index[0].read_text())
        files = sorted(set(meta["weight_map"].values()))
        sd: StateDict = {}
        for f in files:
            if not (p / f).is_file():
                raise FileNotFoundError(f"{index[0]} names shard {f}, which is missing in {p}")
            sd.update(load_file(str(p / f)))
        missing = sorted(set(meta["weight_map"]) - set(sd))
        if missing:
            raise StateDictMismatch(f"{index[0]}: keys listed in the index but absent from the shards: {missing[:10]}")
        return sd
    files = sorted(p.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{p}: expected one .safetensors file or a *.safetensors.index.json, found {len(files)}")
    return load_file(str(files[0]))


def save_safetensors_dir(sd: StateDict, path: str | os.PathLike, basename: str, max_shard_bytes: int = 5 * 2**30,
                         config: dict | None = None) -> None:
    """Write `basename.safetensors` (or shards + index) and config.json atomically into folder `path`."""
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
