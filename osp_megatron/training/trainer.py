"""Flow-matching pretraining on megatron-core: the diffusion objective on the shared `loop.Trainer`.

One optimizer step = `num_microbatches = global_batch / (micro_batch x DP)` micro-batches through
`get_forward_backward_func()` (no pipelining, or 1F1B when PP > 1), grads reduced by megatron DDP over the
DP x CP group, then the shared update (`Trainer.optimizer_update`: non-finite check, clip, AdamW step, LR
schedule, EMA). Checkpoints, tracking, signals and exit codes come from the base class; this class adds the
data loader and encoders, quantization recipes, `train.init_from` and sample videos.

Loss bookkeeping: the model returns on the last stage `SSE_local / N_global` per micro-batch (this CP rank's
share; summed over the CP group it is the micro-batch MSE; every TP rank holds the same value). The schedule
multiplies the 2-tuple loss by CP and divides by num_microbatches, and DDP averages grads over DP x CP, which
gives the gradient of the mean MSE over the global batch. The logged loss is that mean MSE:
CP * (sum of `out` over last-stage ranks and micro-batches) / (number of those terms).
"""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

import data_pipeline
from osp_megatron.diffusion.flow_matching import FlowMatching
from osp_megatron.encoders import load_text_encoder, load_vae
from osp_megatron.models import build_model
from osp_megatron.quant.modules import assign_hif8_keys
from osp_megatron.quant.recipes import (FP8CurrentScaling, HiF8CurrentScaling, HiF8DelayedScaling, autocast,
                                        recipe_from_config, refresh_te_weight_caches)
from osp_megatron.training.batches import BatchPreparer, EndlessLoader
from osp_megatron.training.ema import unwrap
from osp_megatron.training.flops import model_flops_per_sample, packed_plan, train_flops_per_sample
from osp_megatron.training.loop import NonFiniteStop, Trainer, all_gather_object
from osp_megatron.training.samples import make_sample_videos, sample_settings
from osp_megatron.weights import load_into

__all__ = ["DiffusionTrainer", "NonFiniteStop"]


