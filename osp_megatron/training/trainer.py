"""The training loop: flow matching on megatron-core (DDP, (distributed) AdamW, pipeline schedules).

One optimizer step = `num_microbatches = global_batch / (micro_batch x DP)` micro-batches through
`get_forward_backward_func()` (no pipelining, or 1F1B when PP > 1), grads reduced by megatron DDP over the
DP x CP group, then: non-finite check (loss or grad norm -> skip the update), clip, AdamW step, LR schedule,
EMA. Checkpoints (full resume state), MLflow, signals and sample videos hang off the loop.

Loss bookkeeping: the model returns on the last stage `SSE_local / N_global` per micro-batch (this CP rank's
share; summed over the CP group it is the micro-batch MSE; every TP rank holds the same value). The schedule
multiplies the 2-tuple loss by CP and divides by num_microbatches, and DDP averages grads over DP x CP, which
gives the gradient of the mean MSE over the global batch. The logged loss is that mean MSE:
CP * (sum of `out` over last-stage ranks and micro-batches) / (number of those terms).
"""
from __future__ import annotations

import os
import random
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from osp_megatron.config import Config, resolved_dtype
from osp_megatron.diffusion.flow_matching import FlowMatching
from osp_megatron.training import signals
from osp_megatron.training.batches import BatchPreparer, EndlessLoader
from osp_megatron.training.checkpoint import CheckpointError, Checkpointer, shutdown_writer_manager
from osp_megatron.training.ema import EMA, unwrap
from osp_megatron.training.flops import model_flops_per_sample, train_flops_per_sample
from osp_megatron.training.tracking import Tracker, estimate_eta, format_progress

OPT_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


class NonFiniteStop(RuntimeError):
    """Raised after train.max_nonfinite_steps non-finite steps in a row."""


# ----------------------------------------------------------------------------------------------
# RNG state (python, numpy, torch CPU/CUDA, megatron tracker) of this rank
# ----------------------------------------------------------------------------------------------
def get_rng_state() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; on CUDA also megatron's per-TP-rank tracker.

    The DiT has no dropout, so on CPU the tracker stays empty (recompute saves/restores an empty set); seeding
    goes through `torch.default_generator` directly, bypassing torch.cuda.* which the CPU shims replace.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import parallel_state, tensor_parallel

        torch.cuda.manual_seed_all(seed)
        if parallel_state.model_parallel_is_initialized():  # else initialize_parallel seeds the tracker later
            tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _all_gather_object(obj: Any, group=None) -> List[Any]:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


