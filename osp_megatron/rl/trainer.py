"""The Mix-GRPO iteration on the shared trainer skeleton (`training.loop.Trainer`): rollouts sharded over DP,
rewards gathered for group statistics, PPO-clip on the window steps, megatron DDP + optimizer over the LoRA
parameters, torch_dist checkpoints, the tracker and exit codes of pretraining.

One iteration = one `Trainer` step (global batch = prompts_per_iteration x group_size samples; sample j belongs to
prompt slot j // G; DP rank r owns the contiguous samples [r·n/dp, (r+1)·n/dp); every rank of a context-parallel
group owns the same samples and draws the same noise):
1. window/trained steps from the schedule, the rollout plan (Euler | SDE window | Euler or Flash DPM).
2. rollouts (no grad) in micro-batches of `rollout_batch`: stored window transitions + old log-probs.
3. decode (latent preview or VAE) -> videos -> each reward; all-gather over DP -> advantages for all n samples
   (group- or global-normalised, multi-reward mix) -> this rank's slice.
4. `updates_per_iteration` optimizer updates over the local samples: for each micro-batch of `train_batch` and each
   trained step, re-score the stored transition, PPO-clip loss (+ KL to the LoRA-disabled model) divided by
   (#trained steps x #micro-batches), times the CP size, backward; megatron DDP averages the LoRA grads over
   DP x CP (CP ranks hold partial grads of one sample: the CP factor turns the average into their sum), then
   `Trainer.optimizer_update` (non-finite guard, clip, step, LoRA EMA).

The trainable set is the LoRA parameters: the base weights (`train.init_from`) are loaded before the adapters are
attached and stay frozen. A checkpoint (`<run_dir>/grpo_checkpoints/iter_XXXXXXX/`, the shared torch_dist
checkpointer) holds the LoRA parameters, their optimizer state and EMA, the full RNG state of every rank, the
clipper and window schedule, and two PEFT folders for export: `adapter/` and (with grpo.ema_decay > 0)
`adapter_ema/`.
"""
from __future__ import annotations

import contextlib
import copy
import random
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from osp_megatron.config import GRPOConfig
from osp_megatron.diffusion.samplers import cfg_velocity_fn, seeded_noise
from osp_megatron.encoders import load_text_encoder, load_vae
from osp_megatron.models import build_model
from osp_megatron.parallel import ParallelState, initialize_parallel
from osp_megatron.rl.advantages import combine_rewards, reward_stats, shuffled
from osp_megatron.rl.lora import apply_lora, full_adapters, lora_disabled, lora_parameters
from osp_megatron.rl.loss import kl_penalty, ppo_clip_loss
from osp_megatron.rl.rewards import LatentPreviewDecoder, MultiReward
from osp_megatron.rl.rollout import (NoiseSource, RolloutPlan, make_plan, ode_prefix, ode_sample, rollout,
                                     transition_log_prob)
from osp_megatron.rl.windows import WindowSchedule, count_nfe, group_prefix_runs
from osp_megatron.training import signals
from osp_megatron.training.clipping import GradClipper
from osp_megatron.training.ema import EMA, unwrap
from osp_megatron.training.loop import Trainer
from osp_megatron.training.rng import derive_seed
from osp_megatron.weights import load_into
from osp_megatron.weights.lora import ADAPTER, ADAPTER_EMA, GRPO_CHECKPOINTS, write_peft_adapter

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
# collectives over the injected parallel state
# --------------------------------------------------------------------------------------------
def _all_gather(t: Tensor, group, size: int) -> Tensor:
    """Equal-size pieces of every rank of `group` concatenated in group-rank order (`t` itself for one rank)."""
    if size == 1 or group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------
