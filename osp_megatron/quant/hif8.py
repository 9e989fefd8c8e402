"""HiFloat8 (HiF8) codec: exact round / encode / decode in plain torch (any device).

HiF8 (Luo et al., arXiv 2409.16626) is an 8-bit float with a tapered mantissa. Its values, by the binade
``E = floor(log2|v|)`` of the value:

    E in [-22, -16]   denormal: 2^E only (0 fraction bits)     codes 0x01..0x07
    E in [-15,  -8]   1 fraction bit                           (Dot = 4)
    E in [ -7,  -4]   2 fraction bits                          (Dot = 3)
    E in [ -3,   3]   3 fraction bits                          (Dot = 0, 1, 2)
    E in [  4,   7]   2 fraction bits                          (Dot = 3)
    E in [  8,  14]   1 fraction bit                           (Dot = 4)
    E = 15            only 2^15 = 32768 (max finite, 0x6E); the code 0x6F is +Inf

plus one zero (0x00; there is no negative zero) and one NaN (0x80).

Rounding (``rounding="ta"``, the forward rule of the paper): round to nearest, ties away from zero. The
mantissa width is taken from the binade of the *input*; a carry into the next binade always lands on a
representable value. Consequences: |x| < 2^-23 -> 0, [2^-23, 2^-22) -> 2^-22, |x| >= 40960 (= 1.25 * 2^15)
-> Inf (``saturate=True``: -> 32768, and +-Inf inputs also map to +-32768, like CUDA's SATFINITE), NaN -> NaN
(``nan_to_zero=True``: -> 0).

Signed zero: HiF8 has one zero code, so ``hif8_encode(-0.0) == 0x00`` and every negative value that rounds
to zero also encodes to 0x00 -- exactly as ``en_dtypes.hifloat8`` does. ``hif8_round`` is defined as
``decode(encode(x))`` and therefore returns +0.0 for those inputs (never -0.0).

Exactness: bf16 and fp16 inputs are widened to fp32 (exact); fp32 inputs are rounded with int32 bit
arithmetic on the IEEE encoding (add half an ulp of the target precision, then truncate), fp64 inputs with
int64 bit arithmetic. No floating-point intermediate, hence no double rounding. (``en_dtypes`` converts fp64
through fp32, so it double-rounds fp64 inputs; fp32/bf16/fp16 agree bit for bit.)

Hybrid rounding (``rounding="hybrid"``, backward only, optional). The paper's exact cut-off (its eq. 3) is not
available to us, so this module implements this documented rule:

* TA (as above) when the input binade E satisfies |E| <= 3 (the 3-bit-mantissa centre), E = 15 (where the
  only finite neighbour is 32768; rounding up would create Inf), E >= 16 (overflow) or E <= -23 (the
  0 / 2^-22 flush region);
* unbiased stochastic rounding everywhere else (E in [-22, -4] or [4, 14]): with ``d`` dropped fp32
  mantissa bits, add a uniform random integer ``r`` in [0, 2^d) to the magnitude bits and truncate, so the
  magnitude rounds up with probability (dropped bits) / 2^d.
* ``r`` is the top ``d`` bits of a counter-based hash ``lowbias32((i + seed * 0x9E3779B9) mod 2^32)`` of
  the element's flat (row-major) index ``i`` and a 32-bit ``seed``. The same (seed, index) gives the same
  result on every device; the Triton kernel in ``hif8_kernels`` uses the same hash.

Shapes: every function is elementwise; output shape = input shape.
"""
from __future__ import annotations

from typing import Optional

import torch

HIF8_MAX = 32768.0  # 0x6E
HIF8_MIN_NORMAL = 2.0**-15  # 0x7E
HIF8_MIN_DENORMAL = 2.0**-22  # 0x01
HIF8_OVERFLOW = 40960.0  # 1.25 * 2^15: TA rounds |x| >= this to Inf (or saturates)
NAN_CODE = 0x80
POS_INF_CODE = 0x6F
NEG_INF_CODE = 0xEF
HASH_SEED_MULT = 0x9E3779B9
ROUNDING_MODES = ("ta", "hybrid")

# IEEE formats handled by integer arithmetic: (mantissa bits, exponent bias, int dtype)
_FORMATS = {
    torch.float32: (23, 127, torch.int32),
    torch.float64: (52, 1023, torch.int64),
}