class Trainer:
    """Builds everything from a validated `Config` (after torch.distributed is initialised) and trains."""

    def __init__(self, cfg: Config, device: torch.device, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.device = device
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.log_fn = log
        self.run_dir = Path(cfg.train.run_dir)
        self.dtype = resolved_dtype(cfg.precision)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.updates = 0
        self.tracking_run_id: Optional[str] = None
        self.last_sample_step = -1
        self.stop = signals.StopRequest()

    def info(self, msg: str) -> None:
        if self.rank == 0:
            self.log_fn(msg)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from osp_megatron import cpu_shims
        from osp_megatron.models import build_model
        from osp_megatron.parallel import initialize_parallel

        cfg, t = self.cfg, self.cfg.train
        cpu_shims.apply()
        self.ps = initialize_parallel(cfg.parallel)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.cp_size = parallel_state.get_context_parallel_world_size()
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.dims = cfg.model.resolve()
        # layout-native plans (CP or SP) run sparse blocks on the padded grid; single-device plans do not
        self.padded = self.cp_size > 1 or (cfg.parallel.sequence_parallel and cfg.parallel.tensor_parallel > 1)
        mbs = cfg.data.micro_batch_size
        self.global_batch = t.global_batch_size or mbs * self.dp_size
        self.num_microbatches = self.global_batch // (mbs * self.dp_size)

        # identical init on every DP rank; megatron's tracker gives per-TP-rank streams
        seed = t.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
        seed_everything(seed)

        def build(device=None):
            return build_model(cfg.model, self.ps, precision=cfg.precision, pre_process=parallel_state.is_pipeline_first_stage(),
                               post_process=self.is_last_stage, device=device)

        model = build()
        model.to(self.device)
        self._setup_quantization(model)
        tcfg = model.config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        self.model = DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=model)
        tcfg.finalize_model_grads_func = finalize_model_grads
        tcfg.no_sync_func = self.model.no_sync
        tcfg.grad_sync_func = None
        tcfg.param_sync_func = None
        opt_cfg = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
            bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_cfg, [self.model])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if t.warmup_steps else t.lr, max_lr=t.lr, min_lr=t.min_lr,
            lr_warmup_steps=t.warmup_steps, lr_decay_steps=t.steps,
            lr_decay_style="constant" if t.lr_schedule == "constant" else "cosine",
            start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.steps, wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,  # config wins on resume
        )
        ema_device = self.device if t.ema_device == "auto" else torch.device(t.ema_device)
        self.ema = EMA(lambda: build(ema_device), model, t.ema_decay, t.ema_interval) if t.ema_decay > 0 else None

        # data + encoders
        self._setup_data()
        self.flow = FlowMatching.from_train_config(t, self.dims.patch_size)
        self.preparer = BatchPreparer(self.flow, t.seed, self.dp_rank, self.device, self.dtype,
                                      vae=self.vae, text_encoder=self.text_encoder)
        self.checkpointer = Checkpointer(
            self.run_dir, keep_last=t.keep_last, async_save=t.async_save and self.device.type == "cuda",
            checksums=t.checkpoint_checksums,
            dp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
        )
        resumed = self._maybe_resume()
        if not resumed and t.init_from:
            self._init_weights(Path(t.init_from))
        self.tracker = Tracker(cfg.tracking, self.run_dir, enabled=self.rank == 0, run_id=self.tracking_run_id)
        if self.rank == 0:
            self.tracking_run_id = self.tracker.run_id
            self.tracker.metrics_log.truncate_after(self.step)
        self.tracking_run_id = _all_gather_object(self.tracking_run_id)[0]
        self._log_run_start(resumed)

    def _setup_data(self) -> None:
        cfg = self.cfg
        import data_pipeline

        self.loader = data_pipeline.build_loader(cfg.data, rank=self.dp_rank, world_size=self.dp_size,
                                                 text_dim=self.dims.text_dim)
        self.data = EndlessLoader(self.loader)
        need_vae = cfg.data.kind == "raw" or cfg.train.sample_interval > 0
        need_text = cfg.data.kind == "raw" or cfg.train.sample_interval > 0
        self.vae = self.text_encoder = None
        if need_vae or need_text:
            from osp_megatron.encoders import load_text_encoder, load_vae

            if need_vae:
                self.vae = load_vae(cfg.encoders.vae, self.device, torch.float32)
            if need_text:
                # umT5 in the training dtype (bf16 on GPU, as Wan2.1 does), the VAE in fp32
                self.text_encoder = load_text_encoder(cfg.encoders.text_encoder, self.device, self.dtype,
                                                      cfg.data.text_len, text_dim=self.dims.text_dim)

    def _log_run_start(self, resumed: bool) -> None:
        cfg = self.cfg
        if self.rank != 0:
            return
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = run_dir / "config.yaml"
        tmp = cfg_path.with_suffix(".yaml.tmp")
        tmp.write_text(cfg.to_yaml())
        os.replace(tmp, cfg_path)
        self.tracker.log_params(cfg.flat(), step=self.step)
        self.tracker.set_tags({"world_size": self.world, "dp": self.dp_size, "cp": self.cp_size,
                               "pp": self.pp_size, "resumed_from_step": self.step if resumed else 0})
        self.tracker.log_artifact(cfg_path, "config")
        n_params = sum(p.numel() for p in unwrap(self.model).parameters())
        self.info(
            f"[osp-train] world {self.world} (DP {self.dp_size} x CP {self.cp_size} x PP {self.pp_size} x "
            f"TP {self.world // (self.dp_size * self.cp_size * self.pp_size)}), {n_params:,} params on rank 0, "
            f"global batch {self.global_batch} = {self.num_microbatches} micro-batches x {cfg.data.micro_batch_size} "
            f"x DP {self.dp_size}, dtype {str(self.dtype).replace('torch.', '')}, "
            + (f"resumed at step {self.step}" if resumed else "fresh start")
            + (f", MLflow run {self.tracker.run_id} ({self.tracker.uri})" if self.tracker.active else "")
        )
        if cfg.data.kind == "synthetic":
            self.info(f"[osp-train] synthetic data: latents {list(cfg.data.synthetic_latent_shape)} "
                      "(data.synthetic_latent_shape; data.buckets are not used)")

    # ------------------------------------------------------------------------------------------ state
    def _setup_quantization(self, model) -> None:
        """precision.recipe -> the recipe the forward/backward runs under (HiF8 in our linears, FP8 in TE's)."""
        from osp_megatron.quant.modules import assign_hif8_keys
        from osp_megatron.quant.recipes import HiF8DelayedScaling, recipe_from_config

        self.recipe = recipe_from_config(self.cfg.precision)
        if isinstance(self.recipe, HiF8DelayedScaling):
            assign_hif8_keys(model)  # delayed scaling keeps one amax history per quantized tensor
        if self.recipe is not None:
            self.info(f"[osp-train] quantized training: precision.recipe={self.cfg.precision.recipe}")

    def _quantization_context(self):
        """HiF8 recipes: our autocast (amax of delayed scaling reduced over DP x CP so replicas share scales);
        TransformerEngine FP8 recipes: TE's autocast around the TE-spec model."""
        import contextlib

        from megatron.core import parallel_state

        from osp_megatron.quant.recipes import HiF8CurrentScaling, HiF8DelayedScaling, autocast

        if self.recipe is None:
            return contextlib.nullcontext()
        if isinstance(self.recipe, (HiF8CurrentScaling, HiF8DelayedScaling)):
            return autocast(enabled=True, recipe=self.recipe,
                            amax_reduction_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        import transformer_engine.pytorch as te  # fp8_* recipes are only accepted with model.spec=te

        return te.autocast(enabled=True, recipe=self.recipe)

    def _sharded_state(self, loading: bool) -> Dict[str, Any]:
        model = unwrap(self.model)
        state: Dict[str, Any] = {"model": model.sharded_state_dict()}
        state["optimizer"] = self.optimizer.sharded_state_dict(state["model"], is_loading=loading,
                                                               metadata=OPT_SHARDING)
        if self.ema is not None:
            state["ema"] = self.ema.sharded_state_dict()
        return state

    def save(self, before_commit=None) -> None:
        if not self.cfg.train.save_checkpoints:
            return
        state = self._sharded_state(loading=False)
        loader_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        state["osp"] = {
            "step": self.step,
            "updates": self.updates,
            "nonfinite_total": self.nonfinite_total,
            "scheduler": self.scheduler.state_dict(),
            "tracking_run_id": self.tracking_run_id,
            "world_size": self.world,
            "dp_size": self.dp_size,
            "rng": _all_gather_object(get_rng_state()),
            "loader": _all_gather_object({"dp_rank": self.dp_rank, "state": loader_state, "passes": self.data.passes}),
            "config_yaml": self.cfg.to_yaml(),
            "quant": self.recipe.state_dict() if hasattr(self.recipe, "state_dict") else None,
        }
        t0 = time.time()
        self.checkpointer.save(self.step, state, before_commit=before_commit)
        self.info(f"[osp-train] checkpoint step {self.step} -> {self.checkpointer.root} ({time.time() - t0:.1f} s"
                  + (", async" if self.checkpointer.async_save else "") + ")")

    def _materialize_optimizer_state(self) -> None:
        """Give a fresh distributed optimizer its Adam state tensors (placeholders, overwritten by the load):
        megatron's DistributedOptimizer.state_dict() needs them with torch's AdamW (no TE/Apex)."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            if hasattr(opt, "_init_optimizer_states_with_dummy_values") and inner is not None and not inner.state:
                opt._init_optimizer_states_with_dummy_values()

    def _restore_adam_step(self) -> None:
        """torch AdamW keeps a per-parameter 'step'; megatron 0.16's DistributedOptimizer restores it into the
        param groups but its dp_reshardable param-state copy then overwrites the per-param tensors with the
        placeholder's value. Put the saved group step back (bias correction must continue exactly)."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            if inner is None:
                continue
            for group in inner.param_groups:
                if "step" not in group or group["step"] is None:
                    continue
                for p in group["params"]:
                    st = inner.state.get(p)
                    if st and "step" in st:
                        st["step"] = torch.tensor(float(group["step"]), dtype=st["step"].dtype, device=st["step"].device)

    def _maybe_resume(self) -> bool:
        if not self.cfg.train.resume:
            if self.checkpointer.committed_steps():
                raise CheckpointError(
                    f"train.resume=false but {self.checkpointer.root} already holds checkpoints: use a new "
                    "train.run_dir (or delete that one) for a fresh run, or set train.resume=true to continue it"
                )
            return False
        self.checkpointer.remove_stale_tmp()
        ckpt = self.checkpointer.latest_dir()
        if ckpt is None:
            return False
        self._materialize_optimizer_state()
        loaded = self.checkpointer.load(ckpt, self._sharded_state(loading=True))
        model = unwrap(self.model)
        with torch.no_grad():  # fp32 main params are views of leaf params: copy in place without autograd
            model.load_state_dict(loaded["model"], strict=False)
            self.optimizer.load_state_dict(loaded["optimizer"])
            self._restore_adam_step()
        if self.ema is not None:
            if "ema" not in loaded:
                raise CheckpointError(f"checkpoint {ckpt} has no EMA weights but train.ema_decay > 0; set ema_decay=0")
            self.ema.module.load_state_dict({k[len("ema."):] if k.startswith("ema.") else k: v
                                             for k, v in loaded["ema"].items()}, strict=False)
        osp = loaded["osp"]
        self.step = int(osp["step"])
        self.updates = int(osp["updates"])
        self.nonfinite_total = int(osp["nonfinite_total"])
        self.scheduler.load_state_dict(osp["scheduler"])
        self.tracking_run_id = osp.get("tracking_run_id")
        if int(osp["world_size"]) == self.world:
            set_rng_state(osp["rng"][self.rank])
        else:
            self.info(f"[osp-train] world size changed {osp['world_size']} -> {self.world}: RNG states re-seeded "
                      "(noise is derived from (seed, dp_rank, step) and does not depend on them)")
        self._restore_loader(osp["loader"], int(osp["dp_size"]))
        if osp.get("quant") is not None and hasattr(self.recipe, "load_state_dict"):
            self.recipe.load_state_dict(osp["quant"], device=self.device)  # delayed-scaling amax histories
        return True

    def _restore_loader(self, entries: List[Dict[str, Any]], old_dp: int) -> None:
        by_dp = {}
        for e in entries:
            by_dp.setdefault(e["dp_rank"], e)
        states = [by_dp[i] for i in range(old_dp)]
        if not hasattr(self.loader, "load_state_dict") or states[0]["state"] is None:
            return
        if old_dp == self.dp_size:
            self.loader.load_state_dict(states[self.dp_rank]["state"])
            self.data.passes = int(states[self.dp_rank]["passes"])
        elif hasattr(self.loader, "load_resharded_state"):
            self.loader.load_resharded_state([s["state"] for s in states])
        else:
            self.info(f"[osp-train] data-parallel size changed {old_dp} -> {self.dp_size}: the loader cannot reshard "
                      "its position; data restarts from the beginning of its order")

    def _init_weights(self, path: Path) -> None:
        """Sparse fine-tune init: the weights of any checkpoint format (`osp_megatron.weights`: dense Wan2.1
        diffusers / original, OSP-Next, a megatron run) into the model built from `model:`."""
        from osp_megatron.weights import load_into

        model = unwrap(self.model)
        ckpt = load_into(model, path, self.cfg.train.init_format, model_config=self.cfg.model)
        self.optimizer.reload_model_params()  # the optimizer's main (fp32) params copy the loaded weights
        if self.ema is not None:
            self.ema.copy_from(model)
        self.info(f"[osp-train] initialised weights from {path} ({ckpt.format})")
        for note in ckpt.differences(self.cfg.model, self.cfg.precision):
            self.info(f"[osp-train] train.init_from: {note} (this run's config wins)")

    # ------------------------------------------------------------------------------------------ step
    def _forward_step(self, data_iterator, model, inject_nan: bool = False):
        mb = next(data_iterator)
        out = model(mb["x_t"], mb["timestep"], mb["text"], target=mb["target"])
        return out, partial(self._loss_func, inject_nan)

    def _loss_func(self, inject_nan: bool, out: torch.Tensor):
        if inject_nan:
            out = out * float("nan")
        return out, {"loss": out.detach().float().reshape(1).clone()}  # the schedule scales `out` in place

    def _pipeline_shape(self, latent_shape) -> Dict[str, int]:
        model = unwrap(self.model)
        mbs = self.cfg.data.micro_batch_size
        if hasattr(model, "pipeline_tensor_shape"):
            s, b = model.pipeline_tensor_shape(latent_shape, mbs)[:2]
            tp_sp = self.ps.tp if getattr(model.config, "sequence_parallel", False) else 1
            return {"seq_length": s * self.cp_size * tp_sp, "micro_batch_size": b}
        _, t, h, w = latent_shape
        pt, ph, pw = self.dims.patch_size
        return {"seq_length": (t // pt) * (h // ph) * (w // pw), "micro_batch_size": mbs}

    def next_microbatches(self, step: int) -> List[Dict[str, torch.Tensor]]:
        """The `num_microbatches` model-ready micro-batches of optimizer step `step` (1-based)."""
        return [self.preparer.prepare(self.data.next(), step, i) for i in range(self.num_microbatches)]

    def _work(self, micro: List[Dict[str, torch.Tensor]]):
        """(executed FLOPs, model FLOPs, tokens, samples) of these micro-batches on this DP rank."""
        cfg = self.cfg
        flops_exec = flops_model = tokens = samples = 0.0
        pt, ph, pw = self.dims.patch_size
        for mb in micro:
            shape = tuple(mb["x_t"].shape[1:])
            b, text_len = mb["x_t"].shape[0], mb["text"].shape[1]
            flops_exec += b * train_flops_per_sample(cfg.model, shape, text_len, cfg.model.recompute, self.padded)
            flops_model += b * model_flops_per_sample(cfg.model, shape, text_len, self.padded)
            tokens += b * (shape[1] // pt) * (shape[2] // ph) * (shape[3] // pw)
            samples += b
        return flops_exec, flops_model, tokens, samples

    def train_step(self, micro: Optional[List[Dict[str, torch.Tensor]]] = None) -> Dict[str, float]:
        """One optimizer step; `micro` (benchmarks) replaces the loader's micro-batches. Returns its metrics."""
        from megatron.core import parallel_state
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t = self.cfg.train
        step = self.step + 1
        t0 = time.perf_counter()
        if micro is None:
            micro = self.next_microbatches(step)
        flops_exec, flops_model, tokens, samples = self._work(micro)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        fb = get_forward_backward_func()
        with self._quantization_context():
            losses = fb(
                forward_step_func=partial(self._forward_step, inject_nan=step in t.debug_nonfinite_steps),
                data_iterator=iter(micro), model=[self.model], num_microbatches=len(micro),
                forward_only=False, **self._pipeline_shape(micro[0]["x_t"].shape[1:]),
            )
        # mean MSE over the global batch, known on every rank
        loss_sum = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.is_last_stage:
            loss_sum[0] = sum(float(x["loss"].sum()) for x in losses)
            loss_sum[1] = len(losses)
        dist.all_reduce(loss_sum)
        loss = float(self.cp_size * loss_sum[0] / max(loss_sum[1].item(), 1.0))

        # optimizer: non-finite guard -> clip -> step
        opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        finite = bool(np.isfinite(loss) and np.isfinite(grad_norm))
        if finite:
            if t.clip_grad > 0:
                for opt in opts:
                    params = opt.get_parameters()
                    if params:
                        clip_grad_by_total_norm_fp32(params, max_norm=t.clip_grad, total_norm=grad_norm)
            self.scheduler.step(increment=1)  # the LR of update number `updates + 1` (warmup starts above 0)
            self.optimizer.step_with_ready_grads()
            self.updates += 1
            if self.ema is not None:
                self.ema.update(self.model, self.updates)
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
        self.step = step

        stats = torch.tensor([flops_exec, flops_model, tokens, samples], dtype=torch.float64, device=self.device)
        dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        samples = float(stats[3])
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "step_time_s": dt,
            "samples_per_s": samples / dt,
            "tokens_per_s": float(stats[2]) / dt,
            "tflops_per_device": float(stats[0]) / dt / self.world / 1e12,
            "mfu": float(stats[1]) / dt / self.world / 1e12 / self.cfg.tracking.peak_tflops,
            "skipped_step": 0.0 if finite else 1.0,
            "nonfinite_steps_total": float(self.nonfinite_total),
            "nonfinite_in_row": float(self.nonfinite_in_row),
        }
        if self.device.type == "cuda":  # this rank's peak since start (rank 0's is what the console shows)
            metrics["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def _data_metrics(self) -> Dict[str, float]:
        """Loader counters summed over data-parallel ranks (one loader per DP rank: TP/CP/PP rank 0 reports)."""
        from megatron.core import parallel_state

        if not hasattr(self.loader, "metrics"):
            return {}
        reporter = (parallel_state.get_tensor_model_parallel_rank() == 0
                    and parallel_state.get_context_parallel_rank() == 0
                    and parallel_state.get_pipeline_model_parallel_rank() == 0)
        mine = {k: float(v) for k, v in self.loader.metrics().items() if isinstance(v, (int, float))} if reporter else {}
        out: Dict[str, float] = {}
        for counters in _all_gather_object(mine):
            for key, v in counters.items():
                out[f"data_{key}"] = out.get(f"data_{key}", 0.0) + v
        return out

    # ------------------------------------------------------------------------------------------ loop
    def maybe_sample(self, force: bool = False) -> None:
        t = self.cfg.train
        if not (force or (t.sample_interval and self.step % t.sample_interval == 0)):
            return
        self.last_sample_step = self.step
        if self.pp_size > 1:
            self.info("[osp-train] sample videos need parallel.pipeline_parallel=1; skipped")
            return
        from osp_megatron.training.samples import make_sample_videos

        if self.cfg.data.kind == "synthetic":
            latent_shape = tuple(self.cfg.data.synthetic_latent_shape)
        else:
            b = self.cfg.data.buckets[0]
            latent_shape = tuple(self.vae.latent_shape(b.frames, b.height, b.width))
        net = self.ema.module if self.ema is not None and self.ema.device == self.device else unwrap(self.model)
        paths = make_sample_videos(
            net, self.vae, self.text_encoder, t.sample_prompts, latent_shape, t.sample_steps, t.sample_guidance,
            t.sample_shift, t.sample_seed, self.device, torch.float32 if net is getattr(self.ema, "module", None) else self.dtype,
            self.run_dir / "samples", self.step, self.cfg.data.fps, write=self.rank == 0, solver=t.sample_solver,
        )
        for p in paths:
            self.tracker.log_artifact(p, "samples")
        if paths:
            self.info(f"[osp-train] samples at step {self.step}: {', '.join(str(p) for p in paths)}")

    def train(self) -> int:
        """Run to train.steps; returns the process exit code (see `signals`)."""
        t = self.cfg.train
        self.stop.install()
        start_step = self.step
        t_start = time.perf_counter()
        status, code = "FINISHED", signals.EXIT_OK
        try:
            while self.step < t.steps:
                metrics = self.train_step()
                self.checkpointer.finalize(blocking=False)
                if self.step % t.log_interval == 0 or metrics["skipped_step"] or self.step == t.steps:
                    metrics.update(self._data_metrics())
                    self.tracker.log_metrics(metrics, self.step)
                    eta = estimate_eta(time.perf_counter() - t_start, self.step - start_step, t.steps - self.step)
                    self.info(format_progress(self.step, t.steps, metrics, eta_s=eta))
                if metrics["skipped_step"]:
                    self.info(f"[osp-train] step {self.step}: non-finite loss {metrics['loss']} / grad norm "
                              f"{metrics['grad_norm']}: update skipped ({self.nonfinite_in_row} in a row)")
                    if self.nonfinite_in_row >= t.max_nonfinite_steps:
                        raise NonFiniteStop(
                            f"{self.nonfinite_in_row} non-finite steps in a row (train.max_nonfinite_steps="
                            f"{t.max_nonfinite_steps}); stopped without saving: the last good checkpoint is "
                            f"{self.checkpointer.latest_dir()}. Lower train.lr or check the data, then resume."
                        )
                else:
                    self.maybe_sample()
                # a skipped step leaves the weights of the last good step: saving or stopping here is safe
                stop = signals.agree_on_stop(self.stop.requested, self.device)
                budget = t.exit_after_steps and self.step - start_step >= t.exit_after_steps
                if stop or budget:
                    if self.step < t.steps:
                        self.save()
                        self.checkpointer.finalize(blocking=True)
                        why = f"signal {self.stop.signum}" if stop else f"train.exit_after_steps={t.exit_after_steps}"
                        self.info(f"[osp-train] stopped at step {self.step} ({why}); "
                                  + ("checkpointed for requeue" if t.save_checkpoints else
                                     "NOT checkpointed (train.save_checkpoints=false)")
                                  + f" (exit code {signals.EXIT_REQUEUE})")
                        status, code = "KILLED", signals.EXIT_REQUEUE
                        return code
                    break
                if (t.save_interval and self.step % t.save_interval == 0 and self.step < t.steps
                        and not metrics["skipped_step"]):  # periodic saves only from good steps
                    self.save()
            if self.checkpointer.last_committed != self.step:
                self.save()
            self.checkpointer.finalize(blocking=True)
            if t.sample_interval and self.last_sample_step != self.step:
                self.maybe_sample(force=True)
            self.info(f"[osp-train] done: {self.step} steps, {self.nonfinite_total} non-finite steps skipped")
            return code
        except NonFiniteStop as exc:
            self.info(f"[osp-train] {exc}")
            status, code = "FAILED", signals.EXIT_NONFINITE
            return code
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self.stop.uninstall()
            if self.rank == 0:
                self.tracker.finish(status)

    def close(self) -> None:
        try:
            if hasattr(self, "checkpointer"):
                self.checkpointer.close()
        finally:
            shutdown_writer_manager()
