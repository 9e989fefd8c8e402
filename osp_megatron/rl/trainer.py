"""The Mix-GRPO iteration: rollouts sharded over DP, rewards gathered for group statistics, PPO-clip on the
window steps, AdamW on the LoRA parameters, checkpoint/resume, MLflow metrics.

One iteration (global batch = prompts_per_iteration x group_size samples; sample j belongs to prompt slot j // G;
DP rank r owns the contiguous samples [r·n/dp, (r+1)·n/dp); every rank of a context-parallel group owns the same
samples and draws the same noise):
1. window/trained steps from the schedule, the rollout plan (Euler | SDE window | Euler or Flash DPM).
2. rollouts (no grad) in micro-batches of `rollout_batch`: stored window transitions + old log-probs.
3. decode (latent preview or VAE) -> videos -> each reward; all-gather over DP -> advantages for all n samples
   (group- or global-normalised, multi-reward mix) -> this rank's slice.
4. `updates_per_iteration` optimizer steps over the local samples: for each micro-batch of `train_batch` and each
   trained step, re-score the stored transition, PPO-clip loss (+ KL to the LoRA-disabled model) divided by
   (#trained steps x #micro-batches), backward; LoRA grads summed over DP x CP and divided by DP; clip; AdamW.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from osp_megatron.config import GRPOConfig
from osp_megatron.diffusion.samplers import cfg_velocity_fn, seeded_noise
from osp_megatron.encoders import load_text_encoder, load_vae
from osp_megatron.models import build_model
from osp_megatron.parallel import ParallelState
from osp_megatron.rl.advantages import combine_rewards, reward_stats, shuffled
from osp_megatron.rl.lora import (apply_lora, full_adapters, load_lora_state_dict, lora_disabled, lora_parameters,
                                  lora_state_dict, merge_lora)
from osp_megatron.rl.loss import kl_penalty, ppo_clip_loss
from osp_megatron.rl.rewards import LatentPreviewDecoder, MultiReward
from osp_megatron.rl.rollout import (NoiseSource, RolloutPlan, make_plan, ode_prefix, ode_sample, rollout,
                                     transition_log_prob)
from osp_megatron.rl.windows import WindowSchedule, count_nfe, group_prefix_runs
from osp_megatron.training import signals
from osp_megatron.training.clipping import GradClipper
from osp_megatron.training.rng import derive_seed, get_rng_state, set_rng_state
from osp_megatron.training.tracking import Tracker, run_tags, system_metrics
from osp_megatron.weights import read_latest
from osp_megatron.weights.lora import (ADAPTER, ADAPTER_EMA, GRPO_CHECKPOINTS as CKPT_SUBDIR, read_shard, shard_name,
                                       write_peft_adapter)

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# text conditioning
# --------------------------------------------------------------------------------------------
class RandomTextEmbedder:
    """Fixed random embeddings per prompt (tests / demo without a text encoder): `[L, D]` drawn from crc32(prompt);
    the null (CFG) embedding is the negative prompt's embedding, zeros when it is empty."""

    def __init__(self, text_len: int, text_dim: int, negative_prompt: str = "") -> None:
        self.text_len, self.text_dim = text_len, text_dim
        self.negative_prompt = negative_prompt
        self._cache: Dict[str, Tensor] = {}

    def _one(self, prompt: str) -> Tensor:
        if prompt not in self._cache:
            self._cache[prompt] = seeded_noise((self.text_len, self.text_dim), zlib.crc32(prompt.encode("utf-8")))
        return self._cache[prompt]

    def encode(self, prompts: Sequence[str]) -> Tensor:
        return torch.stack([self._one(p) for p in prompts])

    def null(self) -> Tensor:
        if self.negative_prompt:
            return self._one(self.negative_prompt)[None]
        return torch.zeros(1, self.text_len, self.text_dim)


class EncoderTextEmbedder:
    """umT5 (or the tiny stand-in) from `osp_megatron.encoders` (bf16 on CUDA), with an LRU cache of `cache_size`
    prompts (CPU, float32); null embedding = encoding of the negative prompt ("" by default)."""

    def __init__(self, spec: str, device, text_len: int, text_dim: int, cache_size: int = 256,
                 negative_prompt: str = "") -> None:
        from collections import OrderedDict


        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        self.enc = load_text_encoder(spec, device=device, dtype=dtype, text_len=text_len, text_dim=text_dim)
        self._cache: "OrderedDict[str, Tensor]" = OrderedDict()
        self.cache_size = cache_size
        self.negative_prompt = negative_prompt

    def encode(self, prompts: Sequence[str]) -> Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            for p, e in zip(new, self.enc.encode(new).float().cpu()):
                self._cache[p] = e
        out = torch.stack([self._cache[p] for p in prompts])
        for p in prompts:
            self._cache.move_to_end(p)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def null(self) -> Tensor:
        return self.enc.encode([self.negative_prompt]).float().cpu()


