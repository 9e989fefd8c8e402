"""HiF8 training recipes in the style of TransformerEngine, the `autocast` context, and the TE bridge.

Roles: every quantized tensor has a role. Forward roles ("input", "weight", "qkv") use `scale_max_fwd`,
backward roles ("grad_output", "grad_qkv") use `scale_max_bwd` and the recipe's `backward_rounding`.

* `HiF8CurrentScaling` (OSP-Next): per tensor and per call, scale = scale_max / amax(|x|) of *this* call,
  y = hif8_round(x * scale) / scale. Defaults 15 (forward: amax lands at the top of the 3-bit-mantissa centre)
  and 224 (backward: amax lands in the 2-bit band).
* `HiF8DelayedScaling` (TE `DelayedScaling` semantics with HiF8 rounding): each (module key, role) slot keeps an
  amax history (length `amax_history_len`, newest at index 0) and a scale (initially 1). A tensor is quantized
  with the slot's current scale while its amax is recorded into history[0]; the amax recorded during step t
  sets the scale used at step t+1: amax = max(history) ("max") or history[0] ("most_recent") or
  `algo(history)` (callable); scale = (scale_max / amax) / 2^margin, the previous scale kept when amax is 0 or
  not finite, fp32 max when it overflows; then the history rolls (torch.roll(-1), history[0] = 0). A step is
  one outermost `autocast` region; the update of a slot is applied lazily on its first use in a later step
  (so a slot's history rolls once per step in which it was used). `interval` > 1 recomputes the scale only
  every `interval`-th update (history still rolls). TE's literal target is the format max (32768 for HiF8);
  the default targets here are OSP-Next's 15 / 224, because amax at 32768 leaves one mantissa bit. Values
  beyond the representable range saturate to +-32768 (as TE's FP8 casts do), since a stale scale can overflow.
* `FP8CurrentScaling` / `FP8DelayedScaling` (native FP8, no TransformerEngine): the same roles with FP8 casts
  (E4M3 forward; E5M2 gradients with fp8_format="hybrid", E4M3 with "e4m3"), scale = fp8_max / amax / 2^margin
  per call (current) or from the amax history (delayed, the slots above). `quantize` fake-quantizes (CPU and
  the reference: torch.float8_e4m3fn / float8_e5m2 casts, round to nearest even, saturating);
  `quantize_fp8` gives the fp8 codes and inverse scale that the quantized linears hand to `torch._scaled_mm`
  on CUDA (`modules.py`).
* `autocast(enabled=True, recipe=None, amax_reduction_group=None)`: makes `recipe` (default
  `HiF8CurrentScaling()`) the active one for HiF8 modules; `active_recipe()` returns it (None outside or when
  disabled). Delayed scaling all-reduces (MAX) each recorded amax over `amax_reduction_group` (e.g. the
  data-parallel group, so every replica keeps the same scales); the modules additionally reduce the amax of
  tensor-parallel shards over their TP group, for any recipe.
* TE bridge: `te_fp8_recipe(name)` builds TE's own FP8 recipes (delayed, current, block) and
  `te_custom_recipe(recipe)` wraps a HiF8 recipe as a TE `CustomRecipe` (TE >= 2.9) whose quantizers emit
  HiF8-fake-quantized operands (current scaling) consumed by a plain high-precision GEMM.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from osp_megatron.quant.hif8_kernels import FP32_MAX, qdq_current, qdq_with_scale, scale_from_amax

FORWARD_ROLES = ("input", "weight", "qkv")
BACKWARD_ROLES = ("grad_output", "grad_qkv")
ROLES = FORWARD_ROLES + BACKWARD_ROLES
HIF8_RECIPES = ("hif8_current", "hif8_delayed")
TE_FP8_RECIPES = ("fp8_delayed", "fp8_current", "fp8_block")
TE_MIN_VERSION_CUSTOM = (2, 9)


def _check_role(role: str) -> bool:
    """True for backward roles; raises for unknown ones."""
    if role not in ROLES:
        raise ValueError(f"role={role!r}: use one of {ROLES}")
    return role in BACKWARD_ROLES


_REUSED_ROLES = ("input", "grad_output")


class _ReuseLast:
    """Reuse the last quantization of an "input" or "grad_output" tensor handed in again unchanged (same object
    and version, same module key and group): the shared input of the Q, K and V linears, and the dy a
    row-parallel linear's bias add and its GEMM both quantize."""

    def _reset_reuse(self) -> None:
        self._last: Dict[str, Tuple[Any, ...]] = {}

    def _reused(self, x: torch.Tensor, role: str, key: Any, group: Any) -> Optional[torch.Tensor]:
        hit = self._last.get(role)
        if hit is not None and hit[0]() is x and hit[1] == x._version and hit[2] is group and (
            role == "input" or hit[3] == key
        ):
            return hit[4]
        return None

    def _remember(self, x: torch.Tensor, role: str, key: Any, group: Any, y: torch.Tensor) -> None:
        if role in _REUSED_ROLES:
            self._last[role] = (weakref.ref(x), x._version, group, key, y)


