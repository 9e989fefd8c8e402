"""Activation offload: the tensors some blocks save for backward wait in pinned host memory.

`model.offload_blocks = N` offloads the first N blocks of each pipeline stage: their activations live longest
(saved first in forward, needed last in backward), so there is the most time to move them out and back.

    forward of an offloaded block   every tensor it saves for backward (>= 1 MiB, not a parameter) is copied to a
                                    pinned host buffer on a side stream; the device memory is released as soon as
                                    the copy is done (nothing else holds it)
    backward reaches block P        (P = min(2N, L-1): N+1 blocks before the first offloaded one is needed) every
                                    tensor of this forward pass is copied back on the side stream
    backward of an offloaded block  each saved tensor waits for its copy (copied now if no prefetch started)

Offloaded blocks save plain tensors: selective recompute is off inside them (its recipes keep device
references to their inputs, which would hold the memory the offload releases); the other blocks follow
`model.recompute`. Host buffers are pooled by (shape, dtype) and reused from step to step; copies back use the
same side stream as copies out, so a buffer is only rewritten after its previous contents have been read. On CPU
the same bookkeeping runs with host-to-host copies (tests check the gradients bit for bit).
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, List, Optional, Set, Tuple

import torch

MIN_BYTES = 1 << 20


class _Saved:
    """One offloaded tensor: its host copy, and once brought back, the device tensor and the copy's event."""

    __slots__ = ("host", "device", "restored", "event")

    def __init__(self, host: torch.Tensor, device: torch.device):
        self.host, self.device = host, device
        self.restored: Optional[torch.Tensor] = None
        self.event = None


class ActivationOffload:
    """Offload the saved activations of chosen blocks (see the module docstring). One instance per model."""

    def __init__(self, num_blocks: int, num_layers: int, min_bytes: Optional[int] = None):
        if not 0 <= num_blocks <= num_layers:
            raise ValueError(f"model.offload_blocks={num_blocks}: must be in [0, {num_layers}] (blocks per stage)")
        self.num_blocks, self.num_layers = num_blocks, num_layers
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.prefetch_block = min(2 * num_blocks, num_layers - 1) if num_blocks else -1
        self._pool: Dict[Tuple, List[torch.Tensor]] = defaultdict(list)
        self._stream = None
        self.offloaded_bytes = 0  # of the last forward pass (tests, benchmarks)

    # ------------------------------------------------------------------ forward pass
    def start_pass(self, parameters) -> "_Pass":
        """A forward pass of the model: offloaded tensors are grouped per pass (several can be in flight)."""
        self.offloaded_bytes = 0
        return _Pass(self, {p.untyped_storage().data_ptr() for p in parameters})

    def _side_stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _host_buffer(self, t: torch.Tensor) -> torch.Tensor:
        free = self._pool[(tuple(t.shape), t.dtype)]
        if free:
            return free.pop()
        return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)

    def _release(self, host: torch.Tensor) -> None:
        self._pool[(tuple(host.shape), host.dtype)].append(host)

    def to_host(self, t: torch.Tensor) -> _Saved:
        host = self._host_buffer(t)
        stream = self._side_stream(t.device)
        if stream is None:
            host.copy_(t)
        else:
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(stream)  # the allocator reuses t's memory only after the copy
        self.offloaded_bytes += t.numel() * t.element_size()
        return _Saved(host, t.device)

    def start_restore(self, s: _Saved) -> None:
        if s.restored is not None:
            return
        out = torch.empty(s.host.shape, dtype=s.host.dtype, device=s.device)
        stream = self._side_stream(s.device)
        if stream is None:
            out.copy_(s.host)
        else:
            stream.wait_stream(torch.cuda.current_stream(s.device))  # `out`'s memory may have just been freed
            with torch.cuda.stream(stream):
                out.copy_(s.host, non_blocking=True)
                s.event = torch.cuda.Event()
                s.event.record(stream)
        s.restored = out
        self._release(s.host)  # rewritten only by a later copy on the same stream
        s.host = None

    def restore(self, s: _Saved) -> torch.Tensor:
        self.start_restore(s)
        if s.event is not None:
            torch.cuda.current_stream(s.device).wait_event(s.event)
            s.event = None
        return s.restored


class _Pass:
    def __init__(self, offload: ActivationOffload, parameter_storages: Set[int]):
        self.offload, self.parameter_storages = offload, parameter_storages
        self.saved: List[_Saved] = []

    def _pack(self, t: torch.Tensor):
        if (t.numel() * t.element_size() < self.offload.min_bytes or t.layout != torch.strided
                or t.untyped_storage().data_ptr() in self.parameter_storages):
            return t
        s = self.offload.to_host(t)
        self.saved.append(s)
        return s

    def _unpack(self, packed):
        return self.offload.restore(packed) if isinstance(packed, _Saved) else packed

    @contextmanager
    def block(self):
        """Around an offloaded block's forward."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def prefetch(self) -> None:
        for s in self.saved:
            self.offload.start_restore(s)

    def prefetch_point(self, x: torch.Tensor) -> torch.Tensor:
        """Identity on x; when backward reaches it, every tensor of this pass starts its way back."""
        return _PrefetchPoint.apply(x, self)


class _PrefetchPoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pass_):
        ctx.pass_ = pass_
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.pass_.prefetch()
        ctx.pass_ = None
        return grad, None
