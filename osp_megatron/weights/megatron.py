"""Megatron `torch_dist` checkpoints (written by osp-train and osp-convert): config, full reads, sharded loads,
writes under any TP x PP x SSP x Ulysses layout.

A step directory holds the sharded tensors (`*.distcp`, `.metadata`, `metadata.json`), the common state
(`common.pt`: `osp.config_yaml` is the run's whole Config, so the model size and its precision recipe are known)
and the completion marker of `training.checkpoint`. Model weights are named like `blocks.3.mlp.linear_fc1.weight`
(global block index, TP shards as ShardedTensors), the EMA twin's under `ema.`; optimizer state is never read here.

* `read_full` needs no model: the tensors' global shapes are in the checkpoint metadata, so any layout loads as
  full tensors (converters).
* `load_sharded` loads into a built (TP/PP/CP-sharded) model through `training.checkpoint.Checkpointer.load`
  (marker verified first; each rank reads only its shards).
* `write` builds the model at the requested layout (that many local gloo ranks on CPU), gives each rank its slice
  of the full weights and saves with `Checkpointer` as OUT/step_XXXXXXX + an atomic OUT/latest: the result loads
  with `train.init_from=OUT`, `osp-sample --checkpoint OUT` and `osp-convert --from megatron`, under any layout.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from osp_megatron import cpu_shims
from osp_megatron.config import Config, ParallelConfig, PrecisionConfig, config_from_dict
from osp_megatron.launch import free_port
from osp_megatron.models import build_model
from osp_megatron.models.adapters.common import our_keys
from osp_megatron.parallel import ParallelState, initialize_parallel
from osp_megatron.training import checkpoint as run_checkpoint  # module import: training.checkpoint imports weights
from osp_megatron.weights.files import LazySafetensors, StateDict
from osp_megatron.weights.paths import WeightsError, find_checkpoint_dir


def _ensure_world() -> None:
    """dist_checkpointing needs a process group: a single-process one when the caller has none."""
    import torch.distributed as dist

    if not dist.is_initialized():
        ParallelState.single()


def read_run_config(ckpt_dir: Path) -> Tuple[Any, Dict[str, Any]]:
    """(Config of the run that wrote it, the `osp` common dict) from a step directory; needs no process group."""
    import yaml
    from megatron.core import dist_checkpointing


    common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    osp = common.get("osp") or {}
    if "config_yaml" not in osp:
        raise WeightsError(f"{ckpt_dir}: no osp.config_yaml in the checkpoint's common state; it was not written by "
                           "osp-train or osp-convert, so the model size is unknown")
    return config_from_dict(yaml.safe_load(osp["config_yaml"])), osp


def read_full(ckpt_dir: Path, model_config, ema: bool = False) -> StateDict:
    """Full (unsharded) state dict in our names from a step directory, whatever layout wrote it."""
    from megatron.core import dist_checkpointing


    _ensure_world()
    names = our_keys(model_config.resolve().num_layers)
    prefix = "ema." if ema else ""
    meta = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    wanted = {prefix + n for n in names}
    missing = sorted(wanted - set(meta))
    if missing:
        hint = ("the run had no EMA (train.ema_decay=0): drop --ema" if ema and all(not k.startswith("ema.") for k in meta)
                else "the checkpoint does not match its stored model config")
        raise WeightsError(f"{ckpt_dir}: {len(missing)} weights missing, e.g. {missing[:3]}; {hint}")
    loaded = dist_checkpointing.load({k: meta[k] for k in sorted(wanted)}, str(ckpt_dir), validate_access_integrity=False)
    return {k[len(prefix):]: v for k, v in loaded.items() if k in wanted}


def load_sharded(model, ckpt_dir: Path, ema: bool = False) -> None:
    """Load the (EMA) weights of a step directory into this rank's shard of `model` (collective)."""
    prefix = "ema." if ema else ""
    loaded = run_checkpoint.Checkpointer(ckpt_dir.parent).load(ckpt_dir, {"model": model.sharded_state_dict(prefix=prefix)})
    state = {k[len(prefix):]: v for k, v in loaded["model"].items()}
    with torch.no_grad():  # fp32 main params of a wrapped optimizer are views of the leaves: copy in place
        missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise WeightsError(f"{ckpt_dir}: weights missing for {missing[:3]}"
                           + ("; the run had no EMA (train.ema_decay=0): drop --ema" if ema else ""))




def _save_rank(rank: int, world: int, port: int, weights_file: str, model_config, layout: Dict[str, int],
               out: str, step: int, osp: Dict[str, Any], dtype: str) -> None:
    """One rank of the layout: build its shard of the model, load its slice, save collectively."""
    import torch.distributed as dist


    torch.set_num_threads(1)
    cpu_shims.apply()
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ps = initialize_parallel(ParallelConfig(tensor_parallel=layout["tp"], pipeline_parallel=layout["pp"],
                                            ssp=layout["ssp"], ulysses=layout["ulysses"]))
    model = build_model(model_config, ps, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, device="cpu")
    model.load_full_state_dict(LazySafetensors(weights_file))
    ck = run_checkpoint.Checkpointer(out, keep_last=1_000_000, async_save=False)
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


def write(sd: StateDict, model_config, out: str | os.PathLike, layout: Dict[str, int], step: int = 0,
          dtype: str = "fp32", source: str = "", precision=None) -> Path:
    """Save `sd` (our full names) as a torch_dist checkpoint written by TP x PP x SSP x Ulysses ranks; the stored
    Config carries `model_config` and `precision` (PrecisionConfig, e.g. an OSP-Next HiF8 recipe)."""
    import torch.distributed as dist
    from safetensors.torch import save_file


    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = layout["tp"] * layout["pp"] * layout["ssp"] * layout["ulysses"]
    cfg = Config(model=model_config, precision=precision or PrecisionConfig(),
                 parallel=ParallelConfig(tensor_parallel=layout["tp"], pipeline_parallel=layout["pp"],
                                         ssp=layout["ssp"], ulysses=layout["ulysses"]))
    osp = {"step": step, "config_yaml": cfg.to_yaml(), "converted_from": source, "layout": dict(layout),
           "dtype": dtype, "model_config": asdict(model_config)}
    fd, weights_file = tempfile.mkstemp(prefix=".osp-convert-", suffix=".safetensors", dir=out)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, weights_file)
        args = (world, free_port(), weights_file, model_config, layout, str(out), step, osp, dtype)
        if world == 1:
            _ensure_world()
            if dist.get_world_size() != 1:
                raise RuntimeError("megatron.write: run the converter as one process (it starts the layout's ranks)")
            _save_rank(0, *args)
        else:
            import torch.multiprocessing as mp

            mp.start_processes(_spawned_rank, args=args, nprocs=world, join=True, start_method="spawn")
    finally:
        os.unlink(weights_file)
    return find_checkpoint_dir(out)
