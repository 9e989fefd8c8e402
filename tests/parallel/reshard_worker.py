"""torchrun worker: write a megatron torch_dist checkpoint under one parallel plan, read it under another.

    reshard_worker.py save REF.pt CKPT_DIR PLAN      (weights from REF.pt's unsharded state dict)
    reshard_worker.py load REF.pt CKPT_DIR PLAN OUT.json
PLAN as in equivalence_worker.py. `load` compares every parameter (bitwise) and the velocity (1e-5) with REF.pt.
"""
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist


def build(ref, spec):
    from osp_megatron.config import ParallelConfig
    from osp_megatron.models import build_model
    from osp_megatron.models.transformer_config import make_osp_config
    from osp_megatron.parallel import initialize_parallel

    fields = {}
    for item in filter(None, spec.partition(":")[2].split(",")):
        k, v = item.split("=")
        fields[k] = v.lower() == "true" if v.lower() in ("true", "false") else int(v)
    pcfg = ParallelConfig(**fields)
    ps = initialize_parallel(pcfg)
    return ps, build_model(make_osp_config(ref["model_config"], pcfg, None, torch.float32), ps)


def main():
    mode, ref_path, ckpt_dir, spec, *rest = sys.argv[1:]
    dist.init_process_group("gloo")
    from osp_megatron import cpu_shims

    cpu_shims.apply()
    from megatron.core import dist_checkpointing

    ref = torch.load(ref_path, weights_only=False)
    ps, model = build(ref, spec)
    if mode == "save":
        model.load_full_state_dict(ref["state_dict"])
        os.makedirs(ckpt_dir, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    else:
        loaded = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
        model.load_state_dict(loaded, strict=False)
        full = model.full_state_dict()
        weights_equal = all(torch.equal(v, ref["state_dict"][k]) for k, v in full.items())
        out = {"weights_equal": weights_equal, "n_params": len(full)}
        if ps.pp == 1:
            with torch.no_grad():
                v = model(ref["x"], ref["t"], ref["text"])
            out["velocity_rel"] = ((v - ref["velocity"]).norm() / ref["velocity"].norm()).item()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, out)
        if dist.get_rank() == 0:
            with open(rest[0], "w") as f:
                json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
