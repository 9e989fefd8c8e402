"""HiF8 linear layers (megatron tensor-parallel drop-ins) and the HiF8 Q/K/V quantizer of attention.

`hif8_linear_tp` is megatron's `LinearWithGradAccumulationAndAsyncCommunication` with HiF8 fake quantization:

    forward:   x_q = Q_fwd(x), W_q = Q_fwd(W);  y = x_q @ W_q^T + b           (x_q, W_q saved)
    backward:  g_q = Q_bwd(dy);  dgrad = g_q @ W_q;  wgrad = g_q^T @ x_q;  dbias = sum(g_q)

Q_* is the active recipe's per-tensor quantize-dequantize (`recipes.py`): HiF8, or the native FP8 recipes, whose
GEMMs on CUDA (compute capability >= 8.9) run in FP8 through `torch._scaled_mm` on the fp8 codes (`use_scaled_mm`;
elsewhere the same values as fake quantization with high-precision GEMMs). Layouts: x [s, b, K] (or [n, K]),
W [N, K] (torch.nn.functional.linear layout), y [s, b, N].

Tensor parallel: megatron's communication is kept as is (copy_to / reduce_from / gather / scatter in the
module's forward; the sequence-parallel all-gather of x and reduce-scatter of dgrad, or the dgrad all-reduce,
inside the autograd function).

Amax scope (`precision.amax_scope`, set on a built model by `set_amax_scope`): over which ranks the amax of a
quantized tensor is all-reduced (MAX) before scaling.
    local  every amax is the rank's own tensor's (OSP-Next: a TP shard, the tokens of this CP rank, the heads
           after the Ulysses all-to-all); the result depends on the TP and CP degrees.
    tp     the amax of TP shards is reduced over the TP group, so TP > 1 quantizes exactly as TP = 1:
           column-parallel W (rows split), dy (columns split), x under sequence parallelism (rows split);
           row-parallel W and x (columns split); Q/K/V (heads split).
    tp_cp  as tp, and activations (x, dy, Q/K/V) reduced over TP x CP, so every quantized activation is scaled
           by the amax of the whole tensor whatever the TP, SSP or Ulysses degree. Exception in backward: text K/V
           of cross-attention are replicated over CP and each CP rank holds a partial sum of their gradients,
           whose amax is the max of the partial ones.
Bias: dbias = sum(g_q) for every linear (OSP-Next). Row-parallel linears keep megatron's bias add after the TP
reduction; its backward quantizes the dy it sees (the same tensor the GEMM's backward receives, quantized once
and reused; under sequence parallelism the rank's sequence chunk).

The subclasses quantize only while a recipe is active (`recipes.active_recipe()`); otherwise they run
megatron's own path unchanged (bf16 first/last blocks get megatron's plain linears from their spec).
`HiF8QKV` is the Q/K/V quantizer submodule of self- and cross-attention (`models/specs.py`).
"""
from __future__ import annotations

import itertools
from typing import Any, Optional, Tuple

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from osp_megatron.config.sections import AMAX_SCOPES
from osp_megatron.parallel.collectives import gather_along_first_dim, group_size, reduce_scatter_along_first_dim
from osp_megatron.quant.recipes import active_recipe

_KEYS = itertools.count()


def _multi(group: Optional[torch.distributed.ProcessGroup]) -> Optional[torch.distributed.ProcessGroup]:
    return group if group_size(group) > 1 else None