class DiffusionTrainer(Trainer):
    """Flow-matching pretraining / fine-tuning of the whole DiT (every parameter trainable)."""

    def __init__(self, cfg, device, log=print):
        super().__init__(cfg, device, log)
        self.last_sample_step = -1

    # ------------------------------------------------------------------------------------------ setup hooks
    def setup_layout(self) -> None:
        cfg = self.cfg
        self.dims = cfg.model.resolve()
        # layout-native plans (CP or SP) run sparse blocks on the padded grid; single-device plans do not
        self.padded = self.cp_size > 1 or (cfg.parallel.sequence_parallel and cfg.parallel.tensor_parallel > 1)
        self.packed = packed_plan(cfg.model.padding_free, self.padded)  # padding-free sparse blocks
        mbs = cfg.data.micro_batch_size
        self.global_batch = cfg.train.global_batch_size or mbs * self.dp_size
        self.num_microbatches = self.global_batch // (mbs * self.dp_size)

    def build_model(self, device=None) -> torch.nn.Module:
        return build_model(self.cfg.model, self.ps, precision=self.cfg.precision, pre_process=self.is_first_stage,
                           post_process=self.is_last_stage, device=device)

    def configure_model(self, model: torch.nn.Module) -> None:
        self._setup_quantization(model)

    def setup_data(self) -> None:
        cfg = self.cfg

        self.loader = data_pipeline.build_loader(cfg.data, rank=self.dp_rank, world_size=self.dp_size,
                                                 text_dim=self.dims.text_dim, latent_channels=self.dims.in_channels)
        self.data = EndlessLoader(self.loader)
        need_vae = cfg.data.kind == "raw" or cfg.train.sample_interval > 0
        need_text = cfg.data.kind == "raw" or cfg.train.sample_interval > 0 or cfg.data.caption_dropout > 0
        self.vae = self.text_encoder = None
        if need_vae or need_text:
            if need_vae:
                self.vae = load_vae(cfg.encoders.vae, self.device, torch.float32)
            if need_text:
                # umT5 in the training dtype (bf16 on GPU, as Wan2.1 does), the VAE in fp32
                self.text_encoder = load_text_encoder(cfg.encoders.text_encoder, self.device, self.dtype,
                                                      cfg.data.text_len, text_dim=self.dims.text_dim)
        self.flow = FlowMatching.from_train_config(cfg.train, self.dims.patch_size)
        self.preparer = BatchPreparer(self.flow, cfg.train.seed, self.dp_rank, self.device, self.dtype,
                                      vae=self.vae, text_encoder=self.text_encoder,
                                      caption_dropout=cfg.data.caption_dropout)

    def init_weights(self) -> None:
        if self.cfg.train.init_from:
            self._init_weights(Path(self.cfg.train.init_from))

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.num_microbatches} micro-batches x "
                f"{self.cfg.data.micro_batch_size} x DP {self.dp_size}, dtype {str(self.dtype).replace('torch.', '')}")

    def _log_run_start(self, resumed: bool) -> None:
        super()._log_run_start(resumed)
        if self.cfg.data.kind == "synthetic":
            self.info(f"[osp-train] synthetic data: latents {list(self.cfg.data.synthetic_latent_shape)} "
                      "(data.synthetic_latent_shape; data.buckets are not used)")

    # ------------------------------------------------------------------------------------------ state hooks
    def state_dict_extras(self) -> Dict[str, Any]:
        loader_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        return {
            "loader": all_gather_object({"dp_rank": self.dp_rank, "state": loader_state, "passes": self.data.passes}),
            "quant": self.recipe.state_dict() if hasattr(self.recipe, "state_dict") else None,
        }

    def load_state_dict_extras(self, state: Dict[str, Any]) -> None:
        self._restore_loader(state["loader"], int(state["dp_size"]))
        if state.get("quant") is not None and hasattr(self.recipe, "load_state_dict"):
            self.recipe.load_state_dict(state["quant"], device=self.device)  # delayed-scaling amax histories

    def _setup_quantization(self, model) -> None:
        """precision.recipe -> the recipe the forward/backward runs under (HiF8 in our linears, FP8 in TE's)."""
        self.recipe = recipe_from_config(self.cfg.precision, self.cfg.model.spec)
        if isinstance(self.recipe, HiF8DelayedScaling):
            assign_hif8_keys(model)  # delayed scaling keeps one amax history per quantized tensor
        if self.recipe is not None:
            self.info(f"[osp-train] quantized training: precision.recipe={self.cfg.precision.recipe}")

    def _quantization_context(self):
        """HiF8 and native FP8 recipes: our autocast (amax of delayed scaling reduced over DP x CP so replicas share scales);
        TransformerEngine FP8 recipes: TE's autocast around the TE-spec model."""
        import contextlib

        if self.recipe is None:
            return contextlib.nullcontext()
        if isinstance(self.recipe, (HiF8CurrentScaling, HiF8DelayedScaling, FP8CurrentScaling)):
            return autocast(enabled=True, recipe=self.recipe,
                            amax_reduction_group=self.ps.dp_cp_group)
        import transformer_engine.pytorch as te  # fp8_* recipes are only accepted with model.spec=te

        refresh_te_weight_caches(self.model)  # TE's FP8 weight copies follow the last optimizer step
        return te.autocast(enabled=True, recipe=self.recipe)

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
            flops_exec += b * train_flops_per_sample(cfg.model, shape, text_len, cfg.model.recompute == "full",
                                                     self.padded, self.packed)
            flops_model += b * model_flops_per_sample(cfg.model, shape, text_len)
            tokens += b * (shape[1] // pt) * (shape[2] // ph) * (shape[3] // pw)
            samples += b
        return flops_exec, flops_model, tokens, samples

    def train_step(self, step: int, micro: Optional[List[Dict[str, torch.Tensor]]] = None) -> Dict[str, float]:
        """Optimizer step number `step`; `micro` (benchmarks) replaces the loader's micro-batches. Its metrics."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t = self.cfg.train
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
        update = self.optimizer_update(loss)

        stats = torch.tensor([flops_exec, flops_model, tokens, samples], dtype=torch.float64, device=self.device)
        dist.all_reduce(stats, group=self.ps.dp_group)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        samples = float(stats[3])
        metrics = {
            "loss": loss,
            "grad_norm": update["grad_norm"],
            "grad_clip_bound": float(self.clipper.last_bound or 0.0),
            "lr": self.optimizer.param_groups[0]["lr"],
            "step_time_s": dt,
            "samples_per_s": samples / dt,
            "tokens_per_s": float(stats[2]) / dt,
            "tflops_per_device": float(stats[0]) / dt / self.world / 1e12,
            "mfu": float(stats[1]) / dt / self.world / 1e12 / self.cfg.tracking.peak_tflops,
            "skipped_step": update["skipped_step"],
            **self.step_counters(),
        }
        if self.device.type == "cuda":  # this rank's peak since start (rank 0's is what the console shows)
            metrics["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def log_metrics_extras(self) -> Dict[str, float]:
        return self._data_metrics()

    def _data_metrics(self) -> Dict[str, float]:
        """Loader counters summed over data-parallel ranks (one loader per DP rank: TP/CP/PP rank 0 reports)."""
        if not hasattr(self.loader, "metrics"):
            return {}
        reporter = self.ps.tp_rank == 0 and self.ps.cp.rank == 0 and self.ps.pp_rank == 0
        mine = {k: float(v) for k, v in self.loader.metrics().items() if isinstance(v, (int, float))} if reporter else {}
        out: Dict[str, float] = {}
        for counters in all_gather_object(mine):
            for key, v in counters.items():
                out[f"data_{key}"] = out.get(f"data_{key}", 0.0) + v
        return out

    # ------------------------------------------------------------------------------------------ loop hooks
    def maybe_sample(self, force: bool = False) -> None:
        t = self.cfg.train
        if not (force or (t.sample_interval and self.step % t.sample_interval == 0)):
            return
        self.last_sample_step = self.step
        if self.pp_size > 1:
            self.info("[osp-train] sample videos need parallel.pipeline_parallel=1; skipped")
            return

        if self.cfg.data.kind == "synthetic":
            latent_shape = tuple(self.cfg.data.synthetic_latent_shape)
        else:
            b = self.cfg.data.buckets[0]
            latent_shape = tuple(self.vae.latent_shape(b.frames, b.height, b.width))
        net = self.ema.module if self.ema is not None and self.ema.device == self.device else unwrap(self.model)
        st = sample_settings(t)
        paths = make_sample_videos(
            net, self.vae, self.text_encoder, t.sample_prompts, latent_shape, st["steps"], st["guidance"],
            st["shift"], st["seed"], self.device, torch.float32 if net is getattr(self.ema, "module", None) else self.dtype,
            self.run_dir / "samples", self.step, self.cfg.data.fps, write=self.rank == 0, solver=st["solver"],
            negative_prompt=st["negative_prompt"], latent_dtype=st["latent_dtype"],
        )
        for p in paths:
            self.tracker.log_artifact(p, "samples", step=self.step)  # the PNG strips become images at this step
        if paths:
            self.info(f"[osp-train] samples at step {self.step}: {', '.join(str(p) for p in paths)}")


    def close(self, failed: bool = False) -> None:
        try:
            if hasattr(self, "data"):
                self.data.close()  # the loader's worker processes (see EndlessLoader.close)
        finally:
            super().close(failed=failed)

    def on_good_step(self, metrics: Dict[str, float]) -> None:
        self.maybe_sample()

    def on_train_end(self) -> None:
        if self.cfg.train.sample_interval and self.last_sample_step != self.step:
            self.maybe_sample(force=True)
