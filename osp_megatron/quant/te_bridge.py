"""HiF8 as a TransformerEngine custom quantizer (TE >= 2.9, `recipe.CustomRecipe(qfactory=...)`).

Imported only by `recipes.te_custom_recipe`, after TE was found importable. Follows TE's pure-Python quantizer
template (`custom_recipes/quantization_ref_current_scaling.py`): `quantize(tensor)` returns a storage with
`data` (row-major) / `data_t` (transposed) and their scales; TE's `custom_gemm` picks the operands per GEMM
(FPROP: x.data, w.data; DGRAD: dy.data, w.data_t; WGRAD: dy.data_t, x.data_t) and calls `qgemm`.

Here `data` holds the HiF8 quantize-dequantized values in the input dtype (2D: [rows, cols]) and the scales
are 1, so `qgemm` is a plain high-precision matmul: the same numerics as `modules.HiF8Linear`.
Status: written against TE main (2.20) and the 2.9-2.18 variants of the API; not run in this repository's CI
(TE cannot be installed on CPU machines).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Optional, Tuple

import torch

try:  # TE >= 2.16
    from transformer_engine.pytorch.quantized_tensor import QuantizedTensorStorage, Quantizer
except ImportError:  # TE 2.9 - 2.15 (the class was renamed from QuantizedTensorBase)
    import transformer_engine.pytorch.tensor.quantized_tensor as _qt

    Quantizer = _qt.Quantizer
    QuantizedTensorStorage = getattr(_qt, "QuantizedTensorStorage", None) or _qt.QuantizedTensorBase


@dataclasses.dataclass
class HiF8TensorStorage(QuantizedTensorStorage):
    """Fake-quantized operand: data [rows, cols] (dequantized HiF8 values), data_t its transpose."""

    data: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    data_t: Optional[torch.Tensor] = None
    scale_t: Optional[torch.Tensor] = None
    dtype: Optional[torch.dtype] = None
    device: Optional[torch.device] = None
    quant_dtype: Optional[torch.dtype] = None
    original_shape: Optional[Tuple[int, ...]] = None
    _quantizer: Optional[Any] = None

    @property
    def custom(self) -> bool:
        return True

    def prepare_for_saving(self):
        tensors = [self.data, self.data_t, self.scale, self.scale_t]
        self.data = self.data_t = self.scale = self.scale_t = None
        return tensors, self

    def restore_from_saved(self, tensors):
        self.data, self.data_t, self.scale, self.scale_t = tensors[:4]
        return tensors[4:]

    @property
    def _data(self):
        return self.data

    @_data.setter
    def _data(self, value):
        self.data = value

    @property
    def _scale_inv(self):
        return self.scale

    @_scale_inv.setter
    def _scale_inv(self, value):
        self.scale = value

    def update_usage(self, rowwise_usage: Optional[bool] = None, columnwise_usage: Optional[bool] = None):
        need_data = self.data is not None if rowwise_usage is None else rowwise_usage
        need_t = self.data_t is not None if columnwise_usage is None else columnwise_usage
        if need_data and self.data is None:
            if self.data_t is None:
                raise RuntimeError("HiF8TensorStorage: no data to regenerate the row-major copy from")
            self.data, self.scale = self.data_t.t().contiguous(), self.scale_t
        if need_t and self.data_t is None:
            if self.data is None:
                raise RuntimeError("HiF8TensorStorage: no data to build the transpose from")
            self.data_t, self.scale_t = self.data.t().contiguous(), self.scale
        if not need_data:
            self.data = None
        if not need_t:
            self.data_t = None

    def size(self, *args, **kwargs):
        if self.data is not None:
            return self.data.size(*args, **kwargs)
        size = self.data_t.size()
        full = torch.Size([size[-1], math.prod(size[:-1])])
        return full if not args else full[args[0]]

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        src = self.data if self.data is not None else self.data_t.t()
        out = src.reshape(self.original_shape) if self.original_shape is not None else src
        return out.to(dtype or self.dtype)


class HiF8Quantizer(Quantizer):
    """Per-tensor current-scaling HiF8 fake quantizer (rowwise and/or columnwise copies)."""

    def __init__(self, quantize_fn: Callable[[torch.Tensor], torch.Tensor], rowwise: bool = True, columnwise: bool = True):
        super().__init__(rowwise=rowwise, columnwise=columnwise)
        self.internal = True
        self.quantize_fn = quantize_fn
        self.dtype = torch.bfloat16
        self.with_amax_reduction = False
        self.amax_reduction_group = None

    @property
    def custom(self) -> bool:
        return True

    @property
    def supports_allgather_fp8(self) -> bool:
        return False

    def _quantize_2d(self, tensor: torch.Tensor):
        q = self.quantize_fn(tensor)
        one = torch.ones(1, dtype=torch.float32, device=tensor.device)
        q_t = q.t().contiguous() if self.columnwise_usage else None
        if not self.rowwise_usage:
            return None, None, q_t, one
        return q, one, q_t, (one if q_t is not None else None)

    def quantize(self, tensor: torch.Tensor, **kwargs) -> HiF8TensorStorage:
        original_shape = tensor.shape
        t2 = tensor.reshape(-1, tensor.shape[-1]) if tensor.ndim != 2 else tensor
        q, s, q_t, s_t = self._quantize_2d(t2)
        return HiF8TensorStorage(
            data=q, scale=s, data_t=q_t, scale_t=s_t, dtype=tensor.dtype, device=tensor.device,
            quant_dtype=tensor.dtype, original_shape=tuple(original_shape), _quantizer=self,
        )

    def dequantize(self, tensor: torch.Tensor, scale: torch.Tensor, dtype: Optional[torch.dtype] = None):
        return tensor if dtype is None else tensor.to(dtype)

    def transpose_qresult(self, qresult: HiF8TensorStorage) -> HiF8TensorStorage:
        qresult.data_t = qresult.data.t().contiguous()
        qresult.scale_t = qresult.scale
        return qresult

    def update_quantized(self, src: torch.Tensor, dst: HiF8TensorStorage, *, noop_flag=None):
        if noop_flag is not None and noop_flag.item() != 0:
            return dst
        src2 = src.contiguous().reshape(-1, src.shape[-1]) if src.ndim != 2 else src.contiguous()
        dst.data, dst.scale, dst.data_t, dst.scale_t = self._quantize_2d(src2)
        dst.dtype, dst.quant_dtype, dst.original_shape = src.dtype, src.dtype, tuple(src.shape)
        return dst

    def make_empty(self, shape: Iterable[int], *, dtype=torch.float32, device=None, requires_grad=False):
        shape = tuple(shape)
        device = device or torch.device("cuda")
        data = torch.empty(shape, dtype=dtype, device=device)
        one = torch.ones(1, dtype=torch.float32, device=device)
        data_t = torch.empty(shape[::-1], dtype=dtype, device=device) if self.columnwise_usage else None
        return HiF8TensorStorage(
            data=data, scale=one, data_t=data_t, scale_t=one if data_t is not None else None, dtype=dtype,
            device=device, quant_dtype=dtype, original_shape=shape, _quantizer=self,
        )

    def qgemm(self, qx, qw, m_params, out_dtype, sx, sw, bias=None, out=None, accumulate=False,
              gemm_type=None, qresult_x=None, qresult_w=None) -> torch.Tensor:
        """y[M, N] = qx[M, K] @ qw[N, K]^T (+ bias) in the operands' dtype with fp32 accumulation."""
        y = torch.matmul(qx, qw.t()).to(out_dtype)
        if bias is not None and bias.numel():
            y = y + bias.to(out_dtype)
        if accumulate:
            if out is None:
                raise RuntimeError("HiF8Quantizer.qgemm: accumulate=True needs out=")
            out.add_(y)
            return out
        return y


def make_hif8_qfactory(recipe: Any, role_is_backward: Callable[[Any], bool]) -> Callable[[Any], Any]:
    """qfactory(role) -> HiF8Quantizer: grad roles use the recipe's backward settings, others the forward ones."""

    def qfactory(role: Any) -> HiF8Quantizer:
        backward = role_is_backward(role)
        name = "grad_output" if backward else "input"
        return HiF8Quantizer(lambda t: recipe.quantize(t, name))

    return qfactory