def _mix_seed(*parts: int) -> int:
    h = 0x811C9DC5
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 0x01000193) & 0xFFFFFFFF
    return h


@dataclasses.dataclass
class HiF8CurrentScaling(_ReuseLast):
    """OSP-Next current scaling: scale = scale_max / amax of this call, per tensor."""

    scale_max_fwd: float = 15.0
    scale_max_bwd: float = 224.0
    backward_rounding: str = "ta"  # ta | hybrid
    seed: int = 0  # hybrid rounding only

    def __post_init__(self) -> None:
        if self.scale_max_fwd <= 0 or self.scale_max_bwd <= 0:
            raise ValueError("HiF8CurrentScaling: scale_max_fwd and scale_max_bwd must be > 0 (defaults 15, 224)")
        if self.backward_rounding not in ("ta", "hybrid"):
            raise ValueError(f"backward_rounding={self.backward_rounding!r}: use ta or hybrid")
        self._calls = 0
        self._reset_reuse()

    def quantize(
        self,
        x: torch.Tensor,
        role: str,
        key: Optional[Any] = None,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> torch.Tensor:
        """Fake-quantize x (any shape, fp32/bf16/fp16) -> same shape and dtype. `key` is unused here.

        tp_group: the group the amax is all-reduced (MAX) over (e.g. the TP shards of one tensor, so every
        shard uses the scale of the whole tensor); None: this tensor's own amax. An "input" or "grad_output"
        quantized again unchanged (same tensor object and version) reuses the previous result.
        """
        backward = _check_role(role)
        scale_max = self.scale_max_bwd if backward else self.scale_max_fwd
        rounding = self.backward_rounding if backward else "ta"
        hit = self._reused(x, role, key, tp_group)
        if hit is not None:
            return hit
        seed = 0
        if rounding == "hybrid":
            self._calls += 1
            seed = _mix_seed(self.seed, self._calls)
        y, _ = qdq_current(x, scale_max, rounding=rounding, seed=seed, group=tp_group)
        self._remember(x, role, key, tp_group, y)
        return y


@dataclasses.dataclass
class _DelayedSlot:
    history: torch.Tensor  # [amax_history_len] fp32, newest amax at index 0
    scale: torch.Tensor  # fp32 0-dim
    recorded_step: int = -1  # step of the amax now in history[0] (-1: nothing pending)
    updates: int = 0


@dataclasses.dataclass
class HiF8DelayedScaling(_ReuseLast):
    """TE DelayedScaling semantics with HiF8 rounding (see the module docstring)."""

    amax_history_len: int = 16
    amax_compute_algo: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "max"
    margin: int = 0
    interval: int = 1
    scale_max_fwd: float = 15.0
    scale_max_bwd: float = 224.0
    backward_rounding: str = "ta"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len={self.amax_history_len}: must be >= 1")
        if not callable(self.amax_compute_algo) and self.amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(f"amax_compute_algo={self.amax_compute_algo!r}: use 'max', 'most_recent' or a callable")
        if self.interval < 1:
            raise ValueError(f"interval={self.interval}: must be >= 1")
        if self.scale_max_fwd <= 0 or self.scale_max_bwd <= 0:
            raise ValueError("HiF8DelayedScaling: scale_max_fwd and scale_max_bwd must be > 0")
        if self.backward_rounding not in ("ta", "hybrid"):
            raise ValueError(f"backward_rounding={self.backward_rounding!r}: use ta or hybrid")
        self.step = 0
        self.amax_reduction_group: Optional[torch.distributed.ProcessGroup] = None
        self._slots: Dict[Tuple[Any, str], _DelayedSlot] = {}
        self._calls = 0
        self._reset_reuse()

    # -------------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Called by the outermost `autocast` entry: amaxes recorded so far become due for the next use, and no
        quantization of the previous step is reused (the same dy object handed in again is quantized anew)."""
        self.step += 1
        self._reset_reuse()

    def slot(self, key: Any, role: str) -> _DelayedSlot:
        """The state of one quantized tensor (created on first use)."""
        return self._slots[(key, role)]

    def _get_slot(self, key: Any, role: str, device: torch.device) -> _DelayedSlot:
        s = self._slots.get((key, role))
        if s is None:
            s = _DelayedSlot(
                history=torch.zeros(self.amax_history_len, dtype=torch.float32, device=device),
                scale=torch.ones((), dtype=torch.float32, device=device),
            )
            self._slots[(key, role)] = s
        elif s.scale.device != torch.device(device):  # e.g. restored from a CPU checkpoint
            s.history, s.scale = s.history.to(device), s.scale.to(device)
        return s

    def state_dict(self) -> Dict[str, Any]:
        """Checkpointable state: step counter and every slot's history / scale (tensors on CPU)."""
        return {
            "step": self.step,
            "slots": {
                f"{key}|{role}": {
                    "history": s.history.detach().cpu().clone(),
                    "scale": s.scale.detach().cpu().clone(),
                    "recorded_step": s.recorded_step,
                    "updates": s.updates,
                }
                for (key, role), s in self._slots.items()
            },
        }

    def load_state_dict(self, state: Dict[str, Any], device: torch.device | str = "cpu") -> None:
        """Restore `state_dict()`; slot keys are "<module key>|<role>" (module keys must be strings)."""
        self.step = int(state["step"])
        self._slots = {}
        for name, v in state["slots"].items():
            key, _, role = name.rpartition("|")
            if v["history"].numel() != self.amax_history_len:
                raise ValueError(
                    f"HiF8DelayedScaling.load_state_dict: slot {name} has an amax history of {v['history'].numel()}, "
                    f"this recipe keeps {self.amax_history_len}: use the same precision.amax_history_len"
                )
            self._slots[(key, role)] = _DelayedSlot(
                history=v["history"].to(device).clone(), scale=v["scale"].to(device).clone(),
                recorded_step=int(v["recorded_step"]), updates=int(v["updates"]),
            )

    def _compute_amax(self, history: torch.Tensor) -> torch.Tensor:
        if callable(self.amax_compute_algo):
            return self.amax_compute_algo(history).float().reshape(())
        if self.amax_compute_algo == "max":
            return history.max()
        return history[0].clone()

    def _update(self, s: _DelayedSlot, scale_max: float) -> None:
        """TE's amax-and-scale update: amax from the history, new scale, roll the history."""
        amax = self._compute_amax(s.history)
        s.updates += 1
        if s.updates % self.interval == 0:
            new = (torch.tensor(float(scale_max), dtype=torch.float32, device=amax.device) / amax) / (2.0**self.margin)
            new = torch.where(torch.isinf(new), torch.full_like(new, FP32_MAX), new)
            keep = ~((amax > 0) & torch.isfinite(amax))
            s.scale = torch.where(keep, s.scale, new)
        if s.history.numel() > 1:
            s.history = torch.roll(s.history, -1, 0)
        s.history[0] = 0.0
        s.recorded_step = -1

    def quantize(
        self,
        x: torch.Tensor,
        role: str,
        key: Optional[Any] = None,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> torch.Tensor:
        """Fake-quantize x with the slot's current scale and record amax(x) (reduced over tp_group and the
        autocast amax_reduction_group) for the next step. `key` names the module (required)."""
        backward = _check_role(role)
        if key is None:
            raise ValueError("HiF8DelayedScaling.quantize needs key= (one per module) to keep its amax history")
        scale_max = self.scale_max_bwd if backward else self.scale_max_fwd
        hit = self._reused(x, role, key, tp_group)
        if hit is not None and role == "grad_output":  # the same dy again within one backward
            return hit
        s = self._get_slot(key, role, x.device)
        if 0 <= s.recorded_step < self.step:
            self._update(s, scale_max)
        rounding = self.backward_rounding if backward else "ta"
        seed = 0
        if rounding == "hybrid":
            self._calls += 1
            seed = _mix_seed(self.seed, self._calls)
        y, amax = qdq_with_scale(x, s.scale, rounding=rounding, seed=seed, record_amax=True, saturate=True)
        for group in (tp_group, self.amax_reduction_group):
            if group is not None and torch.distributed.get_world_size(group) > 1:
                amax = amax.clone()
                torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=group)
        s.history[0] = torch.maximum(s.history[0], amax)
        s.recorded_step = self.step
        self._remember(x, role, key, tp_group, y)
        return y


# ------------------------------------------------------------------------------------------------
# native FP8 (no TransformerEngine): E4M3 forward, E5M2 (hybrid) or E4M3 backward
# ------------------------------------------------------------------------------------------------
FP8_FORMATS = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}
FP8_MODES = ("hybrid", "e4m3")  # hybrid: E4M3 forward tensors, E5M2 gradients (TE's Format.HYBRID)


