"""Worker for 2-rank gloo tests of the GRPO stack. Usage: RANK=.. WORLD_SIZE=2 MASTER_ADDR/PORT=.. python this CASE OUT.

Cases: `noise` (CP group noise identity + identical rollouts), `lora_tp` (LoRA on megatron Column/Row at TP=2 vs
full-matrix math), `dp_grpo` (two DP ranks run GRPO iterations; LoRA stays identical on both ranks),
`dp_equals_single` (DP=2 GRPO vs the same iterations in one rank's model), `cp_grpo`, `tp_grpo`.
Gradients are read from `main_grad`, where megatron DDP leaves the reduced LoRA gradients.
Each rank writes OUT/rank<r>.json.
"""
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)

from osp_megatron import cpu_shims  # noqa: E402

cpu_shims.apply()


def _gather_equal(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts[1:])


def case_noise(rank):
    from osp_megatron.config import ParallelConfig
    from osp_megatron.parallel.groups import initialize_parallel
    from osp_megatron.rl.rollout import NoiseSource, make_plan, rollout
    from osp_megatron.rl.windows import Window

    par = initialize_parallel(ParallelConfig(ulysses=2))  # one context-parallel group of both ranks
    group = par.cp.cp_group
    out = {}
    seeded = NoiseSource(seed=7, iteration=3, mode="seed", group=group)
    out["seed_initial_equal"] = _gather_equal(seeded.initial((16, 1, 4, 4), [0, 0, 1]))
    out["seed_sde_equal"] = _gather_equal(seeded.sde((16, 1, 4, 4), [0, 1, 2], step=2))
    own = NoiseSource(seed=7, iteration=3, mode="broadcast", group=None, rank_seed=rank)
    out["unbroadcast_differs"] = not _gather_equal(own.sde((16, 1, 4, 4), [0, 1, 2], step=2))
    bc = NoiseSource(seed=7, iteration=3, mode="broadcast", group=group, rank_seed=rank)
    out["broadcast_initial_equal"] = _gather_equal(bc.initial((16, 1, 4, 4), [0, 1, 2]))
    out["broadcast_sde_equal"] = _gather_equal(bc.sde((16, 1, 4, 4), [0, 1, 2], step=5))
    plan = make_plan(10, 3.0, Window(2, 4), (2, 3, 4, 5))
    x0 = seeded.initial((16, 1, 4, 4), [0, 1])
    res = rollout(lambda x, s: 0.3 * x + s.view(-1, 1, 1, 1, 1), x0, plan,
                  lambda step: seeded.sde((16, 1, 4, 4), [0, 1], step))
    out["rollout_equal"] = _gather_equal(res.final) and _gather_equal(res.log_probs)
    return out


