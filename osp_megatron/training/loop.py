"""The trainer skeleton shared by every training recipe (pretraining, GRPO fine-tuning).

`Trainer` owns what does not depend on the objective:
    parallel state -> model (built by the subclass) -> megatron DDP over the *trainable parameter set* ->
    `get_megatron_optimizer` + LR scheduler -> EMA -> data (subclass) -> checkpointer -> resume (or init) ->
    tracker; then the loop: step -> log -> stop request (signals, exit budget) -> save -> exit code.
A subclass supplies the objective through these hooks (everything else has a default):

    setup_layout()                          sizes that depend on the parallel layout (before the model is built)
    build_model(device=None) -> nn.Module   the unwrapped module of this pipeline stage (called again for the
                                            EMA twin with its device); required
    configure_model(model)                  after `.to(device)`, before DDP (e.g. quantization recipes)
    trainable_parameters(model) -> params   the parameters the optimizer updates (default: all); every other
                                            parameter is frozen before DDP, so megatron allocates grad buffers
                                            and optimizer state for this set only
    optimizer_config() / build_scheduler()  megatron OptimizerConfig / OptimizerParamScheduler (default: train.*)
    build_clipper() / build_ema(model)      GradClipper / EMA or None (default: train.*; the EMA a twin model)
    model_sharded_state_dict()              the model entries of a checkpoint (default: the whole model; a subset
                                            such as the trainable parameters of a frozen base)
    setup_data()                            loaders, encoders, objective state (after the EMA is built)
    init_weights()                          a fresh run only (no checkpoint resumed)
    train_step(step, batch=None) -> metrics one optimizer step number `step`; call `self.optimizer_update(loss)`
                                            for the shared non-finite guard -> clip -> step -> EMA; return a dict
                                            with at least "loss" and the keys `optimizer_update` returned
    state_dict_extras() -> dict             python objects saved with the checkpoint (rank-agreed or gathered)
    load_state_dict_extras(state)           the inverse, on resume (`state` holds every saved entry)
    log_metrics_extras() -> dict            added to the metrics of logged steps (collective: every rank)
    on_good_step(metrics)                   after a step whose update was applied (e.g. sample videos)
    on_save(step)                           after a checkpoint of `step` was scheduled
    on_train_end()                          after the last step's checkpoint
    describe() -> str                       the batch part of the start line

`setup()` = `build()` (run-dir lock, parallel state, model, DDP, optimizer, EMA, data) + `start()` (checkpointer,
resume or init, tracker). `total_steps`, `log_interval`, `save_interval`, the checkpoint folder and step prefix
and `tracking_enabled` are attributes a subclass may override.

Exit codes are those of `signals`: 0 done, 3 checkpointed after a stop request, 4 too many non-finite steps.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from osp_megatron import cpu_shims
from osp_megatron.config import Config, resolved_dtype
from osp_megatron.config.redact import redact_secrets, redact_tree
from osp_megatron.parallel import initialize_parallel
from osp_megatron.training import signals
from osp_megatron.training.checkpoint import (
    Checkpointer, CheckpointError, RunDirLock, shutdown_writer_manager, start_writer_manager,
)
from osp_megatron.training.clipping import GradClipper
from osp_megatron.training.ema import EMA, unwrap
from osp_megatron.training.rng import derive_seed, get_rng_state, seed_everything, set_rng_state
from osp_megatron.training.tracking import Tracker, estimate_eta, format_progress, run_tags, system_metrics

OPT_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


class NonFiniteStop(RuntimeError):
    """Raised after train.max_nonfinite_steps non-finite steps in a row."""


def all_gather_object(obj: Any, group=None) -> List[Any]:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


class Trainer:
    """Builds everything from a validated `Config` (after torch.distributed is initialised) and trains."""

    log_prefix = "[osp-train]"
    checkpoint_subdir = "checkpoints"  # <run_dir>/<checkpoint_subdir>/<checkpoint_prefix>XXXXXXX
    checkpoint_prefix = "step_"
    tracking_enabled = True  # False: no tracker output at all (metrics, console, MLflow)

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
        self.stop = signals.StopRequest()

    def info(self, msg: str) -> None:
        if self.rank == 0:
            self.log_fn(msg)

    @property
    def total_steps(self) -> int:
        return self.cfg.train.steps

    @property
    def log_interval(self) -> int:
        return self.cfg.train.log_interval

    @property
    def save_interval(self) -> int:
        return self.cfg.train.save_interval

    # ------------------------------------------------------------------------------------------ hooks
    def build_model(self, device: Optional[torch.device] = None) -> torch.nn.Module:
        raise NotImplementedError

    def setup_layout(self) -> None:
        pass

    def configure_model(self, model: torch.nn.Module) -> None:
        pass

    def trainable_parameters(self, model: torch.nn.Module) -> Iterable[torch.nn.Parameter]:
        return model.parameters()

    def optimizer_config(self):
        from megatron.core.optimizer import OptimizerConfig

        t = self.cfg.train
        return OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
            bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
            use_distributed_optimizer=self.cfg.parallel.distributed_optimizer,
        )

    def build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        t = self.cfg.train
        return OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if t.warmup_steps else t.lr, max_lr=t.lr, min_lr=t.min_lr,
            lr_warmup_steps=t.warmup_steps, lr_decay_steps=t.steps,
            lr_decay_style="constant" if t.lr_schedule == "constant" else "cosine",
            start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.steps, wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,  # config wins on resume
        )

    def build_clipper(self) -> GradClipper:
        return GradClipper.from_train_config(self.cfg.train)

    def build_ema(self, model: torch.nn.Module) -> Optional[EMA]:
        t = self.cfg.train
        if t.ema_decay <= 0:
            return None
        ema_device = self.device if t.ema_device == "auto" else torch.device(t.ema_device)
        return EMA(lambda: self.build_model(ema_device), model, t.ema_decay, t.ema_interval)

    def model_sharded_state_dict(self) -> Dict[str, Any]:
        return unwrap(self.model).sharded_state_dict()

    def setup_data(self) -> None:
        pass

    def init_weights(self) -> None:
        pass

    def train_step(self, step: int, batch: Any = None) -> Dict[str, float]:
        raise NotImplementedError

    def state_dict_extras(self) -> Dict[str, Any]:
        return {}

    def load_state_dict_extras(self, state: Dict[str, Any]) -> None:
        pass

    def log_metrics_extras(self) -> Dict[str, float]:
        return {}

    def on_good_step(self, metrics: Dict[str, float]) -> None:
        pass

    def on_save(self, step: int) -> None:
        pass

    def on_train_end(self) -> None:
        pass

    def describe(self) -> str:
        return ""

    # ------------------------------------------------------------------------------------------ setup
    def init_parallel(self):
        return initialize_parallel(self.cfg.parallel)

    def setup(self) -> None:
        self.build()
        self.start()

    def build(self) -> None:
        """Run-dir lock -> parallel state -> model -> DDP over the trainable set -> optimizer, scheduler, clipper,
        EMA -> data."""
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.optimizer import get_megatron_optimizer


        cfg, t = self.cfg, self.cfg.train
        cpu_shims.apply()
        self._lock_run_dir()
        self.ps = self.init_parallel()
        ps = self.ps  # every rank, size and group below comes from the injected parallel state
        self.dp_rank, self.dp_size, self.cp_size, self.pp_size = ps.dp_rank, ps.dp, ps.cp.size, ps.pp
        self.is_first_stage, self.is_last_stage = ps.is_first_stage, ps.is_last_stage
        self.setup_layout()

        # identical init on every DP rank; one stream per pipeline stage; megatron's tracker gives per-TP-rank streams
        pp_rank = ps.pp_rank
        seed_everything(t.seed if pp_rank == 0 else derive_seed(t.seed, pp_rank))

        model = self.build_model()
        model.to(self.device)
        self.configure_model(model)
        trainable = {id(p) for p in self.trainable_parameters(model)}
        for p in model.parameters():
            if id(p) not in trainable:
                p.requires_grad_(False)
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
        self.optimizer = get_megatron_optimizer(self.optimizer_config(), [self.model])
        self.scheduler = self.build_scheduler()
        self.clipper = self.build_clipper()
        self.ema = self.build_ema(model)
        self.setup_data()

    def make_checkpointer(self) -> None:
        t = self.cfg.train
        self.checkpointer = Checkpointer(
            self.run_dir, keep_last=t.keep_last, async_save=t.async_save and self.device.type == "cuda",
            checksums=t.checkpoint_checksums, dp_group=self.ps.dp_cp_group,
            subdir=self.checkpoint_subdir, prefix=self.checkpoint_prefix,
        )

    def start(self) -> None:
        """Checkpointer -> resume (or `init_weights`) -> tracker -> the start line (collective)."""
        cfg, t = self.cfg, self.cfg.train
        self.make_checkpointer()
        if t.save_checkpoints:
            start_writer_manager()  # now, before the stop handlers exist (see `start_writer_manager`)
        resumed = self._maybe_resume()
        if not resumed:
            self.init_weights()
        self.tracker = Tracker(cfg.tracking, self.run_dir, enabled=self.rank == 0 and self.tracking_enabled,
                               run_id=self.tracking_run_id)
        if self.rank == 0:
            reopened = self.tracking_run_id is not None  # it already holds the steps replayed after the checkpoint
            self.tracking_run_id = self.tracker.run_id
            self.tracker.start_after(self.step, reopened)
        self.tracking_run_id = all_gather_object(self.tracking_run_id)[0]
        self._log_run_start(resumed)

    def _lock_run_dir(self) -> None:
        """Rank 0 holds `RunDirLock` until `close()`; a refusal is raised on every rank (collective)."""
        self.run_lock = RunDirLock(self.run_dir)
        problem = [None]
        if self.rank == 0:
            try:
                self.run_lock.acquire()
            except CheckpointError as exc:
                problem[0] = str(exc)
        dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise CheckpointError(problem[0])

    def _log_run_start(self, resumed: bool) -> None:
        cfg = self.cfg
        if self.rank != 0:
            return
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = run_dir / "config.yaml"
        tmp = cfg_path.with_suffix(".yaml.tmp")
        tmp.write_text(redact_secrets(cfg.to_yaml()))  # credentials in URIs never reach disk or the tracker
        os.replace(tmp, cfg_path)
        self.tracker.log_params(redact_tree(cfg.flat()), step=self.step)
        self.tracker.set_tags({**run_tags(self.world), "dp": self.dp_size, "cp": self.cp_size,
                               "pp": self.pp_size, "resumed_from_step": self.step if resumed else 0})
        self.tracker.log_artifact(cfg_path, "config")
        model = unwrap(self.model)
        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        describe = self.describe()
        self.info(
            f"{self.log_prefix} world {self.world} (DP {self.dp_size} x CP {self.cp_size} x PP {self.pp_size} x "
            f"TP {self.world // (self.dp_size * self.cp_size * self.pp_size)}), {n_params:,} params on rank 0"
            + (f" ({n_trainable:,} trainable)" if n_trainable != n_params else "") + ", "
            + (f"{describe}, " if describe else "")
            + (f"resumed at step {self.step}" if resumed else "fresh start")
            + (f", {self.tracker.describe()}" if self.tracker.active else "")
        )
        if self.ema is not None:
            host = self.ema.device.type == "cpu" and self.device.type == "cuda"
            what = ("fp32 twin" if self.ema.has_module
                    else f"fp32 copies of the {len(self.ema.tensors())} trainable tensors")
            self.info(f"{self.log_prefix} EMA decay {self.ema.decay} every {self.ema.interval} step(s), {what} on "
                      + ("the host (pinned copies on a side stream, lerp overlapped with the next step)" if host
                         else str(self.ema.device)) + "; cost per update in metrics ema_update_s / ema_copy_s / ema_wait_s")

    # ------------------------------------------------------------------------------------------ optimizer
    def optimizer_update(self, loss: float) -> Dict[str, float]:
        """After backward: non-finite guard (loss or grad norm -> skip) -> clip -> LR schedule -> optimizer step
        -> EMA. Returns grad_norm, skipped_step and the non-finite counters (metrics of this step)."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        finite = bool(np.isfinite(loss) and np.isfinite(grad_norm))
        if finite:
            bound = self.clipper.bound(grad_norm)
            if bound is not None:
                for opt in opts:
                    params = opt.get_parameters()
                    if params:
                        clip_grad_by_total_norm_fp32(params, max_norm=bound, total_norm=grad_norm)
            self.scheduler.step(increment=1)  # the LR of update number `updates + 1` (warmup starts above 0)
            if self.ema is not None:
                self.ema.fence()  # a host EMA's copies of the previous weights are done before they change
            self.optimizer.step_with_ready_grads()
            self.updates += 1
            if self.ema is not None:
                self.ema.update(self.model, self.updates)
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
        return {"grad_norm": grad_norm, "skipped_step": 0.0 if finite else 1.0}

    def step_counters(self) -> Dict[str, float]:
        """The non-finite counters after this step (for the step's metrics)."""
        return {"nonfinite_steps_total": float(self.nonfinite_total), "nonfinite_in_row": float(self.nonfinite_in_row)}

    def run_step(self, batch: Any = None) -> Dict[str, float]:
        """`train_step(self.step + 1, batch)`, then the step counter advances (also for a skipped update)."""
        step = self.step + 1
        metrics = self.train_step(step, batch)
        self.step = step
        if self.ema is not None:
            metrics.update(self.ema.stats())
        return metrics

    # ------------------------------------------------------------------------------------------ state
    def _sharded_state(self, loading: bool) -> Dict[str, Any]:
        state: Dict[str, Any] = {"model": self.model_sharded_state_dict()}
        state["optimizer"] = self.optimizer.sharded_state_dict(state["model"], is_loading=loading,
                                                               metadata=OPT_SHARDING)
        if self.ema is not None:
            state["ema"] = self.ema.sharded_state_dict(snapshot=not loading, model_state=state["model"])
        return state

    def weights_finite(self) -> bool:
        """Every weight of the model (and of the EMA twin) finite on every rank (collective)."""
        tensors = [p.detach() for p in unwrap(self.model).parameters()]
        if self.ema is not None:
            tensors += list(self.ema.tensors().values())
        bad = torch.stack([~torch.isfinite(x).all() for x in tensors]).any() if tensors else torch.tensor(False)
        flag = bad.to(device=self.device, dtype=torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def save(self, before_commit=None) -> None:
        """Checkpoint the current step (collective). Refuses weights that are not finite: the checkpoint that
        `latest` names stays the last one whose weights were all finite."""
        if not self.cfg.train.save_checkpoints:
            return
        if not self.weights_finite():
            raise NonFiniteStop(
                f"the weights after step {self.step} are not finite; not saved: the last good checkpoint is "
                f"{self.checkpointer.latest_dir()}. Lower train.lr or check the data, then resume.")
        state = self._sharded_state(loading=False)
        state["osp"] = {
            "step": self.step,
            "updates": self.updates,
            "nonfinite_total": self.nonfinite_total,
            "scheduler": self.scheduler.state_dict(),
            "tracking_run_id": self.tracking_run_id,
            "world_size": self.world,
            "dp_size": self.dp_size,
            "rng": all_gather_object(get_rng_state()),
            "config_yaml": redact_secrets(self.cfg.to_yaml()),
            "clip": self.clipper.state_dict(),
            **self.state_dict_extras(),
        }
        t0 = time.time()
        self.checkpointer.save(self.step, state, before_commit=before_commit)
        self.info(f"{self.log_prefix} checkpoint step {self.step} -> {self.checkpointer.root} ({time.time() - t0:.1f} s"
                  + (", async" if self.checkpointer.async_save else "") + ")")
        self.on_save(self.step)
        self.tracker.write_curve("loss", "loss_curve.png", self.step)  # rank 0; from metrics.jsonl

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
        ckpt = self.checkpointer.resume_dir(self.cfg.train.resume_from)
        if ckpt is None:
            return False
        self.load_checkpoint(ckpt, verified=True)
        if ckpt.parent == self.checkpointer.root:
            self.checkpointer.last_committed = self.step  # a rerun of a finished run does not save this step again
        self.info(f"{self.log_prefix} resuming from {ckpt}")
        return True

    def load_checkpoint(self, ckpt: Path, verified: bool = False) -> None:
        """The whole training state from checkpoint directory `ckpt` (collective)."""
        self._materialize_optimizer_state()
        loaded = self.checkpointer.load(ckpt, self._sharded_state(loading=True), verified=verified)
        model = unwrap(self.model)
        with torch.no_grad():  # fp32 main params are views of leaf params: copy in place without autograd
            model.load_state_dict(loaded["model"], strict=False)
            self.optimizer.load_state_dict(loaded["optimizer"])
            self._restore_adam_step()
        if self.ema is not None:
            if "ema" not in loaded:
                raise CheckpointError(f"checkpoint {ckpt} has no EMA weights but train.ema_decay > 0; set ema_decay=0")
            self.ema.load_state_dict(loaded["ema"])
        osp = loaded["osp"]
        self.step = int(osp["step"])
        self.updates = int(osp["updates"])
        self.nonfinite_total = int(osp["nonfinite_total"])
        self.scheduler.load_state_dict(osp["scheduler"])
        self.tracking_run_id = osp.get("tracking_run_id")
        if int(osp["world_size"]) == self.world:
            set_rng_state(osp["rng"][self.rank])
        else:
            self.info(f"{self.log_prefix} world size changed {osp['world_size']} -> {self.world}: RNG states re-seeded "
                      "(noise is derived from (seed, dp_rank, step) and does not depend on them)")
        self.clipper.load_state_dict(osp.get("clip"))
        self.load_state_dict_extras(osp)

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> int:
        """Run to train.steps; returns the process exit code (see `signals`)."""
        t = self.cfg.train
        self.stop.install()
        start_step = self.step
        t_start = time.perf_counter()
        status, code = "FINISHED", signals.EXIT_OK
        try:
            while self.step < self.total_steps:
                metrics = self.run_step()
                self.checkpointer.finalize(blocking=False)
                if self.step % self.log_interval == 0 or metrics["skipped_step"] or self.step == self.total_steps:
                    metrics.update(self.log_metrics_extras())
                    metrics.update(system_metrics(self.device) if self.rank == 0 else {})
                    self.tracker.log_metrics(metrics, self.step)
                    eta = estimate_eta(time.perf_counter() - t_start, self.step - start_step,
                                       self.total_steps - self.step)
                    if self.tracking_enabled:
                        self.info(format_progress(self.step, self.total_steps, metrics, eta_s=eta))
                if metrics["skipped_step"]:
                    self.info(f"{self.log_prefix} step {self.step}: non-finite loss {metrics['loss']} / grad norm "
                              f"{metrics['grad_norm']}: update skipped ({self.nonfinite_in_row} in a row)")
                    if self.nonfinite_in_row >= t.max_nonfinite_steps:
                        raise NonFiniteStop(
                            f"{self.nonfinite_in_row} non-finite steps in a row (train.max_nonfinite_steps="
                            f"{t.max_nonfinite_steps}); stopped without saving: the last good checkpoint is "
                            f"{self.checkpointer.latest_dir()}. Lower train.lr or check the data, then resume."
                        )
                else:
                    self.on_good_step(metrics)
                # a skipped step leaves the weights of the last good step: saving or stopping here is safe
                stop = signals.agree_on_stop(self.stop.requested, self.device)
                budget = t.exit_after_steps and self.step - start_step >= t.exit_after_steps
                if stop or budget:
                    if self.step < self.total_steps:
                        self.save()
                        self.checkpointer.finalize(blocking=True)
                        why = f"signal {self.stop.signum}" if stop else f"train.exit_after_steps={t.exit_after_steps}"
                        self.info(f"{self.log_prefix} stopped at step {self.step} ({why}); "
                                  + ("checkpointed for requeue" if t.save_checkpoints else
                                     "NOT checkpointed (train.save_checkpoints=false)")
                                  + f" (exit code {signals.EXIT_REQUEUE})")
                        status, code = "KILLED", signals.EXIT_REQUEUE
                        return code
                    break
                if (self.save_interval and self.step % self.save_interval == 0 and self.step < self.total_steps
                        and not metrics["skipped_step"]):  # periodic saves only from good steps
                    self.save()
            if self.checkpointer.last_committed != self.step:
                self.save()
            self.checkpointer.finalize(blocking=True)
            self.on_train_end()
            self.info(f"{self.log_prefix} done: {self.step} steps, {self.nonfinite_total} non-finite steps skipped")
            return code
        except NonFiniteStop as exc:
            self.info(f"{self.log_prefix} {exc}")
            status, code = "FAILED", signals.EXIT_NONFINITE
            return code
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self.stop.uninstall()
            if self.rank == 0:
                try:
                    self.tracker.finish(status)
                except Exception as exc:  # noqa: BLE001 - never hide the error that ended the run
                    if status != "FAILED":
                        raise
                    print(f"{self.log_prefix} the tracker could not record the failure either "
                          f"({type(exc).__name__}: {redact_secrets(str(exc))[:300]})", file=sys.stderr, flush=True)

    def close(self, failed: bool = False) -> None:
        """Release the run: finish an async save in flight (collective) unless this rank `failed` (its peers may
        be inside another collective; the save is abandoned and `latest` keeps naming the previous checkpoint)."""
        try:
            if hasattr(self, "checkpointer"):
                self.checkpointer.close(collective=not failed)
        finally:
            shutdown_writer_manager()
            if hasattr(self, "run_lock"):
                self.run_lock.release()