def _compiled_on_cuda(fn):
    """fn as one compiled kernel on CUDA tensors (eager, its fp32 temporaries are two extra passes over x: for an
    FFN activation that costs more than the FP8 GEMM saves), eager elsewhere or with OSP_COMPILE=0. The same
    IEEE operations in the same order, so the results are the eager ones bit for bit."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(x, *args):
        nonlocal compiled
        if x.is_cuda and os.environ.get("OSP_COMPILE", "1") != "0":
            if compiled is None:
                compiled = torch.compile(fn, dynamic=True)
            return compiled(x, *args)
        return fn(x, *args)

    return wrapper


@_compiled_on_cuda
def _cast_to_fp8(x: torch.Tensor, scale: torch.Tensor, fmax: float, dtype: torch.dtype) -> torch.Tensor:
    return (x.float() * scale).clamp(-fmax, fmax).to(dtype)


@_compiled_on_cuda
def _abs_max(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax().float()


def fp8_amax(x: torch.Tensor) -> torch.Tensor:
    """fp32 0-dim max |x| (0 for an empty tensor), one reduction pass on CUDA."""
    return _abs_max(x.detach()) if x.numel() else torch.zeros((), dtype=torch.float32, device=x.device)


def fp8_cast(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """x (any float dtype) -> fp8 codes of fp32(x) * scale, saturated to +-max, round to nearest even."""
    dtype, fmax = FP8_FORMATS[fmt]
    return _cast_to_fp8(x.detach(), scale, fmax, dtype)


def fp8_qdq(x: torch.Tensor, scale: torch.Tensor, fmt: str, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Fake quantization: fp8_cast(x, scale) / scale in fp32, cast to out_dtype (default x.dtype)."""
    return (fp8_cast(x, scale, fmt).float() / scale).to(out_dtype or x.dtype)