# ------------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------------
def _decode_code(code: int) -> float:
    """Value of one 8-bit HiF8 code from the field definitions (paper Tables 1-3)."""
    sign = -1.0 if code & 0x80 else 1.0
    p = code & 0x7F
    if p == 0:
        return float("nan") if code & 0x80 else 0.0
    if p >> 5 == 0b11:  # Dot = 4: Se, 3 low exponent bits, 1 mantissa bit
        se, low, mant, w, dot = (p >> 4) & 1, (p >> 1) & 0b111, p & 1, 1, 4
    elif p >> 5 == 0b10:  # Dot = 3: Se, 2 low exponent bits, 2 mantissa bits
        se, low, mant, w, dot = (p >> 4) & 1, (p >> 2) & 0b11, p & 0b11, 2, 3
    elif p >> 5 == 0b01:  # Dot = 2: Se, 1 low exponent bit, 3 mantissa bits
        se, low, mant, w, dot = (p >> 4) & 1, (p >> 3) & 1, p & 0b111, 3, 2
    elif p >> 4 == 0b001:  # Dot = 1: Se, 3 mantissa bits
        se, low, mant, w, dot = (p >> 3) & 1, 0, p & 0b111, 3, 1
    elif p >> 3 == 0b0001:  # Dot = 0: E = 0, 3 mantissa bits
        se, low, mant, w, dot = 0, 0, p & 0b111, 3, 0
    else:  # 0000mmm: denormal 2^(m - 23)
        return sign * 2.0 ** ((p & 0b111) - 23)
    mag = 0 if dot == 0 else (1 << (dot - 1)) + low
    e = -mag if se else mag
    if e == 15 and mant == 1:
        return sign * float("inf")
    return sign * 2.0**e * (1.0 + mant / (1 << w))


_DECODE_TABLE = torch.tensor([_decode_code(c) for c in range(256)], dtype=torch.float32)


def hif8_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 codes [any shape] -> values of `dtype` (every HiF8 value is exact in fp32/bf16/fp16)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"hif8_decode: codes must be torch.uint8, got {codes.dtype}; use hif8_encode to make them")
    table = _DECODE_TABLE.to(codes.device)
    return table[codes.long()].to(dtype)


def decode_table() -> torch.Tensor:
    """The 256 HiF8 values as fp32, indexed by code (a copy)."""
    return _DECODE_TABLE.clone()