class GRPOTrainer(Trainer):
    """Mix-GRPO with LoRA on a DiT. Everything up to the data is built at construction (`Trainer.build`); `fit()`
    starts (checkpointer, resume, tracker), trains to grpo.iterations and returns the metrics of every iteration;
    `run_step()` runs one iteration.

    `model`: a built model (its base weights as they are), else one built from `cfg.model` with `train.init_from`
    loaded. `parallel`: ranks and groups (default: `parallel.*` of the launched job, or one process when
    torch.distributed is not initialised). `reward`: a callable videos, prompts -> {name: scores} (default from
    `grpo.rewards`)."""

    log_prefix = "[osp-grpo]"
    checkpoint_subdir = GRPO_CHECKPOINTS
    checkpoint_prefix = "iter_"

    def __init__(self, cfg, gcfg: Optional[GRPOConfig] = None, model: Optional[torch.nn.Module] = None,
                 parallel: Optional[ParallelState] = None, reward: Optional[MultiReward] = None, device=None,
                 log: Callable[[str], None] = print) -> None:
        gcfg = gcfg if gcfg is not None else cfg.grpo
        if cfg.grpo is not gcfg:
            cfg = copy.copy(cfg)  # the sections stay shared; the grpo section is the one this trainer runs
            cfg.grpo = gcfg
        device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
        if parallel is None and model is not None:
            parallel = getattr(model, "parallel", None)
        if parallel is None and not dist.is_initialized():
            parallel = ParallelState.single()  # one process: rank 0 of 1 with megatron's groups
        super().__init__(cfg, device, log)
        self.g = gcfg
        self.iterations = gcfg.iterations
        self.history: List[Dict[str, float]] = []
        self.stopped = False  # set by fit() when a stop signal ended the run after a checkpoint
        self.exit_code: Optional[int] = None
        self._parallel, self._model_in, self._reward_in = parallel, model, reward
        self.build()

    # ------------------------------------------------------------------ skeleton attributes
    @property
    def total_steps(self) -> int:
        return self.iterations

    @property
    def log_interval(self) -> int:
        return self.g.log_interval

    @property
    def save_interval(self) -> int:
        return self.g.save_interval

    @property
    def iteration(self) -> int:
        """Completed GRPO iterations (the trainer's step counter)."""
        return self.step

    # ------------------------------------------------------------------ build hooks
    def init_parallel(self) -> ParallelState:
        return self._parallel if self._parallel is not None else initialize_parallel(self.cfg.parallel)

    def setup_layout(self) -> None:
        g, ps = self.g, self.ps
        if ps.pp > 1:
            raise ValueError("osp-grpo does not support pipeline parallelism: set parallel.pipeline_parallel=1 "
                             "(use tensor/context parallelism for large models)")
        n = g.prompts_per_iteration * g.group_size
        if n % ps.dp:
            raise ValueError(f"grpo.prompts_per_iteration x grpo.group_size = {n} samples are not divisible by the "
                             f"data-parallel size {ps.dp}: choose them so that DP divides the product")
        self.num_samples, self.local_samples = n, n // ps.dp

    def build_model(self, device=None) -> torch.nn.Module:
        self._base_given = self._model_in is not None
        if self._base_given:
            model, self._model_in = self._model_in, None
            return model
        return build_model(self.cfg.model, self.ps, precision=self.cfg.precision, device=device or self.device)

    def configure_model(self, model: torch.nn.Module) -> None:
        """Base weights (`train.init_from`, unless the model was given) -> LoRA adapters -> recompute hook."""
        g, cfg = self.g, self.cfg
        if cfg.train.init_from and not self._base_given:
            ckpt = load_into(model, cfg.train.init_from, cfg.train.init_format, model_config=cfg.model)
            self.info(f"{self.log_prefix} base weights from {cfg.train.init_from} ({ckpt.format})")
            for note in ckpt.differences(cfg.model, cfg.precision):
                self.info(f"{self.log_prefix} train.init_from: {note} (this run's config wins)")
        self.model_dtype = next(model.parameters()).dtype
        self.lora_names = apply_lora(model, g.lora.rank, g.lora.alpha, g.lora.targets, seed=g.seed,
                                     dropout=g.lora.dropout, init=g.lora.init)
        self.params = lora_parameters(model)  # the trainable set
        self._enable_recompute_grads(model)

    def trainable_parameters(self, model: torch.nn.Module) -> List[torch.nn.Parameter]:
        return self.params

    def optimizer_config(self):
        from megatron.core.optimizer import OptimizerConfig

        g = self.g
        return OptimizerConfig(
            optimizer="adam", lr=g.lr, min_lr=g.lr, weight_decay=g.weight_decay, adam_beta1=g.adam_beta1,
            adam_beta2=g.adam_beta2, adam_eps=g.adam_eps, clip_grad=g.clip_grad,
            bf16=False, params_dtype=torch.float32,  # the adapters are fp32 whatever the base dtype
            use_distributed_optimizer=self.cfg.parallel.distributed_optimizer,
        )

    def build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        g = self.g
        return OptimizerParamScheduler(
            self.optimizer, init_lr=g.lr, max_lr=g.lr, min_lr=g.lr, lr_warmup_steps=0,
            lr_decay_steps=max(g.iterations, 1), lr_decay_style="constant", start_wd=g.weight_decay,
            end_wd=g.weight_decay, wd_incr_steps=max(g.iterations, 1), wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
        )

    def build_clipper(self) -> GradClipper:
        return GradClipper(self.g.clip_mode, self.g.clip_grad)

    def build_ema(self, model: torch.nn.Module) -> Optional[EMA]:
        """EMA of the LoRA parameters after every optimizer update (fp32, next to them)."""
        if self.g.ema_decay <= 0:
            return None
        return EMA(None, model, self.g.ema_decay, names=[n for n, p in model.named_parameters() if p.requires_grad])

    def model_sharded_state_dict(self) -> Dict[str, Any]:
        """The model's sharded state filtered to the trainable set (the LoRA parameters)."""
        net = unwrap(self.model)
        names = {n for n, p in net.named_parameters() if p.requires_grad}
        state = net.sharded_state_dict()
        missing = sorted(names - set(state))
        if missing:
            raise RuntimeError(f"the model's sharded state dict lacks the trainable parameters {missing[:5]}")
        return {k: v for k, v in state.items() if k in names}

    def setup_data(self) -> None:
        g = self.g
        net = unwrap(self.model)
        self.schedule = WindowSchedule.from_config(g)
        self.reward = self._reward_in if self._reward_in is not None else MultiReward(g.rewards)
        self.prompts = self._load_prompts()
        text_dim = int(getattr(getattr(net, "config", None), "text_dim", 0) or self._text_dim_from_model())
        if g.text_source == "random":
            self.text = RandomTextEmbedder(g.text_len, text_dim, g.negative_prompt)
        else:
            self.text = EncoderTextEmbedder(self.cfg.encoders.text_encoder, self.device, g.text_len, text_dim,
                                            negative_prompt=g.negative_prompt)
        self._decoder = None
        self.null_text = self.text.null().to(self.device) if g.cfg_scale != 1.0 else None
        self.latent_shape = [int(getattr(getattr(net, "config", None), "in_channels", 16))] + list(g.latent_shape)

    def describe(self) -> str:
        g = self.g
        return (f"{self.num_samples} samples/iteration ({g.prompts_per_iteration} prompts x G={g.group_size}), "
                f"{self.local_samples} per DP rank, LoRA r={g.lora.rank} on {len(self.lora_names)} linears")

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
        emb = getattr(unwrap(self.model), "text_embedding", None)
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
        r = self.ps.dp_rank
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
        return group_prefix_runs(self.num_samples, self.g.group_size, self.ps.dp)

    def collect(self, it: int, plan: RolloutPlan):
        """Rollouts of this rank's samples -> dict of stored transitions, prompts, text, per-reward scores."""
        g = self.g
        ids = self.local_ids()
        slots = self.iteration_prompts(it)
        prompt_of = [self.prompts[slots[j // g.group_size]] for j in ids]
        noise = NoiseSource(g.seed, it, group=self.ps.cp.cp_group)
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
        c, n = self.cp_size, final.shape[0]
        if c > 1 and n % c == 0:
            per, r = n // c, self.ps.cp.rank
            part = self.reward(self.decoder()(final[r * per:(r + 1) * per]), prompts[r * per:(r + 1) * per])
            return {k: _all_gather(v.float().to(self.device), self.ps.cp.cp_group, c) for k, v in part.items()}
        return self.reward(self.decoder()(final), prompts)

    def advantages(self, it: int, scores: Dict[str, Tensor]):
        """All-gather each reward over DP -> advantages for all samples -> (local slice [n_local], global rewards)."""
        g = self.g
        gathered = {k: _all_gather(v.float().to(self.device), self.ps.dp_group, self.ps.dp).cpu()
                    for k, v in scores.items()}
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
                    gen = torch.Generator().manual_seed(derive_seed(g.seed, it, self.ps.dp_rank, 0x2E40))
                    keep[zeros[torch.randperm(len(zeros), generator=gen)[:short]]] = True
                order = keep.nonzero(as_tuple=True)[0].tolist()
        if g.shuffle_train_order:
            gen = torch.Generator().manual_seed(derive_seed(g.seed, it, self.ps.dp_rank, 0x5407))
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

    def _max_over_dp(self, value: int) -> int:
        if self.ps.dp == 1 or self.ps.dp_group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ps.dp_group)
        return int(t.item())

    def _mean_over_dp(self, value: float) -> float:
        if self.ps.dp == 1 or self.ps.dp_group is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.ps.dp_group)
        return float(t.item()) / self.ps.dp

    def train_on(self, batch: Dict[str, Any], adv: Tensor, plan: RolloutPlan, it: int = 0) -> Dict[str, float]:
        """The PPO updates of one iteration; each goes through `Trainer.optimizer_update`. Its statistics."""
        from megatron.core.distributed import finalize_model_grads

        g = self.g
        self.model.train()
        steps = list(plan.trained)
        stats = {"ratio_mean": [], "clip_frac": [], "approx_kl": [], "policy_loss": [], "kl": [], "grad_norm": [],
                 "clip_bound": [], "loss": []}
        if g.zero_adv_filter and bool((adv == 0).all()):
            adv = adv + 1e-6  # every advantage 0: train all samples with a tiny one (as OSP-Next does)
        order = self.train_samples(it, adv) if steps else []
        updates = self.update_groups(order)
        count = self._max_over_dp(len(updates))  # every DP rank steps the optimizer equally often
        updates += [[] for _ in range(count - len(updates))]
        skipped = 0.0
        for micro in updates:
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            norm = 1.0 / (len(steps) * max(len(micro), 1))
            loss_sum = 0.0
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
                    # DDP averages over DP x CP; CP ranks hold partial grads of the same samples: x CP sums them
                    (loss * (norm * self.cp_size)).backward()
                    loss_sum += float(loss.detach()) * norm
                    for key in ("ratio_mean", "clip_frac", "approx_kl", "policy_loss"):
                        stats[key].append(getattr(st, key))
            finalize_model_grads([self.model])
            loss_mean = self._mean_over_dp(loss_sum)
            update = self.optimizer_update(loss_mean)
            stats["loss"].append(loss_mean)
            stats["grad_norm"].append(update["grad_norm"])
            if update["skipped_step"]:
                skipped = 1.0
            elif self.clipper.last_bound is not None:
                stats["clip_bound"].append(self.clipper.last_bound)
        out = {k: (sum(v) / len(v)) for k, v in stats.items() if v}
        out["trained_samples"] = float(len(order))
        out["updates"] = float(len(updates))
        out["skipped_step"] = skipped
        return out

    def train_step(self, step: int, batch: Any = None) -> Dict[str, float]:
        """GRPO iteration `step - 1` (evaluation first when it falls on grpo.eval_interval); its metrics."""
        it = step - 1
        g = self.g
        metrics: Dict[str, float] = {}
        if g.eval_interval and it % g.eval_interval == 0:
            metrics.update(self.evaluate())
        t0 = time.perf_counter()
        plan = self.plan_for(it)
        rolled = self.collect(it, plan)
        t1 = time.perf_counter()
        adv, gathered, combined = self.advantages(it, rolled["scores"])
        m = self.train_on(rolled, adv, plan, it)
        t2 = time.perf_counter()
        window = self.schedule.window(it)
        flash_post = plan.count("dpm") if g.flash.enabled else None
        nfe = count_nfe(g.steps, window, len(plan.trained), flash_post, g.cfg_scale, g.kl_beta > 0,
                        self.num_samples, self.prefix_runs(plan))
        skipped = m.pop("skipped_step")
        metrics.update({f"grpo/{k}": v for k, v in m.items()})
        metrics.update(reward_stats(gathered))
        metrics["reward/combined/mean"] = float(combined.mean())
        metrics["reward/combined/std"] = float(combined.std())
        metrics["window/start"] = float(window.start)
        metrics["window/trained_steps"] = float(len(plan.trained))
        metrics.update({f"nfe/{k}": float(v) for k, v in nfe.as_dict().items()})
        metrics["time/rollout_s"] = t1 - t0
        metrics["time/train_s"] = t2 - t1
        metrics["time/iteration_s"] = t2 - t0
        # the keys of the shared progress line and loop
        metrics["loss"] = m.get("loss", 0.0)
        if "grad_norm" in m:
            metrics["grad_norm"] = m["grad_norm"]
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["samples_per_s"] = self.num_samples / (t2 - t0)
        metrics["step_time_s"] = t2 - t0
        metrics["skipped_step"] = skipped
        metrics.update(self.step_counters())
        self.history.append(metrics)
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
        live = dict(unwrap(self.model).named_parameters())
        ema = self.ema.tensors()
        saved = {n: live[n].detach().clone() for n in ema}
        with torch.no_grad():
            for n, v in ema.items():
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

    def on_train_end(self) -> None:
        if self.g.eval_interval:
            final = self.evaluate()
            self.history.append(final)
            self.tracker.log_metrics(final, self.step)
            self.info(f"{self.log_prefix} final eval {final['eval/combined']:.4f} after {self.step} iterations")

    # ------------------------------------------------------------------ checkpoint / resume
    def state_dict_extras(self) -> Dict[str, Any]:
        return {"grpo": {"window": self.schedule.state_dict(), "lora_modules": list(self.lora_names)}}

    def load_state_dict_extras(self, state: Dict[str, Any]) -> None:
        saved = state.get("grpo") or {}
        self.schedule.check_state(saved.get("window", {}))
        if saved.get("lora_modules") != list(self.lora_names):
            raise ValueError("checkpoint LoRA modules differ from this run's: resume with the same grpo.lora.targets")

    def save(self, before_commit: Optional[Callable[[Path], None]] = None) -> Path:
        """Checkpoint the current iteration (collective): the shared torch_dist checkpoint of the LoRA state plus
        the PEFT folders `adapter/` (and `adapter_ema/`) for export. Returns the checkpoint directory."""
        if not hasattr(self, "tracker"):
            self.start()  # a checkpoint outside `fit()`, e.g. after `run_step()` calls
        g = self.g
        net = unwrap(self.model)
        adapters = full_adapters(net)  # TP shards joined (a collective over TP)
        adapters_ema = full_adapters(net, self.ema.tensors()) if self.ema is not None else None
        iteration = self.step

        def write_adapters(tmp: Path) -> None:  # rank 0, after the data, before the commit
            extra = {"osp_megatron": {"iteration": iteration, "ema": False}}
            write_peft_adapter(adapters, tmp / ADAPTER, g.lora.init, extra)
            if adapters_ema is not None:
                extra["osp_megatron"].update(ema=True, ema_decay=g.ema_decay)
                write_peft_adapter(adapters_ema, tmp / ADAPTER_EMA, g.lora.init, extra)
            if before_commit is not None:
                before_commit(tmp)

        super().save(before_commit=write_adapters)
        return self.checkpointer.root / self.checkpointer.dir_name(self.step)

    def on_save(self, step: int) -> None:
        self.tracker.write_curve("reward/combined/mean", "reward_curve.png", step)

    def load(self, path) -> None:
        """The training state of checkpoint directory `path` (collective)."""
        if not hasattr(self, "checkpointer"):
            self.make_checkpointer()
        self.load_checkpoint(Path(path))

    # ------------------------------------------------------------------ the loop
    def fit(self, iterations: Optional[int] = None, track: bool = True) -> List[Dict[str, float]]:
        """Start (resume when train.resume and a checkpoint exist), train to `iterations` (default
        grpo.iterations) with eval, logging and checkpoints, release the run; returns the metrics of every
        iteration (+ the final evaluation). `exit_code` / `stopped` tell how it ended. `track=False`: no tracker."""
        if iterations is not None:
            self.iterations = iterations
        self.tracking_enabled = track
        failed = True
        try:
            self.start()
            self.exit_code = self.train()
            failed = False
        finally:
            self.close(failed=failed)
        self.stopped = self.exit_code == signals.EXIT_REQUEUE
        return self.history