def case_lora_tp(rank):
    import torch.nn as nn
    import torch.nn.functional as F
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from osp_megatron.config import ParallelConfig
    from osp_megatron.parallel.groups import initialize_parallel
    from osp_megatron.rl.lora import _init_a, apply_lora, lora_state_dict, merge_lora

    par = initialize_parallel(ParallelConfig(tensor_parallel=2))
    tp, r = par.tp, par.tp_rank
    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True,
                            params_dtype=torch.float64, gradient_accumulation_fusion=False, tensor_model_parallel_size=2)
    init = nn.init.zeros_
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(12, 8, generator=g, dtype=torch.float64), torch.randn(8, 12, generator=g, dtype=torch.float64)
    b1, b2 = torch.randn(12, 2, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
    x = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)
    wy = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.col = ColumnParallelLinear(8, 12, config=cfg, init_method=init, bias=False, gather_output=False,
                                            tp_group=par.tp_group)
            self.row = RowParallelLinear(12, 8, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                                         skip_bias_add=False, tp_group=par.tp_group)

        def forward(self, x):
            return self.row(F.gelu(self.col(x)[0]))[0]

    net = Net()
    sl = slice(r * 6, (r + 1) * 6)
    with torch.no_grad():
        net.col.weight.copy_(w1[sl])
        net.row.weight.copy_(w2[:, sl])
    names = apply_lora(net, rank=2, alpha=4.0, targets=["col", "row"], seed=0)
    with torch.no_grad():
        net.col.lora_B.copy_(b1[sl].float())
        net.row.lora_B.copy_(b2.float())
    # full-matrix reference (fp64); LoRA params are fp32 and the delta runs in the input dtype (fp64)
    a1 = _init_a(2, 8, 0).double().requires_grad_()
    a2 = _init_a(2, 12, 1).double().requires_grad_()
    rb1, rb2 = b1.float().double().requires_grad_(), b2.float().double().requires_grad_()
    xr = x.clone().requires_grad_()
    h = xr @ w1.T + 2.0 * (xr @ a1.T) @ rb1.T
    hg = F.gelu(h)
    y_ref = hg @ w2.T + 2.0 * (hg @ a2.T) @ rb2.T
    (y_ref * wy).sum().backward()
    xt = x.clone().requires_grad_()
    y = net(xt)
    (y * wy).sum().backward()
    err = lambda a, b: float((a.double() - b.double()).abs().max() / (b.double().abs().max() + 1e-12))  # noqa: E731
    out = {
        "names": names,
        "y": err(y, y_ref),
        "dx": err(xt.grad, xr.grad),
        "dA_col": err(net.col.lora_A.grad, a1.grad),
        "dB_col": err(net.col.lora_B.grad, rb1.grad[sl]),
        "dA_row": err(net.row.lora_A.grad, a2.grad[:, sl]),
        "dB_row": err(net.row.lora_B.grad, rb2.grad),
        "A_row_is_shard": err(net.row.lora_A, a2.detach()[:, sl]),
    }
    sd = {**{k: v for k, v in net.state_dict().items() if k.endswith("weight")}, **lora_state_dict(net)}
    merged = merge_lora(sd)
    w1_merged = w1 + 2.0 * b1.float().double() @ a1.detach()
    out["merge_col"] = err(merged["col.weight"], w1_merged[sl])
    w2_merged = w2 + 2.0 * b2.float().double() @ a2.detach()
    out["merge_row"] = err(merged["row.weight"], w2_merged[:, sl])
    return out


def case_dp_grpo(rank):
    from osp_megatron.config import Config
    from osp_megatron.parallel.groups import initialize_parallel
    from osp_megatron.config import GRPOConfig, parse_section
    from osp_megatron.rl.lora import lora_parameters
    from osp_megatron.rl.trainer import GRPOTrainer

    cfg = Config()
    cfg.data.kind = "synthetic"
    cfg.model.num_layers, cfg.model.schedule = 2, "full"
    cfg.train.run_dir = sys.argv[2] + "/run"
    cfg.tracking.backend = "none"
    par = initialize_parallel(cfg.parallel)
    torch.manual_seed(0)
    from osp_megatron.models import build_model

    model = build_model(cfg.model, par, precision=cfg.precision, device="cpu")
    g = parse_section(GRPOConfig, dict(iterations=2, steps=6, window=dict(strategy="fixed", size=2), group_size=4,
                                   prompts_per_iteration=2, rollout_batch=2, train_batch=2, lr=1e-3,
                                   latent_shape=[1, 4, 4], prompts=["p", "q"], lora=dict(rank=4, alpha=4)))
    t = GRPOTrainer(cfg, g, model=model, parallel=par)
    hist = t.fit(track=False)
    flat = torch.cat([p.detach().reshape(-1) for p in lora_parameters(model)])
    return {"lora_equal": _gather_equal(flat), "lora_changed": float(flat.abs().sum()) > 0,
            "reward_mean": [h["reward/combined/mean"] for h in hist if "reward/combined/mean" in h],
            "local": t.local_ids()}


