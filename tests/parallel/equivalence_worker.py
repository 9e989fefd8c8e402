"""torchrun worker: run the tiny DiT under parallel plans and compare with the single-process reference.

Usage: torchrun --nproc_per_node N equivalence_worker.py REF.pt OUT.json PLAN [PLAN ...]
A PLAN is `name:key=value,key=value` over ParallelConfig fields (tensor_parallel, pipeline_parallel,
ssp, ulysses, sequence_parallel) and `padding_free` (model.padding_free: true = packed shards under CP).
Writes, per plan, the max relative error of the velocity, the loss and every parameter gradient (rank 0
collects all ranks' numbers).
"""
import dataclasses
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist


def _rel(a, b):
    den = b.float().norm().item()
    num = (a.float() - b.float()).norm().item()
    return num / den if den > 1e-12 else num


def run_plan(spec, ref):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from osp_megatron.config import ParallelConfig
    from osp_megatron.models import build_model
    from osp_megatron.models.transformer_config import make_osp_config
    from osp_megatron.parallel import initialize_parallel

    name, _, kv = spec.partition(":")
    fields = {}
    for item in filter(None, kv.split(",")):
        k, v = item.split("=")
        fields[k] = v.lower() == "true" if v.lower() in ("true", "false") else int(v)
    padding_free = fields.pop("padding_free", None)
    pcfg = ParallelConfig(**fields)
    ps = initialize_parallel(pcfg)
    mcfg = ref["model_config"]
    if padding_free is not None:
        mcfg = dataclasses.replace(mcfg, padding_free=bool(padding_free))
    ocfg = make_osp_config(mcfg, pcfg, None, torch.float32)
    model = build_model(ocfg, ps)
    model.load_full_state_dict(ref["state_dict"])
    x, t, txt, target = ref["x"], ref["t"], ref["text"], ref["target"]
    if padding_free:  # the plan really runs packed
        grid = (x.shape[2], x.shape[3] // 2, x.shape[4] // 2)
        assert model.sequence_for(grid, next(model.parameters()).device).placement.packed, spec
    if ps.dp > 1:  # each DP rank takes its slice of the batch
        n = x.shape[0] // ps.dp
        sl = slice(ps.dp_rank * n, (ps.dp_rank + 1) * n)
        x, t, txt, target = x[sl], t[sl], txt[sl], target[sl]
    errors = {}
    # inference output (every CP rank holds the gathered velocity)
    if ps.pp == 1:
        with torch.no_grad():
            v = model(x, t, txt)
        want = ref["velocity"] if ps.dp == 1 else ref["velocity"][sl]
        errors["velocity"] = _rel(v, want)
    # loss + gradients
    if ps.pp == 1:
        loss = model(x, t, txt, target=target)
        (loss * ps.cp.size).backward()  # what megatron's schedules do with a loss before backward
        loss_value = loss.detach()
    else:
        def forward_step(data_iterator, m):
            out = m(x, t, txt, target=target)
            return out, lambda o: (o, {"loss": o.detach().clone()})  # megatron scales o in place

        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
            seq_length=1, micro_batch_size=1, forward_only=False,
        )
        loss_value = losses[0]["loss"] if ps.is_last_stage else None
    if loss_value is not None:
        lv = loss_value.clone()
        dist.all_reduce(lv, group=ps.dp_cp_group)  # sum of the CP shares, then mean over DP
        lv /= ps.dp
        errors["loss"] = _rel(lv, ref["loss"])
    # what megatron DDP + finalize_model_grads do: average over DP x CP, all-reduce SP-tagged grads over TP
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=ps.dp_cp_group)
        p.grad /= dist.get_world_size(ps.dp_cp_group)
        if ps.sequence_parallel and getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=ps.tp_group)
    grad_err = 0.0
    worst = ""
    for name_, p in model.named_parameters():
        g = p.grad
        if getattr(p, "tensor_model_parallel", False) and ps.tp > 1:
            parts = [torch.empty_like(g) for _ in range(ps.tp)]
            dist.all_gather(parts, g.contiguous(), group=ps.tp_group)
            g = torch.cat(parts, dim=p.partition_dim)
        e = _rel(g, ref["grads"][model.global_name(name_)])
        if e > grad_err:
            grad_err, worst = e, model.global_name(name_)
    errors["grads"] = grad_err
    errors["worst_grad"] = worst
    return name, errors


def main():
    ref_path, out_path, *plans = sys.argv[1:]
    dist.init_process_group("gloo")
    from osp_megatron import cpu_shims

    cpu_shims.apply()
    torch.set_num_threads(1)
    ref = torch.load(ref_path, weights_only=False)
    results = {}
    for spec in plans:
        name, errors = run_plan(spec, ref)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, errors)
        merged = {}
        for e in gathered:
            for k, v in e.items():
                if k == "worst_grad":
                    continue
                merged[k] = max(merged.get(k, 0.0), v)
        merged["worst_grad"] = max(gathered, key=lambda e: e["grads"])["worst_grad"]
        results[name] = merged
    if dist.get_rank() == 0:
        with open(out_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out_path + ".tmp", out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