class _FP8Recipe(_ReuseLast):
    """Shared by the FP8 recipes: `quantize` (fake quantization, the CPU path and the reference) and
    `quantize_fp8` (fp8 codes + fp32 inverse scale for `torch._scaled_mm`) from one `_scale(x, role, key, group)`."""

    fp8_format: str = "hybrid"
    margin: int = 0

    def _format(self, role: str) -> str:
        return "e5m2" if (_check_role(role) and self.fp8_format == "hybrid") else "e4m3"

    def _target(self, role: str) -> float:
        """fp8 max / 2^margin: scale = target / amax (TE's default scaling)."""
        return FP8_FORMATS[self._format(role)][1] / (2.0 ** self.margin)

    def quantize(self, x, role, key=None, tp_group=None):
        """Fake-quantize x (same shape and dtype) for `role` (see `recipes` roles); tp_group: amax group."""
        hit = self._reused(x, role, key, tp_group)
        if hit is not None and (role == "input" and isinstance(self, FP8CurrentScaling) or role == "grad_output"):
            return hit
        y = fp8_qdq(x, self._scale(x, role, key, tp_group), self._format(role))
        self._remember(x, role, key, tp_group, y)
        return y

    def quantize_fp8(self, x, role, key=None, tp_group=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(fp8 codes of x, fp32 0-dim inverse scale): dequantized = codes * inverse scale."""
        scale = self._scale(x, role, key, tp_group)
        return fp8_cast(x, scale, self._format(role)), scale.reciprocal()


def _reduce_max(amax: torch.Tensor, *groups) -> torch.Tensor:
    for group in groups:
        if group is not None and torch.distributed.get_world_size(group) > 1:
            amax = amax.clone()
            torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=group)
    return amax


@dataclasses.dataclass
class FP8CurrentScaling(_FP8Recipe):
    """TE `Float8CurrentScaling` semantics: scale = fp8_max / amax(x) / 2^margin of this call, per tensor (1 when
    amax is 0 / Inf / NaN). fp8_format: hybrid (E4M3 forward, E5M2 gradients) or e4m3."""

    fp8_format: str = "hybrid"
    margin: int = 0

    def __post_init__(self) -> None:
        if self.fp8_format not in FP8_MODES:
            raise ValueError(f"fp8_format={self.fp8_format!r}: use one of {FP8_MODES}")
        self._reset_reuse()

    def _scale(self, x, role, key, tp_group) -> torch.Tensor:
        amax = _reduce_max(fp8_amax(x), tp_group)
        return scale_from_amax(amax, self._target(role))


@dataclasses.dataclass
class FP8DelayedScaling(_FP8Recipe, HiF8DelayedScaling):
    """TE `DelayedScaling` semantics with FP8 casts: per (module key, role) an amax history; the amax recorded at
    step t sets the scale of step t+1 (`HiF8DelayedScaling` explains the slots and the update); scale =
    fp8_max / amax / 2^margin."""

    fp8_format: str = "hybrid"

    def __post_init__(self) -> None:
        if self.fp8_format not in FP8_MODES:
            raise ValueError(f"fp8_format={self.fp8_format!r}: use one of {FP8_MODES}")
        HiF8DelayedScaling.__post_init__(self)

    def _scale(self, x, role, key, tp_group) -> torch.Tensor:
        if key is None:
            raise ValueError("FP8DelayedScaling.quantize needs key= (one per module) to keep its amax history")
        s = self._get_slot(key, role, x.device)
        if 0 <= s.recorded_step < self.step:
            self._update(s, FP8_FORMATS[self._format(role)][1])
        amax = _reduce_max(fp8_amax(x), tp_group, self.amax_reduction_group)
        s.history[0] = torch.maximum(s.history[0], amax)
        s.recorded_step = self.step
        return s.scale


HiF8Recipe = Union[HiF8CurrentScaling, HiF8DelayedScaling]
QuantRecipe = Union[HiF8CurrentScaling, HiF8DelayedScaling, "FP8CurrentScaling", "FP8DelayedScaling"]
NATIVE_FP8_RECIPES = ("fp8_current", "fp8_delayed")  # with model.spec=local; every fp8_* with model.spec=te


# ------------------------------------------------------------------------------------------------
# autocast
# ------------------------------------------------------------------------------------------------
_STACK: List[Tuple[Optional[HiF8Recipe], Optional[torch.distributed.ProcessGroup]]] = []


@contextlib.contextmanager
def autocast(
    enabled: bool = True,
    recipe: Optional[HiF8Recipe] = None,
    amax_reduction_group: Optional[torch.distributed.ProcessGroup] = None,
) -> Iterator[Optional[HiF8Recipe]]:
    """Run HiF8 modules quantized inside the region (like `te.autocast(recipe=...)`); nests."""
    if enabled:
        recipe = recipe if recipe is not None else HiF8CurrentScaling()
        if not isinstance(recipe, (HiF8CurrentScaling, HiF8DelayedScaling, FP8CurrentScaling)):
            raise TypeError(
                f"autocast(recipe={type(recipe).__name__}): HiF8 modules take HiF8CurrentScaling or "
                "HiF8DelayedScaling (or the native FP8CurrentScaling / FP8DelayedScaling); TransformerEngine FP8 "
                "recipes (te_fp8_recipe) run under transformer_engine.pytorch.autocast with model.spec=te"
            )
        outermost = all(r is not recipe for r, _ in _STACK)
        if isinstance(recipe, HiF8DelayedScaling):
            if outermost:
                recipe.begin_step()
            if amax_reduction_group is not None:
                recipe.amax_reduction_group = amax_reduction_group
    _STACK.append((recipe if enabled else None, amax_reduction_group))
    try:
        yield recipe if enabled else None
    finally:
        _STACK.pop()


def active_recipe() -> Optional[HiF8Recipe]:
    """The recipe of the innermost enabled `autocast`, or None (outside, or inside autocast(enabled=False))."""
    return _STACK[-1][0] if _STACK else None


def recipe_from_config(precision: Any, spec: str = "local") -> Optional[Any]:
    """`PrecisionConfig` (+ model.spec) -> recipe: None ("none"), a HiF8 recipe, the native FP8 recipes
    (fp8_current / fp8_delayed with the local spec), or a TE FP8 recipe (fp8_* with model.spec=te, needs TE)."""
    name = precision.recipe
    if name == "none":
        return None
    if spec == "local" and name == "fp8_current":
        return FP8CurrentScaling(fp8_format=precision.fp8_format, margin=precision.margin)
    if spec == "local" and name == "fp8_delayed":
        return FP8DelayedScaling(
            amax_history_len=precision.amax_history_len, amax_compute_algo=precision.amax_compute_algo,
            margin=precision.margin, interval=precision.interval, fp8_format=precision.fp8_format,
        )
    if name == "hif8_current":
        return HiF8CurrentScaling(
            scale_max_fwd=precision.scale_max_fwd,
            scale_max_bwd=precision.scale_max_bwd,
            backward_rounding=precision.backward_rounding,
        )
    if name == "hif8_delayed":
        return HiF8DelayedScaling(
            amax_history_len=precision.amax_history_len,
            amax_compute_algo=precision.amax_compute_algo,
            margin=precision.margin,
            interval=precision.interval,
            scale_max_fwd=precision.scale_max_fwd,
            scale_max_bwd=precision.scale_max_bwd,
            backward_rounding=precision.backward_rounding,
        )
    if name in TE_FP8_RECIPES:
        return te_fp8_recipe(name, precision)
    raise ValueError(f"precision.recipe={name!r}: use none, {', '.join(HIF8_RECIPES + TE_FP8_RECIPES)}")


# ------------------------------------------------------------------------------------------------
# TransformerEngine bridge (optional dependency)
# ------------------------------------------------------------------------------------------------
def te_version() -> Optional[Tuple[int, int]]:
    """(major, minor) of an importable TransformerEngine, else None."""
    try:
        import transformer_engine  # noqa: F401
        from transformer_engine.common import recipe as _  # noqa: F401
    except Exception:  # ImportError, or an OSError from missing CUDA libraries
        return None
    parts = str(getattr(transformer_engine, "__version__", "0.0")).split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return None


def _require_te(what: str, min_version: Tuple[int, int] = (2, 0)) -> Any:
    ver = te_version()
    if ver is None:
        raise RuntimeError(
            f"{what} needs TransformerEngine >= {min_version[0]}.{min_version[1]}, which is not importable here: "
            "install it on a CUDA machine with `pip install --no-build-isolation transformer_engine[pytorch]` "
            "(extra `te` of osp-megatron), or use precision.recipe=hif8_current / hif8_delayed, which need no TE"
        )
    if ver < min_version:
        raise RuntimeError(
            f"{what} needs TransformerEngine >= {min_version[0]}.{min_version[1]}; found {ver[0]}.{ver[1]}: upgrade TE"
        )
    from transformer_engine.common import recipe as te_recipe

    return te_recipe


def refresh_te_weight_caches(model: torch.nn.Module) -> int:
    """Mark every TE linear of `model` so that its next forward re-casts the weights to FP8.

    megatron's TE linears pass `is_first_microbatch` to TE, which casts the weights once and reuses that FP8 copy
    until the flag is set again; megatron's schedules set it only when `TransformerConfig.fp8` is set, which the
    project's own TE autocast does not use. Called at the start of every quantized region (one optimizer step, one
    sampling run), so the FP8 weights follow the optimizer's updates. Returns how many modules were marked."""
    count = 0
    for module in model.modules():
        if hasattr(module, "is_first_microbatch"):
            module.is_first_microbatch = True
            count += 1
    return count


