"""Selective activation recompute: cheap elementwise outputs are saved for backward as recipes, not tensors.

`model.recompute=selective` runs each block's forward inside `selective_recompute()`. There the fused pieces
(`models/fused.py`: modulated / affine LayerNorm, gated residual, RMSNorm, RoPE, bias + GELU) register their
outputs with `recomputable(out, fn, *args)`. When any op of the block saves such an output, or a view of it,
for backward (a linear saving its input, attention saving q/k), a recipe (fn, args, the view's geometry) is
stored instead, and the output is computed again, once, when the first of its consumers' backward needs it
(kept until the last of them is done). The args are tensors the pieces save anyway (the residual stream for a
norm, the pre-activation for GELU, the q/k projection for RMSNorm), so nothing is held twice; an arg that is
itself a registered output is stored as its own recipe (RMSNorm -> RoPE chains), so it is not held either.
This is megatron's `recompute_granularity=selective` idea applied to the elementwise work: GEMMs and attention
are never run twice.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Optional, Tuple

import torch

MODES = ("none", "selective", "full")


class _Recipe:
    __slots__ = ("fn", "args", "value")

    def __init__(self, fn: Callable, args: Tuple[Any, ...]):
        self.fn, self.args, self.value = fn, args, None

    def get(self, keep: bool = True) -> torch.Tensor:
        if self.value is not None:
            return self.value
        args = tuple(a.materialize(keep=False) if isinstance(a, _View) else a for a in self.args)
        with torch.no_grad():
            out = self.fn(*args)
        if keep:
            self.value = out
        return out


class _View:
    """A saved tensor as recipe + as_strided geometry on the recipe's (contiguous) output."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: _Recipe, t: torch.Tensor):
        self.recipe, self.size, self.stride, self.offset = recipe, tuple(t.shape), tuple(t.stride()), t.storage_offset()

    def materialize(self, keep: bool = True) -> torch.Tensor:
        return self.recipe.get(keep).as_strided(self.size, self.stride, self.offset)


class _Registry:
    def __init__(self):
        # storage data_ptr -> (the output, recipe, dtype, storage bytes); the outputs are held until the context
        # exits (the end of one block's forward), so no other tensor can take their memory meanwhile
        self.entries: Dict[int, Tuple[torch.Tensor, _Recipe, torch.dtype, int]] = {}

    def lookup(self, t: torch.Tensor) -> Optional[_Recipe]:
        if t.numel() == 0:
            return None
        storage = t.untyped_storage()
        entry = self.entries.get(storage.data_ptr())
        if entry is None:
            return None
        _, recipe, dtype, nbytes = entry
        if t.dtype != dtype or storage.nbytes() != nbytes:
            return None
        return recipe

    def register(self, out: torch.Tensor, fn: Callable, args: Tuple[Any, ...]) -> None:
        if out.numel() == 0 or not out.is_contiguous() or out.storage_offset() != 0:
            return
        storage = out.untyped_storage()
        if storage.nbytes() != out.numel() * out.element_size():
            return
        lazy = []
        for a in args:
            inner = self.lookup(a) if isinstance(a, torch.Tensor) else None
            lazy.append(_View(inner, a) if inner is not None else a)
        self.entries[storage.data_ptr()] = (out, _Recipe(fn, tuple(lazy)), out.dtype, storage.nbytes())

    def pack(self, t: torch.Tensor):
        recipe = self.lookup(t)
        return t if recipe is None else _View(recipe, t)


def _unpack(packed):
    return packed.materialize() if isinstance(packed, _View) else packed


_ACTIVE: Optional[_Registry] = None


@contextmanager
def selective_recompute(enabled: bool = True):
    """Within: registered cheap outputs are saved for backward as recipes (see the module docstring)."""
    global _ACTIVE
    if not enabled or not torch.is_grad_enabled():
        yield
        return
    outer, registry = _ACTIVE, _Registry()
    _ACTIVE = registry
    try:
        with torch.autograd.graph.saved_tensors_hooks(registry.pack, _unpack):
            yield
    finally:
        _ACTIVE = outer
        registry.entries.clear()


def recomputable(out: torch.Tensor, fn: Callable, *args) -> torch.Tensor:
    """Mark `out == fn(*args)` (computed without autograd) as recomputable in the active context; returns out."""
    if _ACTIVE is not None:
        _ACTIVE.register(out, fn, args)
    return out


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"model.recompute={mode!r}: use one of {', '.join(MODES)}")
    return mode