class _HiF8LinearFn(torch.autograd.Function):
    """See module docstring. Returns the [.., N] output; grads for input, weight, bias."""

    @staticmethod
    def forward(
        ctx,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        recipe: Any,
        key: Any,
        tp_group: Optional[torch.distributed.ProcessGroup],
        allreduce_dgrad: bool,
        sequence_parallel: bool,
        x_group: Optional[torch.distributed.ProcessGroup],
        w_group: Optional[torch.distributed.ProcessGroup],
        g_group: Optional[torch.distributed.ProcessGroup],
    ) -> torch.Tensor:
        tp = group_size(tp_group)
        x_q = recipe.quantize(input, "input", key, _multi(x_group))
        w_q = recipe.quantize(weight, "weight", key, _multi(w_group))
        total = gather_along_first_dim(x_q, tp_group) if (sequence_parallel and tp > 1) else x_q
        out = torch.matmul(total, w_q.t())
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(x_q, w_q)
        ctx.recipe, ctx.key, ctx.tp_group = recipe, key, tp_group
        ctx.allreduce_dgrad = allreduce_dgrad and tp > 1
        ctx.sequence_parallel = sequence_parallel and tp > 1
        ctx.g_group = _multi(g_group)
        ctx.use_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x_q, w_q = ctx.saved_tensors
        tp_group = ctx.tp_group
        g_q = ctx.recipe.quantize(grad_output.contiguous(), "grad_output", ctx.key, ctx.g_group)
        total = gather_along_first_dim(x_q, tp_group) if ctx.sequence_parallel else x_q
        grad_input = g_q.matmul(w_q)
        if ctx.sequence_parallel:
            grad_input = reduce_scatter_along_first_dim(grad_input, tp_group)
        elif ctx.allreduce_dgrad:
            torch.distributed.all_reduce(grad_input, group=tp_group)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            g2 = g_q.reshape(-1, g_q.shape[-1])
            grad_weight = g2.t().matmul(total.reshape(-1, total.shape[-1]))
        grad_bias = g_q.reshape(-1, g_q.shape[-1]).sum(dim=0) if ctx.use_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def hif8_linear_tp(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    recipe: Any,
    key: Any,
    tp_group: Optional[torch.distributed.ProcessGroup] = None,
    allreduce_dgrad: bool = False,
    sequence_parallel: bool = False,
    x_group: Optional[torch.distributed.ProcessGroup] = None,
    w_group: Optional[torch.distributed.ProcessGroup] = None,
    g_group: Optional[torch.distributed.ProcessGroup] = None,
) -> torch.Tensor:
    """HiF8 linear with megatron's TP communication (see module docstring); input [.., K], weight [N, K].

    x_group / w_group / g_group: the groups the amax of x, W and dy is all-reduced over (None: local)."""
    if use_scaled_mm(recipe, input, weight, sequence_parallel):
        return _FP8ScaledMMFn.apply(input, weight, bias, recipe, key, tp_group, allreduce_dgrad, x_group, w_group,
                                    g_group)
    return _HiF8LinearFn.apply(
        input, weight, bias, recipe, key, tp_group, allreduce_dgrad, sequence_parallel, x_group, w_group, g_group
    )


def use_scaled_mm(recipe: Any, input: torch.Tensor, weight: torch.Tensor, sequence_parallel: bool = False) -> bool:
    """Whether a native FP8 recipe runs this linear's GEMMs in FP8 (`torch._scaled_mm`): CUDA tensors of compute
    capability >= 8.9, no sequence parallelism, tokens / K / N multiples of 16 (else the fake-quant path, which
    computes the same values in high precision)."""
    if not hasattr(recipe, "quantize_fp8") or not (input.is_cuda and hasattr(torch, "_scaled_mm")):
        return False
    if sequence_parallel or torch.cuda.get_device_capability(input.device) < (8, 9):
        return False
    m = input.numel() // input.shape[-1]
    n, k = weight.shape
    return m % 16 == 0 and n % 16 == 0 and k % 16 == 0


def _column_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def _scaled_mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor, dtype) -> torch.Tensor:
    """(a * a_inv) @ (b * b_inv) for fp8 a [M, K] (row-major) and b [K, N] (made column-major), fp32 accumulation."""
    return torch._scaled_mm(a, _column_major(b), scale_a=a_inv, scale_b=b_inv, out_dtype=dtype)


class _FP8ScaledMMFn(torch.autograd.Function):
    """The quantized linear of the module docstring with FP8 GEMMs on the device (native FP8 recipes, CUDA):

        forward:  y = (x8 * sx^-1) @ (W8 * sw^-1)^T + b                    (x8, W8 fp8 codes saved, not x / W)
        backward: g8 = Q_bwd(dy);  dgrad = g8 @ W8;  wgrad = g8^T @ x8;  dbias = sum(dequant(g8))
    """

    @staticmethod
    def forward(ctx, input, weight, bias, recipe, key, tp_group, allreduce_dgrad, x_group, w_group, g_group):
        x8, x_inv = recipe.quantize_fp8(input, "input", key, _multi(x_group))
        w8, w_inv = recipe.quantize_fp8(weight, "weight", key, _multi(w_group))
        x2 = x8.reshape(-1, x8.shape[-1])
        out = _scaled_mm(x2, x_inv, w8.t(), w_inv, input.dtype).view(*input.shape[:-1], weight.shape[0])
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.recipe, ctx.key, ctx.tp_group, ctx.g_group = recipe, key, tp_group, _multi(g_group)
        ctx.allreduce_dgrad = allreduce_dgrad and group_size(tp_group) > 1
        ctx.use_bias, ctx.dtype, ctx.w_dtype = bias is not None, input.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = ctx.recipe.quantize_fp8(grad_output.contiguous(), "grad_output", ctx.key, ctx.g_group)
        g2 = g8.reshape(-1, g8.shape[-1])
        grad_input = _scaled_mm(g2, g_inv, w8, w_inv, ctx.dtype).view(*grad_output.shape[:-1], w8.shape[1])
        if ctx.allreduce_dgrad:
            torch.distributed.all_reduce(grad_input, group=ctx.tp_group)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            x2 = x8.reshape(-1, x8.shape[-1])
            grad_weight = _scaled_mm(g2.t().contiguous(), g_inv, x2, x_inv, torch.float32).to(ctx.w_dtype)
        grad_bias = (g2.float() * g_inv).sum(dim=0).to(ctx.dtype) if ctx.use_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class _QuantizedBiasAdd(torch.autograd.Function):
    """y = x + b with db = sum(Q_bwd(dy)) over all but the last dim; dx = dy."""

    @staticmethod
    def forward(ctx, x, bias, recipe, key, group):
        ctx.recipe, ctx.key, ctx.group, ctx.bias_dtype = recipe, key, group, bias.dtype
        return x + bias

    @staticmethod
    def backward(ctx, grad):
        g = grad.contiguous()
        g_q = ctx.recipe.quantize(g, "grad_output", ctx.key, ctx.group)
        return g, g_q.reshape(-1, g_q.shape[-1]).sum(dim=0).to(ctx.bias_dtype), None, None, None