def te_fp8_recipe(name: str, precision: Any = None) -> Any:
    """TE's own FP8 recipe: fp8_delayed -> DelayedScaling(HYBRID), fp8_current -> Float8CurrentScaling(HYBRID),
    fp8_block -> Float8BlockScaling(E4M3). `precision` (optional PrecisionConfig) fills the delayed fields."""
    short = name[4:] if name.startswith("fp8_") else name
    if short not in ("delayed", "current", "block"):
        raise ValueError(f"te_fp8_recipe({name!r}): use fp8_delayed, fp8_current or fp8_block")
    te_recipe = _require_te(f"precision.recipe={name}", (2, 3) if short == "block" else (2, 2) if short == "current" else (2, 0))
    if short == "delayed":
        kwargs = {}
        if precision is not None:
            kwargs = dict(
                margin=precision.margin,
                amax_history_len=precision.amax_history_len,
                amax_compute_algo=precision.amax_compute_algo,
            )
        return te_recipe.DelayedScaling(fp8_format=te_recipe.Format.HYBRID, **kwargs)
    if short == "current":
        return te_recipe.Float8CurrentScaling(fp8_format=te_recipe.Format.HYBRID)
    return te_recipe.Float8BlockScaling(fp8_format=te_recipe.Format.E4M3)