def case_dp_equals_single(rank):
    """Data-parallel GRPO (DP=2, distributed optimizer) equals one rank running every sample: rollouts, rewards,
    advantages, the reduced LoRA gradients (a DP trainer without the distributed optimizer) and the LoRA weights
    after two iterations (the distributed optimizer's all-gathered update)."""
    import copy

    from osp_megatron.config import Config
    from osp_megatron.models import build_model
    from osp_megatron.parallel.groups import ParallelState, initialize_parallel
    from osp_megatron.config import GRPOConfig, parse_section
    from osp_megatron.rl.lora import lora_parameters
    from osp_megatron.rl.trainer import GRPOTrainer

    cfg = Config()
    cfg.data.kind = "synthetic"
    cfg.model.num_layers, cfg.model.schedule = 2, "full"
    cfg.tracking.backend = "none"
    par = initialize_parallel(cfg.parallel)  # DP = 2
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    one = singles[rank]
    single = ParallelState(tp_group=one, pp_group=one, dp_group=one, dp_cp_group=one, tp_cp_group=one)
    g = parse_section(GRPOConfig, dict(iterations=2, steps=6, window=dict(strategy="fixed", start=1, size=2),
                                       group_size=4, prompts_per_iteration=2, rollout_batch=2, train_batch=2,
                                       lr=1e-3, latent_shape=[1, 4, 4], prompts=["p", "q"], cfg_scale=2.0,
                                       lora=dict(rank=4, alpha=4), clip_grad=1e9))

    def trainer(name, p, dist_opt):
        c = copy.deepcopy(cfg)
        c.parallel.distributed_optimizer = dist_opt
        c.train.run_dir = f"{sys.argv[2]}/run_{name}_{rank}"
        torch.manual_seed(0)
        model = build_model(c.model, p, precision=c.precision, device="cpu")
        t = GRPOTrainer(c, g, model=model, parallel=p)
        with torch.no_grad():  # LoRA B = 0 gives no signal through A: start from a non-trivial adapter
            gen = torch.Generator().manual_seed(1)
            for q in lora_parameters(model):
                q.copy_(torch.randn(q.shape, generator=gen) * 0.05)
        return t

    rel = lambda a, b: float((a - b).abs().max() / (b.abs().max() + 1e-12))  # noqa: E731
    out = {}
    # one iteration by hand: rollouts, rewards, advantages and the reduced gradients
    grads, rolled = {}, {}
    for name, p in (("dp", par), ("single", single)):
        t = trainer(name + "_grad", p, dist_opt=False)
        plan = t.plan_for(0)
        batch = t.collect(0, plan)
        adv, gathered, _ = t.advantages(0, batch["scores"])
        t.train_on(batch, adv, plan)
        grads[name] = [q.main_grad.detach().clone() for q in t.params]
        rolled[name] = (batch, adv, gathered, t.local_ids())
    (bd, ad, gd, ids), (bs, as_, gs, _) = rolled["dp"], rolled["single"]
    out["local"] = ids
    out["final"] = rel(bd["final"], bs["final"][ids[0]: ids[-1] + 1])
    out["old_log_probs"] = rel(bd["old_log_probs"], bs["old_log_probs"][ids[0]: ids[-1] + 1])
    out["rewards"] = max(rel(gd[k], gs[k]) for k in gs)
    out["advantages"] = float((ad - as_[ids[0]: ids[-1] + 1]).abs().max())
    out["grads"] = max(rel(a, b) for a, b in zip(grads["dp"], grads["single"]))
    out["grad_abs"] = float(torch.cat([x.reshape(-1) for x in grads["single"]]).abs().max())
    # two iterations through the shared loop's step with the distributed optimizer
    hist, weights = {}, {}
    for name, p in (("dp", par), ("single", single)):
        t = trainer(name + "_fit", p, dist_opt=True)
        start = torch.cat([q.detach().reshape(-1).clone() for q in t.params])
        hist[name] = [t.run_step() for _ in range(2)]
        weights[name] = torch.cat([q.detach().reshape(-1).clone() for q in t.params])
    out["reward_mean"] = max(abs(a["reward/combined/mean"] - b["reward/combined/mean"]) for a, b in
                             zip(hist["dp"], hist["single"]))
    out["grad_norm"] = max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in
                           zip(hist["dp"], hist["single"]))
    out["weights"] = rel(weights["dp"], weights["single"])
    out["moved"] = float((weights["single"] - start).abs().max())
    out["lora_equal"] = _gather_equal(weights["dp"])
    return out