# ------------------------------------------------------------------------------------------------
# round
# ------------------------------------------------------------------------------------------------
def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 hash of uint32 values held in int64 (no int64 overflow anywhere)."""
    mask = 0xFFFFFFFF

    def mul32(v: torch.Tensor, c: int) -> torch.Tensor:
        lo = v * (c & 0xFFFF)
        hi = ((v * (c >> 16)) & 0xFFFF) << 16
        return (lo + hi) & mask

    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def hash_uniform_bits(numel: int, seed: int, device: torch.device | str = "cpu", offset: int = 0) -> torch.Tensor:
    """32 random bits per flat index i in [offset, offset+numel): lowbias32((i + seed*0x9E3779B9) mod 2^32), int64."""
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    key = (idx + (int(seed) * HASH_SEED_MULT)) & 0xFFFFFFFF
    return _mix32(key)


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding={rounding!r}: use one of {ROUNDING_MODES} ('hybrid' is meant for gradients)")


def _round_bits(
    x: torch.Tensor, saturate: bool, nan_to_zero: bool, rounding: str, seed: int
) -> torch.Tensor:
    """IEEE fp32/fp64 tensor -> HiF8-rounded value in the same dtype (bit arithmetic, see module doc)."""
    mbits, bias, itype = _FORMATS[x.dtype]
    if rounding == "hybrid" and x.dtype != torch.float32:
        raise ValueError("hybrid rounding supports fp32/bf16/fp16 inputs (fp64 is rounded with rounding='ta')")
    one = torch.ones((), dtype=itype, device=x.device)
    bits = x.contiguous().view(itype)
    sign_mask = -(1 << (8 * x.element_size() - 1))  # the sign bit as a negative int
    abs_mask = ~sign_mask
    inf_bits = ((2 * bias + 1) << mbits)  # all-ones exponent, zero mantissa
    ab = bits & abs_mask
    is_nan = ab > inf_bits
    ab = torch.minimum(ab, torch.full_like(ab, inf_bits))  # keep the add below inside the int range
    e = (ab >> mbits) - bias  # unbiased binade of the input (zero/subnormal -> very negative)
    ae = e.abs()
    keep = (ae <= 3).to(itype) + (ae <= 7).to(itype) + (ae <= 15).to(itype)  # 3 | 2 | 1 | 0 fraction bits
    drop = mbits - keep
    step = one << drop
    if rounding == "ta":
        add = step >> 1
    else:
        rnd = hash_uniform_bits(x.numel(), seed, x.device).view(x.shape)
        sr_add = (rnd >> (32 - drop.to(torch.int64))).to(itype)  # uniform in [0, 2^drop)
        use_sr = (ae >= 4) & (e <= 14) & (e >= -22)
        add = torch.where(use_sr, sr_add, step >> 1)
    r = (ab + add) & (-step)
    min_den_bits = (bias - 22) << mbits  # 2^-22
    r = torch.where(e < -23, torch.zeros_like(r), r)
    r = torch.where(e == -23, torch.full_like(r, min_den_bits), r)  # [2^-23, 2^-22): tie or above -> 2^-22
    max_bits = (bias + 15) << mbits  # 32768
    over = r > max_bits
    r = torch.where(over, torch.full_like(r, max_bits if saturate else inf_bits), r)
    canon_nan = inf_bits | (1 << (mbits - 1))
    r = torch.where(is_nan, torch.full_like(r, 0 if nan_to_zero else canon_nan), r)
    neg = (bits & sign_mask) != 0
    r = torch.where(neg & (r != 0), r | sign_mask, r)  # zero stays +0 (HiF8 has no -0)
    return r.view(x.dtype)


def hif8_round(
    x: torch.Tensor,
    saturate: bool = False,
    nan_to_zero: bool = False,
    rounding: str = "ta",
    seed: int = 0,
) -> torch.Tensor:
    """Round to the nearest HiF8 value (= decode(encode(x))); same shape and dtype as `x`.

    x: fp32 / bf16 / fp16 / fp64 tensor of any shape. `rounding` = "ta" (ties away from zero) or "hybrid"
    (TA in the 3-bit centre, seeded stochastic rounding elsewhere; see the module docstring). `seed` is used
    by "hybrid" only.
    """
    _check_rounding(rounding)
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"hif8_round: x must be a floating-point tensor, got {type(x).__name__} "
                        f"{getattr(x, 'dtype', '')}")
    if x.dtype in (torch.bfloat16, torch.float16):
        return _round_bits(x.float(), saturate, nan_to_zero, rounding, seed).to(x.dtype)
    if x.dtype not in _FORMATS:
        raise TypeError(f"hif8_round: unsupported dtype {x.dtype}; use fp32, bf16, fp16 or fp64")
    return _round_bits(x, saturate, nan_to_zero, rounding, seed)


# ------------------------------------------------------------------------------------------------
# encode
# ------------------------------------------------------------------------------------------------
def _encode_rounded_fp32(r: torch.Tensor) -> torch.Tensor:
    """fp32 tensor already on the HiF8 grid (incl. +-Inf, NaN, +0) -> uint8 codes."""
    bits = r.view(torch.int32)
    neg = bits < 0
    ab = bits & 0x7FFFFFFF
    e = (ab >> 23) - 127
    ae = e.abs()
    se = (e < 0).to(torch.int32)
    frac = ab & 0x7FFFFF
    m3 = frac >> 20
    m2 = frac >> 21
    m1 = frac >> 22
    code = torch.where(ae >= 8, 0x60 | (se << 4) | ((ae - 8).clamp(0, 7) << 1) | m1, torch.zeros_like(ab))
    code = torch.where((ae >= 4) & (ae <= 7), 0x40 | (se << 4) | ((ae - 4) << 2) | m2, code)
    code = torch.where((ae >= 2) & (ae <= 3), 0x20 | (se << 4) | ((ae - 2) << 3) | m3, code)
    code = torch.where(ae == 1, 0x10 | (se << 3) | m3, code)
    code = torch.where(ae == 0, 0x08 | m3, code)
    code = torch.where((e >= -22) & (e <= -16), e + 23, code)  # denormal 2^(m-23)
    code = torch.where(ab == 0x7F800000, torch.full_like(code, POS_INF_CODE), code)
    code = torch.where(ab == 0, torch.zeros_like(code), code)
    code = torch.where(neg & (ab != 0), code | 0x80, code)
    code = torch.where(ab > 0x7F800000, torch.full_like(code, NAN_CODE), code)
    return code.to(torch.uint8)


def hif8_encode(x: torch.Tensor, saturate: bool = False, nan_to_zero: bool = False) -> torch.Tensor:
    """Float tensor (fp32/bf16/fp16/fp64, any shape) -> uint8 HiF8 codes, TA rounding. -0.0 -> 0x00."""
    r = hif8_round(x, saturate=saturate, nan_to_zero=nan_to_zero)
    return _encode_rounded_fp32(r.float())


def hif8_qdq_reference(
    x: torch.Tensor, scale_max: float, rounding: str = "ta", seed: int = 0, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Hand-written per-tensor current-scaling quantize-dequantize (OSP-Next semantics), for tests.

    scale = scale_max / amax(|x|) in fp32 (1 when amax is 0 or not finite; fp32 max when it overflows);
    y = hif8_round(fp32(x) * scale) / scale, cast to `out_dtype` (default x.dtype).
    """
    xf = x.float()
    amax = xf.abs().max() if xf.numel() else torch.zeros((), dtype=torch.float32, device=x.device)
    scale = torch.tensor(float(scale_max), dtype=torch.float32, device=x.device) / amax
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, torch.finfo(torch.float32).max), scale)
    scale = torch.where((amax > 0) & torch.isfinite(amax), scale, torch.ones_like(scale))
    y = hif8_round(xf * scale, rounding=rounding, seed=seed) / scale
    return y.to(out_dtype or x.dtype)


__all__ = [
    "HIF8_MAX",
    "HIF8_MIN_NORMAL",
    "HIF8_MIN_DENORMAL",
    "HIF8_OVERFLOW",
    "NAN_CODE",
    "POS_INF_CODE",
    "NEG_INF_CODE",
    "ROUNDING_MODES",
    "decode_table",
    "hash_uniform_bits",
    "hif8_decode",
    "hif8_encode",
    "hif8_qdq_reference",
    "hif8_round",
]
