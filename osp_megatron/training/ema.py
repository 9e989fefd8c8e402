"""Exponential moving average of the model weights, exact on every device.

The EMA copy is a second model built by the same factory (same TP/PP shard, same module names), kept in
fp32 without gradients, so `ema.module.sharded_state_dict(prefix="ema.")` checkpoints and reshards exactly
like the model. Every `interval` optimizer steps: ema <- lerp(ema, weights, 1 - decay)
(= decay * ema + (1 - decay) * weights), applied with `torch._foreach_lerp_` over all tensors at once.

Where the twin lives:
- next to the model (`train.ema_device=auto`): the update runs on the model's device (weights cast to fp32 in
  chunks of `CHUNK_NUMEL` elements, so the temporary is bounded);
- host memory while the model is on a GPU (`train.ema_device=cpu`, for models whose fp32 copy does not fit next
  to the training state): `update()` enqueues device -> host copies of the weights into pinned fp32 buffers on a
  side CUDA stream (ordered after the optimizer step by a stream wait) and records an event; a host thread waits
  for that event and then does the lerp, overlapped with the next step. `fence()` makes the model's stream wait
  (on the GPU, not the host) for the copies before the next optimizer step overwrites the weights; a new update,
  `wait()`, reading `module` for sampling and checkpointing all wait for the previous update first.
`stats()` reports the interval and the measured cost of the last update (copy, lerp, time the loop blocked).

A parameter subset (`names=`, e.g. LoRA adapters on a frozen base) keeps fp32 copies of those parameters only,
without a twin module: `tensors()` holds them, and `sharded_state_dict(model_state=...)` checkpoints them with the
sharding of the model's own entries (same keys under `ema.`).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Optional

import torch

CHUNK_NUMEL = 1 << 26  # elements cast to fp32 at a time for an on-device update of non-fp32 weights


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (anything with a `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def lerp_into(ema: List[torch.Tensor], weights: List[torch.Tensor], weight: float) -> None:
    """ema[i] <- ema[i] + weight * (weights[i] - ema[i]) (fp32 `ema`; `weights` cast in bounded chunks)."""
    if all(w.dtype == e.dtype and w.device == e.device for e, w in zip(ema, weights)):
        torch._foreach_lerp_(ema, weights, weight)
        return
    batch_e: List[torch.Tensor] = []
    batch_w: List[torch.Tensor] = []
    numel = 0
    for e, w in zip(ema, weights):
        batch_e.append(e)
        batch_w.append(w.to(device=e.device, dtype=e.dtype))
        numel += e.numel()
        if numel >= CHUNK_NUMEL:
            torch._foreach_lerp_(batch_e, batch_w, weight)
            batch_e, batch_w, numel = [], [], 0
    if batch_e:
        torch._foreach_lerp_(batch_e, batch_w, weight)


class EMA:
    """EMA weights of `source` in a twin module from `build_twin()` (fp32, no grad), or of the parameters
    `names` of `source` only (`build_twin=None`): fp32 copies next to those parameters."""

    def __init__(self, build_twin: Optional[Callable[[], torch.nn.Module]], source: torch.nn.Module, decay: float,
                 interval: int = 1, names: Optional[List[str]] = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in (0, 1) (train.ema_decay)")
        if (build_twin is None) == (names is None):
            raise ValueError("EMA: give either build_twin (whole model) or names (a parameter subset)")
        self.decay = float(decay)
        self.interval = int(interval)
        self._module: Optional[torch.nn.Module] = None
        if names is not None:
            own = dict(unwrap(source).named_parameters())
            unknown = [n for n in names if n not in own]
            if unknown or not names:
                raise ValueError(f"EMA: parameters {unknown[:5] or names} are not parameters of the model")
            self._source = unwrap(source)  # its sharded state gives the EMA entries their sharding
            self._names = list(names)
            self._ema = [torch.zeros(own[n].shape, dtype=torch.float32, device=own[n].device) for n in self._names]
        else:
            self._module = build_twin().float()
            for p in self._module.parameters():
                p.requires_grad_(False)
            self._names = [n for n, _ in self._module.named_parameters()]
            self._ema = [p for _, p in self._module.named_parameters()]
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._stream = None
        self._copied = None  # CUDA event: the staged copies of the last update are on the host
        self._staging: Optional[List[torch.Tensor]] = None
        self._cuda_device: Optional[torch.device] = None
        self._stats: Dict[str, float] = {"ema_interval": float(self.interval)}
        self.copy_from(source)

    # ------------------------------------------------------------------ access
    @property
    def module(self) -> torch.nn.Module:
        """The twin, after any update in flight has landed."""
        if self._module is None:
            raise AttributeError("this EMA keeps a parameter subset and has no twin module: use tensors()")
        self.wait()
        return self._module

    @property
    def has_module(self) -> bool:
        """Whether this EMA is a twin of the whole model (else a parameter subset)."""
        return self._module is not None

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The EMA tensors by parameter name (after any update in flight has landed)."""
        self.wait()
        return dict(zip(self._names, self._ema))

    @property
    def device(self) -> torch.device:
        return self._ema[0].device

    def sharded_state_dict(self, snapshot: bool = False, model_state: Optional[Dict] = None):
        """The EMA's sharded state (`ema.` prefix). `snapshot=True` (saving): a host twin that is updated in the
        background is cloned, so an asynchronous checkpoint write never sees a later update. A parameter subset
        takes the sharding of each parameter's entry in `model_state` (the model's sharded state dict)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        if self._module is not None:
            state = self.module.sharded_state_dict(prefix="ema.")
        else:
            import dataclasses

            if model_state is None:
                model_state = unwrap(self._source).sharded_state_dict()
            state = {}
            for name, tensor in self.tensors().items():
                entry = model_state.get(name)
                if not isinstance(entry, ShardedTensor):
                    raise RuntimeError(f"EMA: the model's sharded state has no tensor entry for {name}")
                state[f"ema.{name}"] = dataclasses.replace(entry, key=f"ema.{entry.key}", data=tensor)
        if snapshot and self._staging is not None:
            for key, value in state.items():
                if isinstance(value, ShardedTensor):
                    value.data = value.data.clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Loaded checkpoint entries (keys with or without the `ema.` prefix) into the EMA."""
        state = {k[len("ema."):] if k.startswith("ema.") else k: v for k, v in state.items()}
        if self._module is not None:
            self.module.load_state_dict(state, strict=False)
            return
        missing = [n for n in self._names if n not in state]
        if missing:
            raise RuntimeError(f"EMA: the checkpoint lacks {missing[:5]}")
        for name, tensor in self.tensors().items():
            tensor.copy_(state[name])

    def _pairs(self, source: torch.nn.Module):
        src = dict(unwrap(source).named_parameters())
        if self._module is None:
            return [(e, src[n]) for n, e in zip(self._names, self._ema)]
        dst = dict(self._module.named_parameters())
        if src.keys() != dst.keys():
            missing = sorted(set(src) ^ set(dst))[:5]
            raise RuntimeError(f"EMA twin does not match the model: differing parameters {missing}")
        return [(dst[k], src[k]) for k in dst]

    def _host_twin(self, source_device: torch.device) -> bool:
        return self.device.type == "cpu" and source_device.type == "cuda"

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def copy_from(self, source: torch.nn.Module) -> None:
        """ema <- weights (synchronous, exact)."""
        self.wait()
        for e, p in self._pairs(source):
            e.copy_(p.detach().to(device=e.device, dtype=torch.float32))  # blocking copy: complete on return

    @torch.no_grad()
    def update(self, source: torch.nn.Module, step: int) -> bool:
        """Apply one EMA update after optimizer step `step` (1-based) if it falls on the interval."""
        if step % self.interval != 0:
            return False
        t0 = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - t0
        pairs = self._pairs(source)
        ema = [e for e, _ in pairs]
        weights = [p.detach() for _, p in pairs]
        if self._host_twin(weights[0].device):
            self._update_from_device(ema, weights)
            self._stats["ema_wait_s"] = waited
        else:
            t1 = time.perf_counter()
            lerp_into(ema, weights, 1.0 - self.decay)
            self._stats.update(ema_wait_s=waited, ema_update_s=time.perf_counter() - t1)
        return True

    def _update_from_device(self, ema: List[torch.Tensor], weights: List[torch.Tensor]) -> None:
        if self._staging is None:
            self._cuda_device = weights[0].device
            self._stream = torch.cuda.Stream(device=self._cuda_device)
            self._staging = [torch.empty(e.shape, dtype=torch.float32, pin_memory=True) for e in ema]
        main = torch.cuda.current_stream(weights[0].device)
        start = torch.cuda.Event(enable_timing=True)
        self._copied = torch.cuda.Event(enable_timing=True)
        self._stream.wait_stream(main)  # the copies read the weights of this optimizer step
        with torch.cuda.stream(self._stream):
            start.record()
            for buf, w in zip(self._staging, weights):
                buf.copy_(w, non_blocking=True)  # cast to fp32 on the device, then device -> pinned host
            self._copied.record()
        copied, staging, weight = self._copied, self._staging, 1.0 - self.decay

        def finish() -> None:
            try:
                copied.synchronize()  # the host buffers hold the weights only once the copies completed
                t = time.perf_counter()
                torch._foreach_lerp_(ema, staging, weight)
                self._stats.update(ema_copy_s=start.elapsed_time(copied) / 1e3, ema_update_s=time.perf_counter() - t)
            except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
                self._error = exc

        self._thread = threading.Thread(target=finish, name="ema-host-update", daemon=True)
        self._thread.start()

    def fence(self) -> None:
        """Before the weights change again (the next optimizer step): order the model's stream after the copies
        of the last host update. GPU-side wait; the host does not block."""
        if self._copied is not None:
            torch.cuda.current_stream(self._cuda_device).wait_event(self._copied)
            self._copied = None

    def wait(self) -> None:
        """Block until the update in flight (host twin) has been applied."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        if self._error is not None:
            exc, self._error = self._error, None
            raise RuntimeError(f"EMA host update failed: {exc}") from exc

    def stats(self) -> Dict[str, float]:
        """`ema_interval` and, once an update ran, its measured cost in seconds: `ema_update_s` (the lerp),
        `ema_copy_s` (device -> host copies, host twin only) and `ema_wait_s` (time the loop blocked on the
        previous update)."""
        return dict(self._stats)