def case_tp_checkpoint(rank):
    """TP=2: a GRPO checkpoint (torch_dist) stores each TP-split adapter once in its full shape; a fresh TP=2
    trainer loads back the same shards and EMA."""
    import zlib

    from osp_megatron.config import Config
    from osp_megatron.parallel.groups import initialize_parallel
    from osp_megatron.config import GRPOConfig, parse_section
    from osp_megatron.rl.lora import full_adapters
    from osp_megatron.rl.trainer import GRPOTrainer
    from osp_megatron.training.ema import unwrap

    cfg = Config()
    cfg.data.kind = "synthetic"
    cfg.model.num_layers, cfg.model.schedule = 2, "full"
    cfg.parallel.tensor_parallel = 2
    cfg.train.run_dir = sys.argv[2] + "/run"
    cfg.tracking.backend = "none"
    par = initialize_parallel(cfg.parallel)
    g = parse_section(GRPOConfig, dict(iterations=1, steps=6, window=dict(strategy="fixed", start=1, size=2),
                                       group_size=2, prompts_per_iteration=2, rollout_batch=2, train_batch=2,
                                       lr=1e-2, latent_shape=[1, 4, 4], prompts=["p", "q"], ema_decay=0.5,
                                       lora=dict(rank=4, alpha=4)))
    t = GRPOTrainer(cfg, g, parallel=par)
    with torch.no_grad():  # non-trivial full tensors, sliced like the base weights
        for pname, q in unwrap(t.model).named_parameters():
            if not pname.endswith(("lora_A", "lora_B")):
                continue
            split = getattr(q, "lora_tp_split", "none")
            full_in = q.shape[1] * (2 if split == "in" else 1)
            full_out = q.shape[0] * (2 if split == "out" else 1)
            full = torch.randn(full_out, full_in, generator=torch.Generator().manual_seed(zlib.crc32(pname.encode())))
            q.copy_(full.chunk(2, 0)[rank] if split == "out" else full.chunk(2, 1)[rank] if split == "in" else full)
    t.run_step()
    ckpt = t.save()
    full = full_adapters(unwrap(t.model))
    if rank == 0:
        torch.save(full, os.path.join(sys.argv[2], "full.pt"))
    mine = [q.detach().clone() for q in t.params]
    ema = {k: v.clone() for k, v in t.ema.tensors().items()}
    t.close()
    r = GRPOTrainer(cfg, g, parallel=par)
    r.load(ckpt)
    return {"ckpt": str(ckpt), "sharded": sum(getattr(q, "lora_tp_split", "none") != "none" for q in t.params),
            "lora_equal": all(torch.equal(a, b) for a, b in zip(mine, r.params)),
            "ema_equal": all(torch.equal(v, r.ema.tensors()[k]) for k, v in ema.items()),
            "step": r.iteration}


def case_cp_grpo(rank):
    """CP=2 (SSP=2, sparse dual_end model) GRPO iteration vs the same iteration in a single-rank model on each rank."""
    import copy

    from osp_megatron.config import Config, ParallelConfig
    from osp_megatron.models import build_model
    from osp_megatron.parallel.groups import ParallelState, initialize_parallel
    from osp_megatron.config import GRPOConfig, parse_section
    from osp_megatron.rl.lora import lora_parameters
    from osp_megatron.rl.trainer import GRPOTrainer

    cfg = Config()
    cfg.data.kind = "synthetic"
    cfg.model.num_layers, cfg.model.schedule, cfg.model.num_full_blocks = 6, "dual_end", 4
    cfg.parallel.ssp = 2
    cfg.parallel.distributed_optimizer = False  # full reduced grads in main_grad on every rank
    cfg.train.run_dir = sys.argv[2] + "/run"
    cfg.tracking.backend = "none"
    par = initialize_parallel(cfg.parallel)
    g = parse_section(GRPOConfig, dict(iterations=1, steps=6, window=dict(strategy="fixed", start=1, size=2),
                                   group_size=2, prompts_per_iteration=2, rollout_batch=2, train_batch=2, lr=0.0,
                                   latent_shape=[1, 8, 8], prompts=["p", "q"], lora=dict(rank=4, alpha=4),
                                   cfg_scale=2.0))
    out = {}
    runs = {}
    for name, p in (("cp", par), ("single", ParallelState())):
        torch.manual_seed(0)
        model = build_model(cfg.model, p, precision=cfg.precision, device="cpu")
        run_cfg = copy.deepcopy(cfg)
        run_cfg.train.run_dir = f"{sys.argv[2]}/run_{name}_{rank}"
        t = GRPOTrainer(run_cfg, g, model=model, parallel=p)
        with torch.no_grad():  # LoRA B = 0 gives no signal through A: start from a non-trivial adapter
            gen = torch.Generator().manual_seed(1)
            for q in lora_parameters(model):
                q.copy_(torch.randn(q.shape, generator=gen) * 0.05)
        plan = t.plan_for(0)
        batch = t.collect(0, plan)
        adv, _, _ = t.advantages(0, batch["scores"])
        t.train_on(batch, adv, plan)
        runs[name] = (batch, adv, [q.main_grad.detach().clone() for q in lora_parameters(model)])
    (bc, ac, gc), (bs, as_, gs) = runs["cp"], runs["single"]
    rel = lambda a, b: float((a - b).abs().max() / (b.abs().max() + 1e-12))  # noqa: E731
    out["final"] = rel(bc["final"], bs["final"])
    out["old_log_probs"] = rel(bc["old_log_probs"], bs["old_log_probs"])
    out["advantages"] = float((ac - as_).abs().max())
    out["grads"] = max(rel(a, b) for a, b in zip(gc, gs))
    out["grad_norm"] = float(torch.cat([x.reshape(-1) for x in gs]).norm())
    return out


