"""Megatron `torch_dist` checkpoints <-> full (unsharded) state dicts in our parameter names.

Reading needs no model: the tensors' global shapes are in the checkpoint metadata, so any TP/PP/CP layout the
checkpoint was written with loads as full tensors (model weights `blocks.3.mlp.linear_fc1.weight`, EMA weights
under `ema.`; optimizer state is never read). The model config comes from the checkpoint's common state
(`osp.config_yaml`, written by osp-train and by osp-convert).

Writing builds the model at the requested layout (TP x PP x SSP x Ulysses processes, gloo on CPU), gives each
rank its slice of the full weights (`load_full_state_dict`) and saves with megatron dist_checkpointing through
`training.checkpoint.Checkpointer`: OUT/step_XXXXXXX/ (+ completion marker) and an atomic OUT/latest. The result
loads with `train.init_from=OUT` and with `osp-convert --from megatron`, under any layout.
"""
from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

StateDict = Dict[str, torch.Tensor]


class MegatronFormatError(ValueError):
    """Not a usable megatron checkpoint; the message names the path and the fix."""


def find_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A run dir (`checkpoints/latest`), a dir with `latest`, or a step dir -> the step dir."""
    p = Path(path)
    if (p / "checkpoints" / "latest").is_file():
        p = p / "checkpoints"
    if (p / "latest").is_file():
        name = (p / "latest").read_text().strip()
        step = p / name
        if not step.is_dir():
            raise MegatronFormatError(f"{p / 'latest'} names {name!r}, which does not exist; fix or remove the pointer")
        return step
    if (p / "metadata.json").is_file():
        return p
    raise MegatronFormatError(
        f"--input {path}: not a megatron checkpoint (expected a run dir with checkpoints/latest, a folder with "
        "`latest`, or a step_* folder with metadata.json)"
    )


def _ensure_world() -> None:
    from osp_megatron import cpu_shims
    from osp_megatron.parallel import ParallelState

    cpu_shims.apply()
    ParallelState.single()


def read_model_config(ckpt_dir: Path):
    """ModelConfig stored in the checkpoint's common state (`osp.config_yaml`)."""
    import yaml
    from megatron.core import dist_checkpointing

    from osp_megatron.config import config_from_dict

    common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    osp = common.get("osp") or {}
    if "config_yaml" not in osp:
        raise MegatronFormatError(f"{ckpt_dir}: no osp.config_yaml in the checkpoint's common state; it was not "
                                  "written by osp-train or osp-convert, so the model size is unknown")
    cfg = config_from_dict(yaml.safe_load(osp["config_yaml"]))
    return cfg.model, osp


def read_megatron(path: str | os.PathLike, ema: bool = False) -> Tuple[StateDict, Any, Dict[str, Any]]:
    """(full state dict in our names, ModelConfig, osp common dict) from a torch_dist checkpoint."""
    from megatron.core import dist_checkpointing

    from osp_megatron.models.adapters.common import our_keys

    _ensure_world()
    ckpt = find_checkpoint_dir(path)
    model_config, osp = read_model_config(ckpt)
    names = our_keys(model_config.resolve().num_layers)
    prefix = "ema." if ema else ""
    meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    wanted = {prefix + n for n in names}
    missing = sorted(wanted - set(meta))
    if missing:
        hint = ("the run had no EMA (train.ema_decay=0): drop --ema" if ema and all(not k.startswith("ema.") for k in meta)
                else "the checkpoint does not match its stored model config")
        raise MegatronFormatError(f"{ckpt}: {len(missing)} weights missing, e.g. {missing[:3]}; {hint}")
    loaded = dist_checkpointing.load({k: meta[k] for k in sorted(wanted)}, str(ckpt), validate_access_integrity=False)
    sd = {k[len(prefix):]: v for k, v in loaded.items() if k in wanted}
    return sd, model_config, osp


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_rank(rank: int, world: int, port: int, weights_file: str, model_config, layout: Dict[str, int],
               out: str, step: int, osp: Dict[str, Any], dtype: str) -> None:
    """One rank of the layout: build its shard of the model, load its slice, save collectively."""
    import torch.distributed as dist

    from osp_megatron import cpu_shims
    from osp_megatron.config import ParallelConfig
    from osp_megatron.models import build_model
    from osp_megatron.models.transformer_config import make_osp_config
    from osp_megatron.parallel import initialize_parallel
    from osp_megatron.training.checkpoint import Checkpointer

    torch.set_num_threads(1)
    cpu_shims.apply()
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    pcfg = ParallelConfig(tensor_parallel=layout["tp"], pipeline_parallel=layout["pp"], ssp=layout["ssp"],
                          ulysses=layout["ulysses"])
    ps = initialize_parallel(pcfg)
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = build_model(make_osp_config(model_config, pcfg, None, tdtype), ps, device="cpu")
    model.load_full_state_dict(LazySafetensors(weights_file))
    ck = Checkpointer(out, keep_last=1_000_000, async_save=False)
    ck.root = Path(out)  # OUT/step_*, OUT/latest (an init_from target, not a run dir to resume)
    ck.save(step, {"model": model.sharded_state_dict(), "osp": osp})
    ck.close()


def _spawned_rank(rank: int, *args) -> None:
    import torch.distributed as dist

    try:
        _save_rank(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def write_megatron(sd: StateDict, model_config, out: str | os.PathLike, layout: Dict[str, int], step: int = 0,
                   dtype: str = "fp32", source: str = "") -> Path:
    """Save `sd` (our full names) as a torch_dist checkpoint written by TP x PP x SSP x Ulysses ranks."""
    from safetensors.torch import save_file

    from osp_megatron.config import Config, ParallelConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = layout["tp"] * layout["pp"] * layout["ssp"] * layout["ulysses"]
    cfg = Config(model=model_config, parallel=ParallelConfig(tensor_parallel=layout["tp"],
                                                             pipeline_parallel=layout["pp"], ssp=layout["ssp"],
                                                             ulysses=layout["ulysses"]))
    osp = {"step": step, "config_yaml": cfg.to_yaml(), "converted_from": source, "layout": dict(layout),
           "dtype": dtype, "model_config": asdict(model_config)}
    fd, weights_file = tempfile.mkstemp(prefix=".osp-convert-", suffix=".safetensors", dir=out)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, weights_file)
        args = (world, _free_port(), weights_file, model_config, layout, str(out), step, osp, dtype)
        if world == 1:
            _ensure_world()
            import torch.distributed as dist

            if dist.get_world_size() != 1:
                raise RuntimeError("write_megatron: run osp-convert as one process (it starts the layout's ranks itself)")
            _save_rank(0, *args)
        else:
            import torch.multiprocessing as mp

            mp.start_processes(_spawned_rank, args=args, nprocs=world, join=True, start_method="spawn")
    finally:
        os.unlink(weights_file)
    return find_checkpoint_dir(out)