# --------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------
class _Dist:
    """Ranks and groups for GRPO (single process when torch.distributed is not initialised)."""

    def __init__(self, parallel=None, device="cpu") -> None:
        self.parallel, self.device = parallel, torch.device(device)
        self.on = dist.is_initialized() and dist.get_world_size() > 1
        if parallel is not None:
            self.dp, self.dp_rank, self.dp_group = parallel.dp, parallel.dp_rank, parallel.dp_group
            self.dp_cp_group = parallel.dp_cp_group
            self.cp_group = parallel.cp.cp_group
            self.tp_group, self.tp, self.tp_rank = parallel.tp_group, parallel.tp, parallel.tp_rank
            self.cp_rank = parallel.cp.ssp_rank * parallel.cp.ulysses + parallel.cp.ulysses_rank
            self.cp_size = parallel.cp.ssp * parallel.cp.ulysses
            if self.cp_size > 1:
                self.cp_rank = dist.get_rank(group=self.cp_group)
        else:
            self.dp, self.dp_rank, self.dp_group, self.dp_cp_group, self.cp_group = 1, 0, None, None, None
            self.tp_group, self.tp, self.tp_rank, self.cp_rank, self.cp_size = None, 1, 0, 0, 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.is_main = self.rank == 0

    def all_gather_1d(self, t: Tensor) -> Tensor:
        if not self.on or self.dp == 1 or self.dp_group is None:
            return t
        parts = [torch.empty_like(t) for _ in range(self.dp)]
        dist.all_gather(parts, t.contiguous(), group=self.dp_group)
        return torch.cat(parts)

    def max_over_dp(self, value: int) -> int:
        if not self.on or self.dp == 1 or self.dp_group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.dp_group)
        return int(t.item())

    def cp_all_gather(self, t: Tensor) -> Tensor:
        """Concatenate equal-size pieces of the context-parallel group in CP-rank order."""
        parts = [torch.empty_like(t) for _ in range(self.cp_size)]
        dist.all_gather(parts, t.contiguous(), group=self.cp_group)
        return torch.cat(parts)

    def reduce_grads(self, params: List[torch.nn.Parameter]) -> None:
        """Sum over DP x CP (CP ranks hold partial grads of one sample), divide by DP."""
        if not self.on or self.dp_cp_group is None or dist.get_world_size(self.dp_cp_group) == 1:
            return
        for p in params:  # a rank without samples in this update still joins the reduction
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dp_cp_group)
        flat /= self.dp
        off = 0
        for g in grads:
            g.copy_(flat[off: off + g.numel()].view_as(g))
            off += g.numel()

    def grad_norm(self, params: List[torch.nn.Parameter]) -> Tensor:
        """Global L2 norm: TP-sharded adapters summed over TP, replicated ones counted once."""
        dev = params[0].device
        rep = torch.zeros((), device=dev, dtype=torch.float64)
        shard = torch.zeros((), device=dev, dtype=torch.float64)
        for p in params:
            if p.grad is None:
                continue
            sq = p.grad.detach().double().pow(2).sum()
            if getattr(p, "lora_tp_split", "none") != "none":
                shard += sq
            else:
                rep += sq
        if self.on and self.tp > 1 and self.tp_group is not None:
            dist.all_reduce(shard, group=self.tp_group)
        return (rep + shard).sqrt()

    def barrier(self) -> None:
        if self.on:
            dist.barrier()


