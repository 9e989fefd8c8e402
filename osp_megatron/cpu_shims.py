"""The one place where megatron-core's CUDA assumptions are bridged for CPU-only runs (CI, laptops).

`apply()` is a no-op when CUDA is available. On a CPU-only torch build it:
- runs megatron's RNG tracker on the CPU generator (dropout forks, activation recompute),
- maps `torch.cuda.current_device()` to "cpu" and `torch.cuda.synchronize()` to a no-op,
- maps `device="cuda"` factory calls inside six megatron modules to CPU,
- reports CPU float tensors as `torch.cuda.*Tensor` to the type-string checks of megatron's
  optimizers and grad clipping,
- lets megatron's torch norm accept `sequence_parallel=True` and tags its params for TP grad reduction.

Pinned to megatron-core 0.16.1; `tests/test_cpu_shims.py` fails if a patched target disappears.
"""
from __future__ import annotations

import importlib

import torch

_APPLIED = False

PATCHED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
)


class _CpuTorchProxy:
    """Module-local `torch` whose tensor factories map device='cuda' to 'cpu'."""

    _FACTORIES = {"zeros", "ones", "empty", "tensor", "full", "zeros_like", "empty_like", "ones_like", "arange"}

    def __init__(self, mod):
        self._t = mod

    def __getattr__(self, key):
        attr = getattr(self._t, key)
        if key not in self._FACTORIES:
            return attr

        def factory(*args, **kwargs):
            dev = kwargs.get("device")
            if dev is not None and str(dev).startswith("cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


def _shim_rng() -> None:
    import megatron.core.tensor_parallel.random as rnd

    rnd._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    rnd._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: torch.set_rng_state(state)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.manual_seed = torch.manual_seed


def _shim_device() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None


def _shim_cudastr() -> None:
    for name in PATCHED_MODULES:
        mod = importlib.import_module(name)
        if not isinstance(mod.torch, _CpuTorchProxy):
            mod.torch = _CpuTorchProxy(torch)


def _shim_typestr() -> None:
    orig = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            s = orig(self)
            if self.device.type == "cpu" and not s.startswith("torch.cuda"):
                return s.replace("torch.", "torch.cuda.", 1)
            return s
        return orig(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


def _shim_spnorm() -> None:
    from megatron.core.transformer import torch_norm

    orig_new = torch_norm.WrappedTorchNorm.__new__

    class _NoSequenceParallel:
        def __init__(self, cfg):
            object.__setattr__(self, "_cfg", cfg)

        def __getattr__(self, key):
            return False if key == "sequence_parallel" else getattr(self._cfg, key)

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        sp = config.sequence_parallel
        module = orig_new(cls, _NoSequenceParallel(config) if sp else config, hidden_size, eps, **kwargs)
        for p in module.parameters():
            setattr(p, "sequence_parallel", sp)
        return module

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)


def apply() -> bool:
    """Install the shims once if CUDA is absent. Returns True when shims are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    _shim_rng()
    _shim_device()
    _shim_cudastr()
    _shim_typestr()
    _shim_spnorm()
    _APPLIED = True
    return True


def active() -> bool:
    return _APPLIED