def _role_is_backward(role: Any) -> bool:
    """TE 2.9-2.15 pass role strings ("linear_grad_output"); TE >= 2.16 pass QuantizerRole objects."""
    if isinstance(role, str):
        return "grad" in role
    return "grad" in str(getattr(role, "tensor_type", ""))


def te_custom_recipe(recipe: Optional[HiF8CurrentScaling] = None) -> Any:
    """A TE `CustomRecipe` whose quantizers fake-quantize to HiF8 with `recipe`'s current scaling.

    Forward operands use scale_max_fwd with TA rounding, grad_output uses scale_max_bwd and the recipe's
    backward rounding; the quantized storage holds the dequantized values (scale 1) and the GEMM is a plain
    high-precision matmul of them, i.e. exactly the HiF8 linear of `osp_megatron.quant.modules`.
    """
    recipe = recipe or HiF8CurrentScaling()
    if not isinstance(recipe, HiF8CurrentScaling):
        raise TypeError("te_custom_recipe supports HiF8CurrentScaling (TE owns delayed-scaling state itself)")
    te_recipe = _require_te("te_custom_recipe", TE_MIN_VERSION_CUSTOM)
    from osp_megatron.quant.te_bridge import make_hif8_qfactory

    return te_recipe.CustomRecipe(qfactory=make_hif8_qfactory(recipe, _role_is_backward))


__all__ = [
    "BACKWARD_ROLES",
    "FORWARD_ROLES",
    "FP8CurrentScaling",
    "FP8DelayedScaling",
    "fp8_cast",
    "fp8_qdq",
    "HiF8CurrentScaling",
    "HiF8DelayedScaling",
    "active_recipe",
    "autocast",
    "recipe_from_config",
    "te_custom_recipe",
    "te_fp8_recipe",
    "te_version",
]
