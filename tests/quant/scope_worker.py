"""torchrun worker: the tiny HiF8 DiT under a parallel plan and an amax scope, compared with single-process runs.

Usage: torchrun --nproc_per_node 2 scope_worker.py REF.pt OUT.json PLAN [PLAN ...]
PLAN = `name:layout:scope` with layout ssp2 | tp2 and scope local | tp | tp_cp. Writes, per plan and per reference
in REF.pt ("whole": one process, every tensor one piece; "ssp2" / "tp2": one process quantizing each rank's
pieces, `scope_reference.py`), the relative error of the velocity, the loss, all parameter gradients together
(one vector: a bias whose gradient cancels to ~0 would otherwise show only the HiF8 noise of its summands), the
gradients outside the text K/V path of cross-attention, and the worst single weight-matrix gradient.
"""
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

TEXT_PATH = ("cross_attention.linear_k", "cross_attention.linear_v", "cross_attention.k_norm", "text_embedding")


def _rel(a, b):
    den = b.float().norm().item()
    return (a.float() - b.float()).norm().item() / max(den, 1e-12)


def _flat(grads, names):
    return torch.cat([grads[n].reshape(-1) for n in names])


def run_plan(spec, ref):
    from osp_megatron.config import ParallelConfig, PrecisionConfig
    from osp_megatron.models import build_model
    from osp_megatron.models.transformer_config import make_osp_config
    from osp_megatron.parallel import initialize_parallel
    from osp_megatron.quant.recipes import HiF8CurrentScaling, autocast

    name, layout, scope = spec.split(":")
    pcfg = ParallelConfig(ssp=2) if layout == "ssp2" else ParallelConfig(tensor_parallel=2)
    ps = initialize_parallel(pcfg)
    precision = PrecisionConfig(dtype="fp32", recipe="hif8_current", quantize_attention=True, amax_scope=scope)
    model = build_model(make_osp_config(ref["model_config"], pcfg, precision, torch.float64), ps, device="cpu")
    model.load_full_state_dict(ref["state_dict"])
    x, t, txt, target = ref["x"], ref["t"], ref["text"], ref["target"]
    recipe = HiF8CurrentScaling()
    with torch.no_grad(), autocast(recipe=recipe):
        velocity = model(x, t, txt)
    with autocast(recipe=recipe):
        loss = model(x, t, txt, target=target)
    (loss * ps.cp.size).backward()  # as megatron's schedules do under CP
    lv = loss.detach().clone()
    dist.all_reduce(lv, group=ps.dp_cp_group)
    grads = {}
    for pname, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=ps.dp_cp_group)
        g /= dist.get_world_size(ps.dp_cp_group)
        if getattr(p, "tensor_model_parallel", False) and ps.tp > 1:
            parts = [torch.empty_like(g) for _ in range(ps.tp)]
            dist.all_gather(parts, g.contiguous(), group=ps.tp_group)
            g = torch.cat(parts, dim=p.partition_dim)
        grads[model.global_name(pname)] = g
    out = {}
    outside = [n for n in grads if not any(k in n for k in TEXT_PATH)]
    for ref_name, r in ref["references"].items():
        weights = {n: _rel(g, r["grads"][n]) for n, g in grads.items() if g.dim() >= 2}
        out[ref_name] = {
            "velocity": _rel(velocity, r["velocity"]), "loss": _rel(lv, r["loss"]),
            "grads": _rel(_flat(grads, grads), _flat(r["grads"], grads)),
            "grads_outside_text_kv": _rel(_flat(grads, outside), _flat(r["grads"], outside)),
            "worst_weight_grad": max(weights.values()),
        }
    return name, out


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
        results[name] = {rn: {k: max(g[rn][k] for g in gathered) for k in errors[rn]} for rn in errors}
    if dist.get_rank() == 0:
        with open(out_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out_path + ".tmp", out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
