"""Per-tensor amax-scaled HiF8 quantize-dequantize: a Triton GPU path and a torch path, bit-identical.

Semantics (OSP-Next current scaling; the delayed recipe passes its own scale):

    amax  = max |x|                                        (fp32; NaN if x holds a NaN)
    scale = scale_max / amax   in fp32, round-to-nearest   (1 if amax is 0 / Inf / NaN; fp32 max if it overflows)
    y     = hif8_round(fp32(x) * scale) / scale            (fp32 ops, round-to-nearest), cast to out_dtype

x: any shape, fp32 / bf16 / fp16, contiguous or not (made contiguous); y: same shape, `out_dtype` (default
x.dtype). fp64 (reference runs, e.g. comparing parallel layouts without fp32 summation noise flipping HiF8
codes) takes the torch path: x is rounded to fp32 first, so the codes are those of fp32(x). `rounding="hybrid"` uses the seeded stochastic rule of `hif8.hif8_round` with the element's flat index.

GPU path: kernel 1 reduces |x| to one fp32 amax (a max over the IEEE bits, one int32 atomic max per
persistent program); kernel 2 reads the amax, forms the scale on the device (no host sync) and writes y. A true single pass is not
possible for the *current* amax of a tensor larger than on-chip memory (every element needs the global amax
before it can be rounded), so current scaling costs 2 reads + 1 write. With a known scale (delayed scaling)
`qdq_with_scale(..., record_amax=True)` is one pass: quantize with the given scale and record this call's amax in
the same kernel (1 read + 1 write, like a copy).

NaN inputs give NaN outputs; the NaN bit pattern (payload) is not specified and differs between devices.

Exactness on GPU: multiplications are plain fp32 `mul.rn` (FMA contraction disabled); the scale and its
reciprocal come from the IEEE `div.rn.f32` instruction (Triton's `/` is an approximate division); the
per-element division q / scale is a multiply by the reciprocal plus one exact-residual FMA correction
(Markstein), which is the correctly rounded quotient for every HiF8 q in the scale range the kernel checks
(else it falls back to `div.rn.f32`); casts to bf16/fp16 round to nearest even, exactly as torch does on the CPU. Set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from osp_megatron.quant.hif8 import HASH_SEED_MULT, hif8_round

try:  # Triton ships with CUDA builds of torch; CPU installs may not have it
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAVE_TRITON = False

FP32_MAX = torch.finfo(torch.float32).max
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------------------------
# torch path (CPU or any device); the reference the kernels must equal bit for bit
# ------------------------------------------------------------------------------------------------
def scale_from_amax(amax: torch.Tensor, scale_max: float) -> torch.Tensor:
    """fp32 0-dim amax -> fp32 0-dim scale = scale_max / amax (1 for amax 0/Inf/NaN, fp32 max on overflow)."""
    amax = amax.float()
    scale = torch.tensor(float(scale_max), dtype=torch.float32, device=amax.device) / amax
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, FP32_MAX), scale)
    return torch.where((amax > 0) & torch.isfinite(amax), scale, torch.ones_like(scale))


def _amax_torch(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.detach().abs().amax().float()


def _qdq_torch(
    x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype, rounding: str, seed: int, saturate: bool = False
) -> torch.Tensor:
    xs = x.detach().float() * scale
    q = hif8_round(xs, saturate=saturate, rounding=rounding, seed=seed)
    return (q / scale).to(out_dtype)


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _div_rn(a, b, ASM_DIV: tl.constexpr):
        """IEEE fp32 a / b, round to nearest even (subnormals kept)."""
        if ASM_DIV:
            return tl.inline_asm_elementwise(
                "div.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
            )
        else:  # interpreter: numpy fp32 division is IEEE
            return a / b

    @triton.jit
    def _lowbias32(x):
        """x: uint32 tensor -> uint32 hash (same as hif8._mix32)."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B  # a literal in [2^31, 2^32) is typed uint32 by Triton
        x = x ^ (x >> 16)
        return x

    @triton.jit
    def _hif8_round_signed(v, idx, seed_mix, lut_ptr, sr_ptr, HYBRID: tl.constexpr):
        """fp32 tensor -> HiF8 rounding of v with the sign kept, before the overflow rule.

        One table lookup on the top 9 bits (sign and exponent) gives the rounding add and keep-mask (`round_tables`):
        `(bits + add) & mask` on the signed bits (the masks keep the sign bit, the flush rows clear it, so
        tiny values become +0). Magnitudes the table leaves above 32768 (binade >= 2^15 after rounding, Inf)
        are for the caller to map to Inf or 32768; NaN passes through.
        """
        bits = v.to(tl.int32, bitcast=True)
        eb = (v.to(tl.uint32, bitcast=True) >> 23).to(tl.int32)  # sign and exponent: 9 bits
        packed = tl.load(lut_ptr + eb)  # int64: add << 32 | mask
        mask = packed.to(tl.int32)
        add = (packed >> 32).to(tl.int32)
        if HYBRID:
            sh = tl.load(sr_ptr + eb)  # 32 - dropped bits in the stochastic region, else 0
            h = _lowbias32(idx + seed_mix)
            add = tl.where(sh != 0, (h >> sh.to(tl.uint32)).to(tl.int32), add)
        return ((bits + add) & mask).to(tl.float32, bitcast=True)

    @triton.jit
    def _amax_block(blk, x_ptr, n, acc, BLOCK: tl.constexpr, EVEN: tl.constexpr):
        base = blk.to(tl.int64) * BLOCK
        idx = tl.arange(0, BLOCK)
        if EVEN:
            x = tl.load(x_ptr + base + idx).to(tl.float32)
        else:
            x = tl.load(x_ptr + base + idx, mask=idx < tl.minimum(n - base, BLOCK).to(tl.int32), other=0.0)
            x = x.to(tl.float32)
        return tl.maximum(acc, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)

    @triton.jit
    def _amax_kernel(x_ptr, amax_bits_ptr, n, BLOCK: tl.constexpr, EVEN: tl.constexpr, PERSISTENT: tl.constexpr):
        """amax_bits[0] = max over x of the IEEE bits of |x| (int32; orders like the floats, NaN on top).

        PERSISTENT: each program strides over the blocks and issues one atomic at the end (else one block per
        program; the Triton interpreter cannot run loops with runtime bounds).
        """
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        if PERSISTENT:
            for blk in range(pid, tl.cdiv(n, BLOCK), tl.num_programs(0)):
                acc = _amax_block(blk, x_ptr, n, acc, BLOCK, EVEN)
        else:
            acc = _amax_block(pid, x_ptr, n, acc, BLOCK, EVEN)
        tl.atomic_max(amax_bits_ptr, tl.max(acc, axis=0))

    @triton.jit
    def _load_block(x_ptr, blk, n, BLOCK: tl.constexpr, EVEN: tl.constexpr, STREAM: tl.constexpr):
        """x[blk * BLOCK : (blk + 1) * BLOCK] in x's dtype (zeros past n)."""
        base = blk.to(tl.int64) * BLOCK
        idx = tl.arange(0, BLOCK)
        policy: tl.constexpr = "evict_first" if STREAM else ""
        if EVEN:
            return tl.load(x_ptr + base + idx, eviction_policy=policy)
        else:
            inb = idx < tl.minimum(n - base, BLOCK).to(tl.int32)
            return tl.load(x_ptr + base + idx, mask=inb, other=0.0, eviction_policy=policy)

    @triton.jit
    def _qdq_block(
        blk, x, y_ptr, n, acc, scale, recip, sat, fast, seed_u32, lut_ptr, sr_ptr,
        BLOCK: tl.constexpr, EVEN: tl.constexpr, RECORD_AMAX: tl.constexpr, HYBRID: tl.constexpr,
        SATURATE: tl.constexpr, ASM_DIV: tl.constexpr, MANUAL_BF16: tl.constexpr, STREAM: tl.constexpr,
    ):
        """Quantize-dequantize block `blk` (loaded values x) into y; returns acc updated with the |x| bits."""
        base = blk.to(tl.int64) * BLOCK
        idx = tl.arange(0, BLOCK)
        x = x.to(tl.float32)
        if RECORD_AMAX:
            acc = tl.maximum(acc, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
        q = _hif8_round_signed(x * scale, base.to(tl.uint32) + idx.to(tl.uint32), seed_u32, lut_ptr, sr_ptr, HYBRID)
        if ASM_DIV:
            if fast:  # Markstein: y0 = q r, e = q - y0 s (exact), y = y0 + e r, correctly rounded q / s
                y0 = q * recip
                y = tl.fma(y0 * -1.0, scale, q)
                y = tl.fma(y, recip, y0)
            else:
                y = _div_rn(q, scale, ASM_DIV)
        else:  # interpreter: numpy fp32 division is IEEE
            y = q / scale
        if SATURATE:  # |q| past 32768 (after rounding) or Inf -> +-32768 / s
            y = tl.where(tl.abs(q) > 32768.0, tl.where(q > 0.0, sat, -sat), y)
        else:  # -> +-Inf
            y = tl.where(tl.abs(q) > 32768.0, q * float("inf"), y)
        if MANUAL_BF16:  # y_ptr is an int16 view of a bf16 output: round-to-nearest-even by hand
            b = y.to(tl.uint32, bitcast=True)
            rne = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            y = tl.where(y != y, 0x7FC0, rne).to(tl.int16)
        else:
            y = y.to(y_ptr.dtype.element_ty)
        modifier: tl.constexpr = ".cs" if STREAM else ""
        if EVEN:
            tl.store(y_ptr + base + idx, y, cache_modifier=modifier)
        else:
            tl.store(y_ptr + base + idx, y, mask=idx < tl.minimum(n - base, BLOCK).to(tl.int32), cache_modifier=modifier)
        return acc

    @triton.jit(do_not_specialize=["seed_mix"])  # a new hybrid-rounding seed per call must not recompile
    def _qdq_kernel(
        x_ptr,
        y_ptr,
        lut_ptr,  # int64 [256] rounding table (round_tables)
        sr_ptr,  # int32 [256] stochastic-rounding shifts (round_tables)
        scale_src_ptr,  # fp32 amax (SCALE_FROM_AMAX) or fp32 scale
        amax_out_bits_ptr,  # int32 amax bits accumulator (RECORD_AMAX)
        scale_max,
        n,
        seed_mix,
        BLOCK: tl.constexpr,
        EVEN: tl.constexpr,  # n % BLOCK == 0: no bounds masks
        PERSISTENT: tl.constexpr,  # programs stride over blocks (else one block per program)
        PREFETCH: tl.constexpr,  # persistent: load block i + 1 before rounding block i
        STREAM: tl.constexpr,  # evict-first loads, streaming (.cs) stores
        SCALE_FROM_AMAX: tl.constexpr,
        RECORD_AMAX: tl.constexpr,
        HYBRID: tl.constexpr,
        SATURATE: tl.constexpr,
        ASM_DIV: tl.constexpr,
        MANUAL_BF16: tl.constexpr,
    ):
        """y = hif8_round(x * s) / s over blocks of BLOCK elements, s from the amax or given.

        The division by s runs as a multiply by r = 1/s (correctly rounded) plus one FMA correction
        (Markstein), the correctly rounded quotient whenever nothing underflows or overflows, which holds
        for every finite HiF8 q when 2^-100 <= s <= 2^70; other scales take the IEEE division instruction.
        Either way y equals torch's `q / s` bit for bit.
        """
        pid = tl.program_id(0)
        one = tl.full([1], 1.0, tl.float32)
        src = tl.load(scale_src_ptr + tl.arange(0, 1))  # [1]
        if SCALE_FROM_AMAX:
            s = _div_rn(one * scale_max, src, ASM_DIV)
            s = tl.where(s == float("inf"), 3.4028234663852886e38, s)
            s = tl.where((src > 0.0) & (src < float("inf")), s, 1.0)
        else:
            s = src
        recip = tl.max(_div_rn(one, s, ASM_DIV), axis=0)  # [1] -> scalar
        sat = tl.max(_div_rn(one * 32768.0, s, ASM_DIV), axis=0)
        fast = tl.max(((s >= 7.888609052210118e-31) & (s <= 1.1805916207174113e21)).to(tl.int32), axis=0) != 0
        scale = tl.max(s, axis=0)
        seed_u32 = seed_mix.to(tl.uint32)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        if PERSISTENT:
            nblocks = tl.cdiv(n, BLOCK)
            step = tl.num_programs(0)
            if PREFETCH:  # the next block's load is in flight while this one is rounded and stored
                nxt = _load_block(x_ptr, pid, n, BLOCK, EVEN, STREAM)
                for blk in range(pid, nblocks, step):
                    x = nxt
                    following = blk + step
                    if EVEN:  # stay in bounds without a mask (the last program re-reads its own block)
                        following = tl.minimum(following, nblocks - 1)
                    nxt = _load_block(x_ptr, following, n, BLOCK, EVEN, STREAM)
                    acc = _qdq_block(
                        blk, x, y_ptr, n, acc, scale, recip, sat, fast, seed_u32, lut_ptr, sr_ptr,
                        BLOCK, EVEN, RECORD_AMAX, HYBRID, SATURATE, ASM_DIV, MANUAL_BF16, STREAM,
                    )
            else:
                for blk in range(pid, nblocks, step):
                    x = _load_block(x_ptr, blk, n, BLOCK, EVEN, STREAM)
                    acc = _qdq_block(
                        blk, x, y_ptr, n, acc, scale, recip, sat, fast, seed_u32, lut_ptr, sr_ptr,
                        BLOCK, EVEN, RECORD_AMAX, HYBRID, SATURATE, ASM_DIV, MANUAL_BF16, STREAM,
                    )
        else:
            acc = _qdq_block(
                pid, _load_block(x_ptr, pid, n, BLOCK, EVEN, STREAM), y_ptr, n, acc, scale, recip, sat, fast,
                seed_u32, lut_ptr, sr_ptr, BLOCK, EVEN, RECORD_AMAX, HYBRID, SATURATE, ASM_DIV, MANUAL_BF16, STREAM,
            )
        if RECORD_AMAX:
            tl.atomic_max(amax_out_bits_ptr, tl.max(acc, axis=0))


_TABLES: dict = {}


def round_tables(device: torch.device | str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per fp32 sign + exponent (the top 9 bits, 0..511): int64 `add << 32 | mask` and int32 stochastic shift.

    Both signs get the same row (cached per device); the index is one shift of the bits.

    With e = byte - 127 the binade of the (scaled) input, HiF8 keeps 3 / 2 / 1 / 0 fraction bits for
    |e| <= 3 / <= 7 / <= 15 / e in [-22, -16]; dropping d = 23 - kept bits, TA rounding of the signed bits is
    `(bits + 2^(d-1)) & -2^d` (the mask keeps the sign bit). Special rows: e = -23 -> add 2^23, mask = sign and
    exponent (every value of the binade becomes +-2^-22); e < -23 (and zeros/subnormals) -> mask 0 (flush to
    +0); e >= 16, Inf, NaN -> add 0, mask -1 (unchanged; the caller maps magnitudes above 32768 to Inf or
    32768 and NaN stays NaN). Stochastic shift = 32 - d where hybrid rounding uses SR (|e| >= 4,
    -22 <= e <= 14), else 0.
    """
    key = str(device)
    if key not in _TABLES:
        lut, sr = [], []
        for eb in range(256):
            e = eb - 127
            shift = 0
            if eb == 255 or e >= 16:
                add, mask = 0, -1
            elif e < -23:
                add, mask = 0, 0
            elif e == -23:
                add, mask = 1 << 23, -(1 << 23)  # 0xFF800000
            else:
                keep = (abs(e) <= 3) + (abs(e) <= 7) + (abs(e) <= 15)
                drop = 23 - keep
                add, mask = 1 << (drop - 1), -(1 << drop)
                if abs(e) >= 4 and -22 <= e <= 14:
                    shift = 32 - drop
            lut.append((add << 32) | (mask & 0xFFFFFFFF))
            sr.append(shift)
        _TABLES[key] = (
            torch.tensor(lut + lut, dtype=torch.int64, device=device),  # sign bit 0, then 1
            torch.tensor(sr + sr, dtype=torch.int32, device=device),
        )
    return _TABLES[key]


# Launch shapes (H100/H200 tuned; the kernels are correct for any): elements per block, warps per program,
# persistent programs per SM. The `qdq` kernel is one read + one write per element, like a copy.
LAUNCH = {
    "amax": dict(block=8192, warps=8, per_sm=4),
    "qdq": dict(block=2048, warps=8, per_sm=4, prefetch=True, stream=False),
}
_SM_COUNT: dict = {}


def _grid(x: torch.Tensor, n: int, block: int, per_sm: int) -> Tuple[int]:
    """Persistent grid: at most `per_sm` programs per SM (one block per program in the interpreter)."""
    blocks = triton.cdiv(n, block)
    if _INTERPRET:
        return (blocks,)
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return (max(1, min(blocks, _SM_COUNT[idx] * per_sm)),)


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend={backend!r}: use auto, torch or triton")
    if backend == "torch":
        return False
    if x.dtype == torch.float64:
        if backend == "triton":
            raise RuntimeError("backend='triton' takes fp32/bf16/fp16 tensors; fp64 runs on the torch path")
        return False
    if backend == "triton":
        if not HAVE_TRITON:
            raise RuntimeError("backend='triton' needs the `triton` package (it ships with CUDA builds of torch)")
        if not (x.is_cuda or _INTERPRET):
            raise RuntimeError("backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)")
        return True
    return HAVE_TRITON and x.is_cuda


def _check(x: torch.Tensor, out_dtype: Optional[torch.dtype], rounding: str) -> torch.dtype:
    if not torch.is_tensor(x) or x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be a fp32/bf16/fp16/fp64 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    out_dtype = out_dtype or x.dtype
    if out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"out_dtype={out_dtype}: use torch.float32, torch.bfloat16, torch.float16 or torch.float64")
    if rounding not in ("ta", "hybrid"):
        raise ValueError(f"rounding={rounding!r}: use 'ta' or 'hybrid'")
    return out_dtype


def _seed_mix(seed: int) -> int:
    return (int(seed) * HASH_SEED_MULT) & 0xFFFFFFFF


def hif8_amax(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """max |x| as a fp32 0-dim tensor on x's device (NaN if x holds a NaN)."""
    if not _use_triton(x, backend) or x.numel() == 0:
        return _amax_torch(x)
    xc = x.detach().contiguous().view(-1)
    out = torch.zeros(1, dtype=torch.int32, device=x.device)
    n = xc.numel()
    cfg = LAUNCH["amax"]
    _amax_kernel[_grid(x, n, cfg["block"], cfg["per_sm"])](
        xc, out, n, BLOCK=cfg["block"], EVEN=n % cfg["block"] == 0, PERSISTENT=not _INTERPRET,
        num_warps=cfg["warps"]
    )
    return out.view(torch.float32)[0]  # the int max of NaN bits is a NaN


_UNUSED: dict = {}


def _unused_int32(device: torch.device) -> torch.Tensor:
    """A placeholder pointer for a kernel argument the launch does not touch (no allocation per call)."""
    key = str(device)
    if key not in _UNUSED:
        _UNUSED[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _UNUSED[key]


def _launch_qdq(
    x: torch.Tensor,
    src: torch.Tensor,
    scale_max: float,
    out_dtype: torch.dtype,
    rounding: str,
    seed: int,
    from_amax: bool,
    amax_bits: Optional[torch.Tensor],
    saturate: bool = False,
) -> torch.Tensor:
    xc = x.detach().contiguous()
    y = torch.empty(xc.shape, dtype=out_dtype, device=x.device)
    n = xc.numel()
    if n == 0:
        return y
    dummy = amax_bits if amax_bits is not None else _unused_int32(x.device)
    cfg = LAUNCH["qdq"]
    kwargs = {} if _INTERPRET else {"enable_fp_fusion": False}
    # the interpreter's fp32->bf16 cast is not round-to-nearest-even; GPUs' is (cvt.rn.bf16.f32)
    manual_bf16 = _INTERPRET and out_dtype == torch.bfloat16
    lut, sr = round_tables(x.device)
    _qdq_kernel[_grid(x, n, cfg["block"], cfg["per_sm"])](
        xc.view(-1),
        y.view(-1).view(torch.int16) if manual_bf16 else y.view(-1),
        lut,
        sr,
        src.to(device=x.device, dtype=torch.float32).reshape(1).contiguous(),
        dummy,
        float(scale_max),
        n,
        _seed_mix(seed),
        BLOCK=cfg["block"],
        EVEN=n % cfg["block"] == 0,
        PERSISTENT=not _INTERPRET,
        PREFETCH=cfg.get("prefetch", False),
        STREAM=cfg.get("stream", False),
        SCALE_FROM_AMAX=from_amax,
        RECORD_AMAX=amax_bits is not None,
        HYBRID=rounding == "hybrid",
        SATURATE=saturate,
        ASM_DIV=not _INTERPRET,
        MANUAL_BF16=manual_bf16,
        num_warps=cfg["warps"],
        **kwargs,
    )
    return y


def qdq_from_amax(
    x: torch.Tensor,
    amax: torch.Tensor,
    scale_max: float,
    out_dtype: Optional[torch.dtype] = None,
    rounding: str = "ta",
    seed: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """y = hif8_round(x * s) / s with s = scale_from_amax(amax, scale_max); amax: fp32 0-dim (e.g. TP-reduced)."""
    out_dtype = _check(x, out_dtype, rounding)
    if _use_triton(x, backend):
        return _launch_qdq(x, amax, scale_max, out_dtype, rounding, seed, True, None)
    return _qdq_torch(x, scale_from_amax(amax, scale_max), out_dtype, rounding, seed)


def qdq_with_scale(
    x: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: Optional[torch.dtype] = None,
    rounding: str = "ta",
    seed: int = 0,
    record_amax: bool = False,
    saturate: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One pass with a known fp32 0-dim `scale` (delayed scaling): (y, amax of x if record_amax else None).

    saturate: values whose scaled magnitude rounds past 32768 (and +-Inf) become +-32768 instead of +-Inf.
    """
    out_dtype = _check(x, out_dtype, rounding)
    if _use_triton(x, backend):
        bits = torch.zeros(1, dtype=torch.int32, device=x.device) if record_amax else None
        y = _launch_qdq(x, scale, 0.0, out_dtype, rounding, seed, False, bits, saturate)
        amax = None
        if record_amax:
            amax = bits.view(torch.float32)[0]  # the int max of NaN bits is a NaN
        return y, amax
    y = _qdq_torch(x, scale.float(), out_dtype, rounding, seed, saturate)
    return y, (_amax_torch(x) if record_amax else None)


def qdq_current(
    x: torch.Tensor,
    scale_max: float,
    out_dtype: Optional[torch.dtype] = None,
    rounding: str = "ta",
    seed: int = 0,
    group: Optional["torch.distributed.ProcessGroup"] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Current scaling: (y, amax). With `group`, amax is all-reduced (MAX) over it before scaling."""
    amax = hif8_amax(x, backend=backend)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        amax = amax.clone()
        torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=group)
    return qdq_from_amax(x, amax, scale_max, out_dtype, rounding, seed, backend), amax


__all__ = [
    "HAVE_TRITON",
    "hif8_amax",
    "qdq_current",
    "qdq_from_amax",
    "qdq_with_scale",
    "scale_from_amax",
]
