"""torchrun worker: count collectives of one training forward under SSP (and all-Ulysses) plans."""
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    from osp_megatron import cpu_shims

    cpu_shims.apply()
    from osp_megatron.config import ModelConfig, ParallelConfig
    from osp_megatron.models import build_model
    from osp_megatron.models.transformer_config import make_osp_config
    from osp_megatron.parallel import comm_stats, initialize_parallel

    world = dist.get_world_size()
    results = {}
    x = torch.randn(1, 16, 2, 16, 16)  # grid (2, 8, 8): no padding, so S is equal across plans
    t, txt = torch.tensor([500.0]), torch.randn(1, 4, 32)
    for name, pcfg, schedule in [
        ("ssp", ParallelConfig(ssp=world), "dual_end"),
        ("ulysses_sparse", ParallelConfig(ulysses=world), "dual_end"),
        ("ulysses_dense", ParallelConfig(ulysses=world), "full"),
    ]:
        ps = initialize_parallel(pcfg)
        mcfg = ModelConfig(size="tiny", schedule=schedule, num_full_blocks=4, num_attention_heads=8)
        model = build_model(make_osp_config(mcfg, pcfg, None, torch.float32), ps)
        comm_stats.reset()
        with torch.no_grad():
            model(x, t, txt, target=torch.randn_like(x))
        train = comm_stats.snapshot()
        comm_stats.reset()
        with torch.no_grad():
            model(x, t, txt)
        infer = comm_stats.snapshot()
        steps = model.sequence_for((2, 8, 8), x.device).placement.steps
        results[name] = {"train": train, "infer": infer, "switches": sum(s.switch_from is not None for s in steps),
                         "full_blocks": sum(s.attention == "full" for s in steps)}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
