"""Subprocess helpers for the conversion tests (megatron state lives in its own processes).

    python convert_worker.py forward OUT_DIR TP2_CKPT TP1_CKPT
        velocities from megatron checkpoints loaded with dist_checkpointing: TP2_CKPT run by 2 spawned gloo ranks
        (a.pt), then in this process at TP1: TP1_CKPT (b.pt) and TP2_CKPT resharded to TP1 (c.pt)
    python convert_worker.py ema-checkpoint DIFFUSERS OUT  a torch_dist checkpoint whose `model` weights come from a
                                                        diffusers folder and whose `ema.` weights are those x 0.5
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward(ckpt, tp, ps):
    """Velocity of the checkpoint's model on model_check's fixed input, built at this rank's TP shard."""
    from megatron.core import dist_checkpointing

    from osp_megatron.config import ParallelConfig
    from osp_megatron.models import build_model
    from osp_megatron.models.transformer_config import make_osp_config
    from osp_megatron.weights import check as model_check
    from osp_megatron.weights import find_checkpoint_dir
    from osp_megatron.weights.megatron import read_run_config

    step = find_checkpoint_dir(ckpt)
    mc = read_run_config(step)[0].model
    model = build_model(make_osp_config(mc, ParallelConfig(tensor_parallel=tp), None, torch.float32), ps,
                        device="cpu").eval()
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(step))
    model.load_state_dict(loaded["model"], strict=False)
    with torch.no_grad():
        return model(*model_check.random_inputs(mc.resolve()))


def _forward_rank(rank, world, port, ckpt, out):
    import torch.distributed as dist

    from osp_megatron import cpu_shims
    from osp_megatron.config import ParallelConfig
    from osp_megatron.parallel import initialize_parallel

    torch.set_num_threads(1)
    cpu_shims.apply()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ps = initialize_parallel(ParallelConfig(tensor_parallel=world))
    v = _forward(ckpt, world, ps)
    if rank == 0:
        torch.save(v, out)
    dist.barrier()
    dist.destroy_process_group()


def forward(out_dir, tp2_ckpt, tp1_ckpt):
    import torch.multiprocessing as mp

    from osp_megatron import cpu_shims
    from osp_megatron.parallel import ParallelState

    mp.start_processes(_forward_rank, args=(2, _free_port(), tp2_ckpt, f"{out_dir}/a.pt"), nprocs=2, join=True,
                       start_method="spawn")
    cpu_shims.apply()
    ps = ParallelState.single()
    torch.save(_forward(tp1_ckpt, 1, ps), f"{out_dir}/b.pt")
    torch.save(_forward(tp2_ckpt, 1, ps), f"{out_dir}/c.pt")


def ema_checkpoint(diffusers_dir, out):
    import json
    from pathlib import Path

    from osp_megatron import cpu_shims
    from osp_megatron.config import Config
    from osp_megatron.models import build_model
    from osp_megatron.models.adapters import diffusers as ad
    from osp_megatron.weights import read_state_dict
    from osp_megatron.parallel import ParallelState
    from osp_megatron.training.checkpoint import Checkpointer

    cpu_shims.apply()
    ps = ParallelState.single()
    mc = ad.config_from_diffusers(json.loads((Path(diffusers_dir) / "config.json").read_text()))
    sd = ad.from_diffusers(read_state_dict(diffusers_dir), mc)
    model = build_model(mc, ps, device="cpu")
    model.load_full_state_dict(sd)
    ema = build_model(mc, ps, device="cpu")
    ema.load_full_state_dict({k: v * 0.5 for k, v in sd.items()})
    ck = Checkpointer(out, async_save=False)
    ck.save(7, {"model": model.sharded_state_dict(), "ema": ema.sharded_state_dict(prefix="ema."),
                "osp": {"step": 7, "config_yaml": Config(model=mc).to_yaml()}})
    ck.close()


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "forward":
        forward(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "ema-checkpoint":
        ema_checkpoint(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown command {cmd}")