def hif8_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, recipe: Any = None, key: Any = None
) -> torch.Tensor:
    """Single-device HiF8 linear: y = Q(x) @ Q(W)^T + b with quantized grad_output (recipe: active one)."""
    recipe = recipe if recipe is not None else active_recipe()
    if recipe is None:
        return torch.nn.functional.linear(input, weight, bias)
    return hif8_linear_tp(input, weight, bias, recipe=recipe, key=key if key is not None else "hif8_linear")


def _check_megatron_kwargs(kwargs: dict, cls: str) -> None:
    if kwargs.get("gradient_accumulation_fusion"):
        raise NotImplementedError(
            f"{cls}: gradient_accumulation_fusion (fused main_grad wgrad) is not implemented for HiF8 linears; "
            "set TransformerConfig.gradient_accumulation_fusion=False"
        )
    if kwargs.get("grad_output_buffer") is not None:
        raise NotImplementedError(f"{cls}: defer_embedding_wgrad_compute is not supported for HiF8 linears")


class _AmaxScoped:
    """The amax groups of a HiF8 linear for its `amax_scope` (see module docstring)."""

    amax_scope: str = "local"
    amax_tp_cp_group: Optional[torch.distributed.ProcessGroup] = None

    def _amax_groups(self, x_sharded: bool, g_sharded: bool) -> Tuple[Any, Any, Any]:
        """(x, W, dy) groups; x_sharded / g_sharded: whether x / dy are TP shards."""
        if self.amax_scope == "local":
            return None, None, None
        tp = _multi(self.tp_group)
        if self.amax_scope == "tp":
            return (tp if x_sharded else None), tp, (tp if g_sharded else None)
        tp_cp = _multi(self.amax_tp_cp_group)
        return tp_cp, tp, tp_cp


class HiF8ColumnParallelLinear(_AmaxScoped, ColumnParallelLinear):
    """megatron ColumnParallelLinear whose GEMMs run on HiF8-quantized operands while a recipe is active.

    Same constructor and forward as megatron's (forward returns (output, bias)); W [N/tp, K].
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hif8_key = f"col{next(_KEYS)}"

    def _forward_impl(self, input, weight, *args, **kwargs):
        recipe = active_recipe()
        if recipe is None or self.explicit_expert_comm:
            return super()._forward_impl(input, weight, *args, **kwargs)
        if args:
            raise TypeError("HiF8ColumnParallelLinear._forward_impl expects keyword arguments (as megatron passes)")
        _check_megatron_kwargs(kwargs, type(self).__name__)
        sp = bool(kwargs.get("sequence_parallel", False))
        x_group, w_group, g_group = self._amax_groups(x_sharded=sp, g_sharded=True)
        return hif8_linear_tp(
            input, weight, kwargs.get("bias"), recipe=recipe, key=self.hif8_key, tp_group=self.tp_group,
            allreduce_dgrad=bool(kwargs.get("allreduce_dgrad", False)), sequence_parallel=sp,
            x_group=x_group, w_group=w_group, g_group=g_group,
        )


class HiF8RowParallelLinear(_AmaxScoped, RowParallelLinear):
    """megatron RowParallelLinear whose GEMMs run on HiF8-quantized operands while a recipe is active.

    Same constructor and forward as megatron's (forward returns (output, bias)); W [N, K/tp]. The bias is added
    after the TP reduction (megatron), with its gradient from the quantized dy.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hif8_key = f"row{next(_KEYS)}"

    def forward(self, input_):
        recipe = active_recipe()
        if recipe is None or self.bias is None or self.skip_bias_add or self.explicit_expert_comm:
            return super().forward(input_)
        self.skip_bias_add = True
        try:
            out, bias = super().forward(input_)
        finally:
            self.skip_bias_add = False
        # dy of the bias: replicated over TP, or this rank's sequence chunk under sequence parallelism
        _, _, group = self._amax_groups(x_sharded=True, g_sharded=self.sequence_parallel)
        return _QuantizedBiasAdd.apply(out, bias, recipe, self.hif8_key, _multi(group)), None

    def _forward_impl(self, input, weight, *args, **kwargs):
        recipe = active_recipe()
        if recipe is None or self.explicit_expert_comm:
            return super()._forward_impl(input, weight, *args, **kwargs)
        if args:
            raise TypeError("HiF8RowParallelLinear._forward_impl expects keyword arguments (as megatron passes)")
        _check_megatron_kwargs(kwargs, type(self).__name__)
        x_group, w_group, g_group = self._amax_groups(x_sharded=True, g_sharded=False)
        return hif8_linear_tp(
            input, weight, kwargs.get("bias"), recipe=recipe, key=self.hif8_key, tp_group=self.tp_group,
            allreduce_dgrad=False, sequence_parallel=False, x_group=x_group, w_group=w_group, g_group=g_group,
        )