# --------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------
class GRPOTrainer:
    """Mix-GRPO on a DiT with LoRA. `model` (optional): a built model, else one built from `cfg`.

    `reward`: optional callable videos, prompts -> {name: scores}; default from `gcfg.rewards`.
    """

    def __init__(self, cfg, gcfg: GRPOConfig, model: Optional[torch.nn.Module] = None, parallel=None,
                 reward: Optional[MultiReward] = None, tracker=None, device=None) -> None:
        self.cfg, self.g = cfg, gcfg
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
        if model is None:
            model = build_model(cfg.model, parallel or ParallelState.single(), precision=cfg.precision,
                                device=self.device)
        if parallel is None:
            parallel = getattr(model, "parallel", None)
        if parallel is not None and getattr(parallel, "pp", 1) > 1:
            raise ValueError("osp-grpo does not support pipeline parallelism: set parallel.pipeline_parallel=1 "
                             "(use tensor/context parallelism for large models)")
        self.dist = _Dist(parallel, self.device)
        self.model = model
        self.model_dtype = next(model.parameters()).dtype
        n = gcfg.prompts_per_iteration * gcfg.group_size
        if n % self.dist.dp:
            raise ValueError(f"grpo.prompts_per_iteration x grpo.group_size = {n} samples are not divisible by the "
                             f"data-parallel size {self.dist.dp}: choose them so that DP divides the product")
        self.num_samples, self.local_samples = n, n // self.dist.dp
        self.lora_names = apply_lora(model, gcfg.lora.rank, gcfg.lora.alpha, gcfg.lora.targets, seed=gcfg.seed,
                                     dropout=gcfg.lora.dropout, init=gcfg.lora.init)
        self.params = lora_parameters(model)
        self._enable_recompute_grads(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=gcfg.lr, betas=(gcfg.adam_beta1, gcfg.adam_beta2),
                                           eps=gcfg.adam_eps, weight_decay=gcfg.weight_decay)
        self.clipper = GradClipper(gcfg.clip_mode, gcfg.clip_grad)
        self.ema: Optional[Dict[str, Tensor]] = None
        if gcfg.ema_decay > 0:
            self.ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.schedule = WindowSchedule.from_config(gcfg)
        self.reward = reward if reward is not None else MultiReward(gcfg.rewards)
        self.prompts = self._load_prompts()
        text_dim = int(getattr(getattr(model, "config", None), "text_dim", 0) or self._text_dim_from_model())
        if gcfg.text_source == "random":
            self.text = RandomTextEmbedder(gcfg.text_len, text_dim, gcfg.negative_prompt)
        else:
            self.text = EncoderTextEmbedder(cfg.encoders.text_encoder, self.device, gcfg.text_len, text_dim,
                                            negative_prompt=gcfg.negative_prompt)
        self._decoder = None
        self.null_text = self.text.null().to(self.device) if gcfg.cfg_scale != 1.0 else None
        self.latent_shape = [int(getattr(getattr(model, "config", None), "in_channels", 16))] + list(gcfg.latent_shape)
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = self.run_dir / CKPT_SUBDIR
        self.tracker = tracker
        self.iteration = 0
        self.stopped = False  # set by fit() when SIGTERM/SIGUSR1 stopped the run after a checkpoint
        self.history: List[Dict[str, float]] = []

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _enable_recompute_grads(model) -> None:
        """Activation recompute (megatron's reentrant checkpoint) only propagates gradients when a block input
        requires grad; with a frozen base nothing does, so the LoRA grads would be lost. Mark the patch-embedding
        output as requiring grad in training forwards (PEFT's `enable_input_require_grads`)."""
        if getattr(getattr(model, "config", None), "recompute_granularity", None) != "full":
            return
        emb = getattr(model, "patch_embedding", None)
        if emb is None:
            raise ValueError("model.recompute=full with LoRA needs the model's patch_embedding to mark block inputs "
                             "as requiring grad; set model.recompute=selective or none")

        def hook(module, args, out):
            if torch.is_grad_enabled() and not out.requires_grad:
                out.requires_grad_(True)
            return out

        emb.register_forward_hook(hook)

    def _text_dim_from_model(self) -> int:
        emb = getattr(self.model, "text_embedding", None)
        if emb is not None and hasattr(emb, "linear_1"):
            return emb.linear_1.in_features
        raise ValueError("cannot infer the model's text_dim: pass a model with config.text_dim")

    def _load_prompts(self) -> List[str]:
        if self.g.prompts_file:
            path = Path(self.g.prompts_file)
            if not path.is_file():
                raise FileNotFoundError(f"grpo.prompts_file={str(path)!r} not found: give a text file, one prompt a line")
            prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not prompts:
                raise ValueError(f"grpo.prompts_file={str(path)!r} has no prompts")
            return prompts
        return list(self.g.prompts)

    def decoder(self) -> Callable[[Tensor], Tensor]:
        if self._decoder is None:
            if self.g.decoder == "preview":
                self._decoder = LatentPreviewDecoder(self.latent_shape[0], seed=0)
            else:
                vae = load_vae(self.cfg.encoders.vae, device=self.device)
                self._decoder = vae.decode
        return self._decoder

    def velocity_fn(self, text: Tensor):
        dtype = self.model_dtype

        def call(x, timestep, t):
            return self.model(x.to(dtype), timestep, t.to(dtype)).float()

        null = self.null_text
        return cfg_velocity_fn(call, text.to(self.device), null, self.g.cfg_scale,
                               detach_uncond=self.g.cfg_train_uncond == "detached")

    # ------------------------------------------------------------------ one iteration
    def iteration_prompts(self, it: int) -> List[int]:
        """Prompt index of every prompt slot of iteration `it` (same on every rank)."""
        rng = random.Random(derive_seed(self.g.seed, it, 0xF0))
        return [rng.randrange(len(self.prompts)) for _ in range(self.g.prompts_per_iteration)]

    def local_ids(self) -> List[int]:
        r = self.dist.dp_rank
        return list(range(r * self.local_samples, (r + 1) * self.local_samples))

    def plan_for(self, it: int) -> RolloutPlan:
        g = self.g
        return make_plan(g.steps, g.shift, self.schedule.window(it), self.schedule.trained_steps(it), g.noise_level,
                         g.eta, g.flash.enabled, g.flash.compression, g.flash.order, g.flash.min_points)

    def prefix_steps(self, plan: RolloutPlan) -> int:
        """Steps before the window that a group runs once (0 when not sharing)."""
        if not (self.g.init_same_noise and self.g.share_prefix) or "sde" not in plan.kinds:
            return 0
        return plan.kinds.index("sde")

    def prefix_runs(self, plan: RolloutPlan) -> int:
        """Pre-window trajectories per iteration over all DP ranks (a group split over ranks runs once per rank)."""
        if self.prefix_steps(plan) == 0:
            return -1
        return group_prefix_runs(self.num_samples, self.g.group_size, self.dist.dp)

    def collect(self, it: int, plan: RolloutPlan):
        """Rollouts of this rank's samples -> dict of stored transitions, prompts, text, per-reward scores."""
        g = self.g
        ids = self.local_ids()
        slots = self.iteration_prompts(it)
        prompt_of = [self.prompts[slots[j // g.group_size]] for j in ids]
        noise = NoiseSource(g.seed, it, group=self.dist.cp_group)
        self.model.eval()
        start = self.prefix_steps(plan)
        prefix: Dict[int, Tensor] = {}
        if start > 0:  # the group's members are identical until the window: run those steps once per group
            local_slots = sorted({j // g.group_size for j in ids})
            for k in range(0, len(local_slots), g.rollout_batch):
                sb = local_slots[k: k + g.rollout_batch]
                x0 = noise.initial(self.latent_shape, sb, self.device)
                text = self.text.encode([self.prompts[slots[s]] for s in sb])
                for s, x in zip(sb, ode_prefix(self.velocity_fn(text), x0, plan, start)):
                    prefix[s] = x
        lat, nxt, lps, finals = [], [], [], []
        for k in range(0, len(ids), g.rollout_batch):
            mb = ids[k: k + g.rollout_batch]
            if start > 0:
                x_start = torch.stack([prefix[j // g.group_size] for j in mb])
            else:
                init_ids = [j // g.group_size for j in mb] if g.init_same_noise else [1_000_000 + j for j in mb]
                x_start = noise.initial(self.latent_shape, init_ids, self.device)
            text = self.text.encode(prompt_of[k: k + g.rollout_batch])
            res = rollout(self.velocity_fn(text), x_start, plan,
                          lambda step, mb=mb: noise.sde(self.latent_shape, mb, step, self.device), start=start)
            lat.append(res.latents)
            nxt.append(res.next_latents)
            lps.append(res.log_probs)
            finals.append(res.final)
        final = torch.cat(finals)
        scores = self.score(final, prompt_of)
        return {"ids": ids, "prompts": prompt_of, "latents": torch.cat(lat), "next_latents": torch.cat(nxt),
                "old_log_probs": torch.cat(lps), "scores": scores, "final": final}

    @torch.no_grad()
    def score(self, final: Tensor, prompts: List[str]) -> Dict[str, Tensor]:
        """Decode + reward. Every CP rank holds the same samples: each decodes and scores its share, then the
        scores are all-gathered over the CP group (once per sample, not once per rank)."""
        c, n = self.dist.cp_size, final.shape[0]
        if c > 1 and n % c == 0:
            per, r = n // c, self.dist.cp_rank
            part = self.reward(self.decoder()(final[r * per:(r + 1) * per]), prompts[r * per:(r + 1) * per])
            return {k: self.dist.cp_all_gather(v.float().to(self.device)) for k, v in part.items()}
        return self.reward(self.decoder()(final), prompts)

    def advantages(self, it: int, scores: Dict[str, Tensor]):
        """All-gather each reward over DP -> advantages for all samples -> (local slice [n_local], global rewards)."""
        g = self.g
        gathered = {k: self.dist.all_gather_1d(v.float().to(self.device)).cpu() for k, v in scores.items()}
        group_ids = torch.arange(self.num_samples) // g.group_size
        adv, combined = combine_rewards(gathered, self.reward.weights, group_ids, g.reward_mix, norm=g.adv_norm,
                                        eps=g.adv_eps, clip=g.adv_clip_max, unbiased=g.adv_unbiased_std)
        if g.shuffle_advantages:
            adv = shuffled(adv, torch.Generator().manual_seed(derive_seed(g.seed, it, 0x5F)))
        ids = self.local_ids()
        return adv[ids[0]: ids[-1] + 1], gathered, combined

    def train_samples(self, it: int, adv: Tensor) -> List[int]:
        """Local sample indices to train on, in training order.

        `zero_adv_filter`: samples with A = 0 are dropped; the kept count is raised to a multiple of the rollout
        micro-batch count by zero-advantage samples drawn at random (seeded), and when every A is 0 all samples
        are kept with A = 1e-6 (done by the caller). `shuffle_train_order`: a seeded permutation."""
        g = self.g
        n = adv.numel()
        order = list(range(n))
        if g.zero_adv_filter:
            keep = adv != 0
            kept = int(keep.sum())
            if kept:
                batches = -(-n // g.rollout_batch)
                short = (batches - kept % batches) % batches
                zeros = (~keep).nonzero(as_tuple=True)[0]
                if short and len(zeros) >= short:
                    gen = torch.Generator().manual_seed(derive_seed(g.seed, it, self.dist.dp_rank, 0x2E40))
                    keep[zeros[torch.randperm(len(zeros), generator=gen)[:short]]] = True
                order = keep.nonzero(as_tuple=True)[0].tolist()
        if g.shuffle_train_order:
            gen = torch.Generator().manual_seed(derive_seed(g.seed, it, self.dist.dp_rank, 0x5407))
            order = [order[i] for i in torch.randperm(len(order), generator=gen).tolist()]
        return order

    def update_groups(self, order: List[int]) -> List[List[List[int]]]:
        """Train micro-batches (of `train_batch` samples) grouped per optimizer step: `updates_per_iteration`
        even splits, or (0) one step per `grad_accumulation` micro-batches."""
        g = self.g
        if g.updates_per_iteration > 0:  # even splits (torch.chunk sizes)
            size = max(-(-len(order) // g.updates_per_iteration), 1)
            chunks = [order[k: k + size] for k in range(0, len(order), size)]
            return [[c[k: k + g.train_batch] for k in range(0, len(c), g.train_batch)] for c in chunks]
        micro = [order[k: k + g.train_batch] for k in range(0, len(order), g.train_batch)]
        acc = g.grad_accumulation
        return [micro[k: k + acc] for k in range(0, len(micro), acc)]

    def train_on(self, batch: Dict[str, Any], adv: Tensor, plan: RolloutPlan, it: int = 0) -> Dict[str, float]:
        g = self.g
        self.model.train()
        steps = list(plan.trained)
        stats = {"ratio_mean": [], "clip_frac": [], "approx_kl": [], "policy_loss": [], "kl": [], "grad_norm": [],
                 "clip_bound": []}
        if g.zero_adv_filter and bool((adv == 0).all()):
            adv = adv + 1e-6  # every advantage 0: train all samples with a tiny one (as OSP-Next does)
        order = self.train_samples(it, adv) if steps else []
        updates = self.update_groups(order)
        count = self.dist.max_over_dp(len(updates))  # every DP rank steps the optimizer equally often
        updates += [[] for _ in range(count - len(updates))]
        for micro in updates:
            self.optimizer.zero_grad(set_to_none=True)
            scale = 1.0 / (len(steps) * max(len(micro), 1))
            for mb in micro:
                idx = torch.tensor(mb)
                text = self.text.encode([batch["prompts"][i] for i in mb])
                fn = self.velocity_fn(text)
                a = adv[idx].to(self.device)
                for ki, step in enumerate(steps):
                    x = batch["latents"][idx, ki].to(self.device)
                    x_next = batch["next_latents"][idx, ki].to(self.device)
                    old = batch["old_log_probs"][idx, ki].to(self.device)
                    lp, mean, std = transition_log_prob(fn, x, x_next, plan, step)
                    loss, st = ppo_clip_loss(lp, old, a, g.clip_range)
                    if g.kl_beta > 0:
                        with torch.no_grad(), lora_disabled(self.model):
                            _, mean_ref, _ = transition_log_prob(fn, x, x_next, plan, step)
                        kl = kl_penalty(mean, mean_ref, std, g.kl_beta)
                        loss = loss + kl
                        stats["kl"].append(float(kl.detach()) / g.kl_beta)
                    (loss * scale).backward()
                    for key in ("ratio_mean", "clip_frac", "approx_kl", "policy_loss"):
                        stats[key].append(getattr(st, key))
            self.dist.reduce_grads(self.params)
            norm = self.dist.grad_norm(self.params)
            bound = self.clipper.bound(float(norm)) if math.isfinite(float(norm)) else None
            if bound is not None:
                coef = min(1.0, bound / (float(norm) + 1e-6))
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
                stats["clip_bound"].append(bound)
            stats["grad_norm"].append(float(norm))
            if math.isfinite(float(norm)):
                self.optimizer.step()
                self._update_ema()
        out = {k: (sum(v) / len(v)) for k, v in stats.items() if v}
        out["trained_samples"] = float(len(order))
        out["updates"] = float(len(updates))
        return out

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.g.ema_decay
        for n, p in self.model.named_parameters():
            if n in self.ema:
                self.ema[n].mul_(d).add_(p.detach(), alpha=1.0 - d)

    def step(self) -> Dict[str, float]:
        """One GRPO iteration; returns its metrics."""
        it = self.iteration
        t0 = time.perf_counter()
        plan = self.plan_for(it)
        batch = self.collect(it, plan)
        t1 = time.perf_counter()
        adv, gathered, combined = self.advantages(it, batch["scores"])
        m = self.train_on(batch, adv, plan, it)
        t2 = time.perf_counter()
        window = self.schedule.window(it)
        flash_post = plan.count("dpm") if self.g.flash.enabled else None
        nfe = count_nfe(self.g.steps, window, len(plan.trained), flash_post, self.g.cfg_scale, self.g.kl_beta > 0,
                        self.num_samples, self.prefix_runs(plan))
        metrics = {f"grpo/{k}": v for k, v in m.items()}
        metrics.update(reward_stats(gathered))
        metrics["reward/combined/mean"] = float(combined.mean())
        metrics["reward/combined/std"] = float(combined.std())
        metrics["window/start"] = float(window.start)
        metrics["window/trained_steps"] = float(len(plan.trained))
        metrics.update({f"nfe/{k}": float(v) for k, v in nfe.as_dict().items()})
        metrics["time/rollout_s"] = t1 - t0
        metrics["time/train_s"] = t2 - t1
        metrics["time/iteration_s"] = t2 - t0
        self.iteration += 1
        return metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, seeds: Optional[int] = None, steps: Optional[int] = None) -> Dict[str, float]:
        """Mean reward of deterministic Euler samples from fixed seeds for the first `eval_prompts` prompts (same on
        every rank), in micro-batches of `rollout_batch`."""
        g = self.g
        if g.eval_ema and self.ema is not None:
            with self.ema_weights():
                return self._evaluate(seeds, steps)
        return self._evaluate(seeds, steps)

    @contextlib.contextmanager
    def ema_weights(self):
        """The LoRA EMA in place of the LoRA weights inside the block (evaluation, as OSP-Next evaluates)."""
        live = dict(self.model.named_parameters())
        saved = {n: live[n].detach().clone() for n in self.ema}
        with torch.no_grad():
            for n, v in self.ema.items():
                live[n].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    live[n].copy_(v)

    @torch.no_grad()
    def _evaluate(self, seeds: Optional[int], steps: Optional[int]) -> Dict[str, float]:
        g = self.g
        seeds = seeds or g.eval_seeds
        self.model.eval()
        prompts = [p for p in self.prompts[: g.eval_prompts] for _ in range(seeds)]
        parts: Dict[str, List[Tensor]] = {}
        for k in range(0, len(prompts), g.rollout_batch):
            mb = prompts[k: k + g.rollout_batch]
            x0 = torch.stack([seeded_noise(self.latent_shape, derive_seed(g.seed, 0xE7A1, k + i)) for i in range(len(mb))])
            final = ode_sample(self.velocity_fn(self.text.encode(mb)), x0.to(self.device),
                               steps or g.eval_steps or g.steps, g.shift)
            for name, v in self.score(final, mb).items():
                parts.setdefault(name, []).append(v.float().cpu())
        scores = {k: torch.cat(v) for k, v in parts.items()}
        out = {f"eval/{k}": float(v.mean()) for k, v in scores.items()}
        total = sum(self.reward.weights.values())
        out["eval/combined"] = float(sum(self.reward.weights[k] / total * v.mean() for k, v in scores.items()))
        return out

    # ------------------------------------------------------------------ checkpoint / resume
    def _shard_name(self) -> str:
        return shard_name(self.dist.tp_rank)

    def save(self, run_id: Optional[str] = None) -> Path:
        """`<run_dir>/grpo_checkpoints/iter_XXXXXXX/` (written to a tmp dir, then renamed) + atomic `latest`;
        keeps the newest `train.keep_last` checkpoints. A checkpoint of the same iteration is not rewritten."""
        name = f"iter_{self.iteration:07d}"
        final = self.ckpt_root / name
        if final.is_dir() and (final / "meta.json").is_file():
            return final  # same iteration, same state (e.g. the end of a resumed, already finished run)
        tmp = self.ckpt_root / f".tmp_{name}"
        writer = self.dist.dp_rank == 0 and self.dist.cp_rank == 0
        if self.dist.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        # every rank's full RNG state (python, numpy, torch CPU, CUDA, megatron's TP tracker)
        torch.save(get_rng_state(), tmp / f"rng_rank{self.dist.rank:05d}.pt")
        if writer:
            ema = {k: v.detach().cpu().clone() for k, v in self.ema.items()} if self.ema is not None else None
            torch.save({"lora": lora_state_dict(self.model), "optimizer": self.optimizer.state_dict(), "lora_ema": ema},
                       tmp / self._shard_name())
        self.dist.barrier()
        adapters = full_adapters(self.model)  # TP shards joined (a collective over TP)
        adapters_ema = full_adapters(self.model, self.ema) if self.ema is not None else None
        if self.dist.is_main:
            extra = {"osp_megatron": {"iteration": self.iteration, "ema": False}}
            write_peft_adapter(adapters, tmp / ADAPTER, self.g.lora.init, extra)
            if adapters_ema is not None:
                extra["osp_megatron"].update(ema=True, ema_decay=self.g.ema_decay)
                write_peft_adapter(adapters_ema, tmp / ADAPTER_EMA, self.g.lora.init, extra)
            meta = {"iteration": self.iteration, "window": self.schedule.state_dict(), "run_id": run_id,
                    "clipper": self.clipper.state_dict(),
                    "grpo": asdict(self.g), "tp": self.dist.tp, "world_size": self.dist.world,
                    "lora_modules": self.lora_names}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))  # written last: marks complete
            os.replace(tmp, final)
            latest_tmp = self.ckpt_root / "latest.tmp"
            latest_tmp.write_text(name + "\n")
            os.replace(latest_tmp, self.ckpt_root / "latest")
            keep = max(int(getattr(self.cfg.train, "keep_last", 3)), 1)
            done = sorted(p for p in self.ckpt_root.glob("iter_*") if (p / "meta.json").is_file())
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
            if self.tracker is not None:
                self.tracker.write_curve("reward/combined/mean", "reward_curve.png", self.iteration)
        self.dist.barrier()
        return final

    def latest_checkpoint(self) -> Optional[Path]:
        return read_latest(self.ckpt_root)

    def load(self, path: Path) -> Dict[str, Any]:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("tp", 1) != self.dist.tp:
            raise ValueError(f"checkpoint {path} was written at TP={meta.get('tp')} but this run has TP={self.dist.tp}: "
                             "resume with the same parallel.tensor_parallel")
        self.schedule.check_state(meta["window"])
        shard = torch.load(path / self._shard_name(), map_location="cpu", weights_only=False)
        load_lora_state_dict(self.model, shard["lora"])
        self.optimizer.load_state_dict(shard["optimizer"])
        if self.ema is not None:
            saved = shard.get("lora_ema")
            if saved is None or set(saved) != set(self.ema):
                raise ValueError(f"checkpoint {path} has no matching LoRA EMA but grpo.ema_decay={self.g.ema_decay}: "
                                 "resume with the same ema_decay setting (or 0)")
            for k, v in saved.items():
                self.ema[k].copy_(v)
        rng = path / f"rng_rank{self.dist.rank:05d}.pt"
        if meta.get("world_size") == self.dist.world and rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
        elif self.dist.is_main:  # GRPO's own streams are seeded by (seed, iteration, sample): results do not change
            print(f"[osp-grpo] world size changed {meta.get('world_size')} -> {self.dist.world}: RNG states re-seeded",
                  flush=True)
        self.clipper.load_state_dict(meta.get("clipper"))
        self.iteration = int(meta["iteration"])
        return meta

    # ------------------------------------------------------------------ the loop
    def fit(self, iterations: Optional[int] = None, resume: bool = True, track: bool = True) -> List[Dict[str, float]]:
        """Run until `iterations` (default grpo.iterations) with eval, logging, checkpoints; returns the metrics."""
        g = self.g
        total = iterations if iterations is not None else g.iterations
        run_id = None
        if resume:
            path = self.latest_checkpoint()
            if path is not None:
                run_id = self.load(path).get("run_id")
                if self.dist.is_main:
                    print(f"[osp-grpo] resumed from {path} at iteration {self.iteration}", flush=True)
        if track and self.tracker is None:
            self.tracker = Tracker(self.cfg.tracking, self.run_dir, enabled=self.dist.is_main, run_id=run_id)
            # drop lines of iterations lost by a crash; a re-opened run does not get the replayed ones again
            self.tracker.start_after(self.iteration - 1, reopened=run_id is not None)
            if self.tracker.active and run_id is None:
                params = {f"grpo.{k}": v for k, v in _flatten(asdict(g)).items()}
                self.tracker.log_params(params)
                self.tracker.set_tags(run_tags(self.dist.world))
        tr = self.tracker
        run_id = getattr(tr, "run_id", None)

        stop = signals.StopRequest().install()
        self.stopped = False
        try:
            while self.iteration < total:
                it = self.iteration
                metrics: Dict[str, float] = {}
                if g.eval_interval and it % g.eval_interval == 0:
                    metrics.update(self.evaluate())
                metrics.update(self.step())
                self.history.append(metrics)
                metrics = {**metrics, **system_metrics(self.device)} if self.dist.is_main else metrics
                if tr is not None:
                    tr.log_metrics(metrics, step=it)
                    if it % g.log_interval == 0:
                        tr.console(format_grpo_progress(it, total, metrics))
                if signals.agree_on_stop(stop.requested, self.device):
                    self.save(run_id)
                    if self.dist.is_main:
                        print(f"[osp-grpo] stop signal: checkpointed iteration {self.iteration}; requeue to continue "
                              f"(exit code {signals.EXIT_REQUEUE})", flush=True)
                    self.stopped = True
                    if tr is not None:
                        tr.finish("KILLED")
                    return self.history
                if g.save_interval and self.iteration % g.save_interval == 0 and self.iteration < total:
                    self.save(run_id)
        finally:
            stop.uninstall()
        if g.eval_interval:
            final = self.evaluate()
            self.history.append(final)
            if tr is not None:
                tr.log_metrics(final, step=self.iteration)
                tr.console(f"final eval {final['eval/combined']:.4f} after {self.iteration} iterations")
        self.save(run_id)
        if tr is not None:
            tr.finish()
        return self.history


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def format_grpo_progress(it: int, total: int, m: Dict[str, float]) -> str:
    parts = [f"iter {it + 1}/{total}", f"reward {m.get('reward/combined/mean', float('nan')):.4f}"]
    if "eval/combined" in m:
        parts.append(f"eval {m['eval/combined']:.4f}")
    parts.append(f"window {int(m.get('window/start', 0))}")
    if "grpo/clip_frac" in m:
        parts.append(f"clip {m['grpo/clip_frac']:.2f}")
    if "grpo/kl" in m:
        parts.append(f"kl {m['grpo/kl']:.2e}")
    parts.append(f"nfe {int(m.get('nfe/nfe_per_iteration', 0))}")
    parts.append(f"{m.get('time/iteration_s', 0.0):.2f} s/it")
    return " | ".join(parts)


def merge_grpo_checkpoint(base_state_dict: Dict[str, Tensor], ckpt_dir, tp_rank: int = 0,
                          ema: Optional[bool] = None) -> Dict[str, Tensor]:
    """Export: fold the LoRA of a GRPO checkpoint (`<ckpt_dir>/lora_tpXX.pt`) into a base model state dict (the
    same TP shard) -> plain weights with the base keys (what the converter writes out). `ema`: None folds the EMA
    of the LoRA weights when the run kept one (grpo.ema_decay > 0), True requires it, False takes the live ones."""
    path = Path(ckpt_dir) / shard_name(tp_rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give a grpo_checkpoints/iter_XXXXXXX directory (and its tp rank)")
    lora = read_shard(path, ema)
    missing = sorted({k.rsplit(".", 1)[0] + ".weight" for k in lora} - set(base_state_dict))
    if missing:
        raise KeyError(f"base state dict lacks {missing[:5]}: export with the model the GRPO run adapted")
    return merge_lora({**base_state_dict, **lora})