def case_tp_grpo(rank):
    """TP=2 GRPO iteration on the tiny model vs a TP=1 copy (same base weights and LoRA) on each rank."""
    import copy
    import zlib

    from osp_megatron.config import Config
    from osp_megatron.models import build_model
    from osp_megatron.parallel.groups import ParallelState, initialize_parallel
    from osp_megatron.config import GRPOConfig, parse_section
    from osp_megatron.rl.trainer import GRPOTrainer

    cfg = Config()
    cfg.data.kind = "synthetic"
    cfg.model.num_layers, cfg.model.schedule = 2, "full"
    cfg.parallel.tensor_parallel = 2
    cfg.train.run_dir = sys.argv[2] + "/run"
    cfg.tracking.backend = "none"
    par = initialize_parallel(cfg.parallel)
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    ref_state = ParallelState(tp_group=singles[rank])
    ref_cfg = copy.deepcopy(cfg)
    ref_cfg.parallel.tensor_parallel = 1
    g = parse_section(GRPOConfig, dict(iterations=1, steps=6, window=dict(strategy="fixed", start=1, size=2),
                                   group_size=2, prompts_per_iteration=2, rollout_batch=2, train_batch=2, lr=0.0,
                                   latent_shape=[1, 4, 4], prompts=["p", "q"], lora=dict(rank=4, alpha=4),
                                   clip_grad=1e9))
    torch.manual_seed(0)
    ref_model = build_model(ref_cfg.model, ref_state, precision=ref_cfg.precision, device="cpu")
    tp_model = build_model(cfg.model, par, precision=cfg.precision, device="cpu")
    tp_model.load_full_state_dict(ref_model.full_state_dict())
    runs = {}
    for name, model, p in (("ref", ref_model, ref_state), ("tp", tp_model, par)):
        run_cfg = copy.deepcopy(cfg if name == "tp" else ref_cfg)
        run_cfg.train.run_dir = f"{sys.argv[2]}/run_{name}_{rank}"
        t = GRPOTrainer(run_cfg, g, model=model, parallel=p)
        with torch.no_grad():  # the same non-trivial full LoRA tensors, sliced like the base weights at TP=2
            for pname, q in model.named_parameters():
                if not pname.endswith(("lora_A", "lora_B")):
                    continue
                full_in = q.shape[1] * (2 if getattr(q, "lora_tp_split", "none") == "in" else 1)
                full_out = q.shape[0] * (2 if getattr(q, "lora_tp_split", "none") == "out" else 1)
                gen = torch.Generator().manual_seed(zlib.crc32(pname.encode()))
                full = torch.randn(full_out, full_in, generator=gen) * 0.05
                split = getattr(q, "lora_tp_split", "none")
                part = full.chunk(2, 0)[rank] if split == "out" else full.chunk(2, 1)[rank] if split == "in" else full
                q.copy_(part)
        plan = t.plan_for(0)
        batch = t.collect(0, plan)
        adv, _, _ = t.advantages(0, batch["scores"])
        stats = t.train_on(batch, adv, plan)
        grads = {n: (q.main_grad.detach().clone(), getattr(q, "lora_tp_split", "none"))
                 for n, q in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
        runs[name] = (batch, adv, grads, stats["grad_norm"])
    (br, ar, gr, nr), (bt, at, gt, nt) = runs["ref"], runs["tp"]
    rel = lambda a, b: float((a - b).abs().max() / (b.abs().max() + 1e-12))  # noqa: E731
    errs = []
    for n, (grad, split) in gt.items():
        ref = gr[n][0]
        ref = ref.chunk(2, 0)[rank] if split == "out" else ref.chunk(2, 1)[rank] if split == "in" else ref
        errs.append(rel(grad, ref))
    return {"final": rel(bt["final"], br["final"]), "old_log_probs": rel(bt["old_log_probs"], br["old_log_probs"]),
            "advantages": float((at - ar).abs().max()), "grads": max(errs), "grad_norm": abs(nt - nr) / nr,
            "sharded": sum(split != "none" for _, split in gt.values())}


if __name__ == "__main__":
    case, out_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = globals()[f"case_{case}"](rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()