def set_amax_scope(model: torch.nn.Module, parallel: Any, scope: str) -> None:
    """Make every HiF8 linear and Q/K/V quantizer of `model` reduce its amaxes as `scope` says (module docstring).

    parallel: the model's `ParallelState` (its TP group and TP x CP group)."""
    if scope not in AMAX_SCOPES:
        raise ValueError(f"precision.amax_scope={scope!r}: use one of {', '.join(AMAX_SCOPES)}")
    tp = _multi(parallel.tp_group) if parallel.tp > 1 else None
    tp_cp = _multi(parallel.tp_cp_group) if parallel.tp * parallel.cp.size > 1 else None
    for module in model.modules():
        if isinstance(module, _AmaxScoped):
            module.amax_scope, module.amax_tp_cp_group = scope, tp_cp
        elif isinstance(module, HiF8QKV):
            module.group = {"local": None, "tp": tp, "tp_cp": tp_cp}[scope]


def assign_hif8_keys(model: torch.nn.Module, prefix: str = "") -> int:
    """Name every HiF8 linear's delayed-scaling key after its module path (stable across processes, so
    `HiF8DelayedScaling.state_dict()` can be checkpointed and resumed). Returns how many were named."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, (HiF8ColumnParallelLinear, HiF8RowParallelLinear)):
            module.hif8_key = prefix + name
            count += 1
    return count


# ------------------------------------------------------------------------------------------------
# attention Q/K/V
# ------------------------------------------------------------------------------------------------
def _sub(key: Any, name: str) -> Any:
    return None if key is None else (key, name)


class _HiF8QKVFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, recipe, key, group):
        ctx.recipe, ctx.key, ctx.group = recipe, key, group
        return tuple(recipe.quantize(t, "qkv", _sub(key, name), group) for t, name in zip((q, k, v), "qkv"))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        grads = tuple(
            None if g is None else ctx.recipe.quantize(g.contiguous(), "grad_qkv", _sub(ctx.key, name), ctx.group)
            for g, name in zip((dq, dk, dv), "qkv")
        )
        return grads + (None, None, None)


def hif8_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Optional[torch.distributed.ProcessGroup] = None,
    key: Any = None,
    enabled: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V (any layout, e.g. [b, h, s, d]) quantized forward (scale_max_fwd), dQ/dK/dV backward (scale_max_bwd).

    Identity when no recipe is active or enabled=False. `group`: the process group the amax of each tensor is
    all-reduced over (None: the local tensor's amax). `key`: one per attention module (required by delayed
    scaling).
    """
    recipe = active_recipe()
    if recipe is None or not enabled:
        return q, k, v
    if group_size(group) <= 1:
        group = None
    return _HiF8QKVFn.apply(q, k, v, recipe, key, group)


class HiF8QKV(torch.nn.Module):
    """`hif8_qkv` as attention's Q/K/V quantizer submodule, applied to the kernel's inputs (after the Ulysses
    all-to-all): `key` names its delayed-scaling slots, `group` is the amax group of the model's amax scope
    (`set_amax_scope`; None: local)."""

    def __init__(self, key: Any = None, group: Optional[torch.distributed.ProcessGroup] = None):
        super().__init__()
        self.key, self.group = key, group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return hif8_qkv(q, k, v, group=self.group, key=self.key)


__all__ = [
    "AMAX_SCOPES",
    "assign_hif8_keys",
    "HiF8ColumnParallelLinear",
    "HiF8QKV",
    "HiF8RowParallelLinear",
    "hif8_linear",
    "hif8_linear_tp",
    "hif8_qkv",
    "set_amax_scope",
]
