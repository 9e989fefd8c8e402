"""Amax-scaled HiF8 quantize-dequantize: torch path vs the hand-written reference; Triton vs torch bit for bit."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from osp_megatron.quant import hif8_kernels as K
from osp_megatron.quant.hif8 import hif8_qdq_reference, hif8_round


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def _mixed(n: int, dtype: torch.dtype, gen: torch.Generator, lo: int = -20, hi: int = 12) -> torch.Tensor:
    mag = torch.exp2(torch.randint(lo, hi, (n,), generator=gen).float())
    return (torch.randn(n, generator=gen) * mag).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_max", [15.0, 224.0])
def test_torch_path_equals_reference(dtype, scale_max):
    g = torch.Generator().manual_seed(1)
    x = _mixed(50_000, dtype, g, -8, 8).view(100, 500)
    y, amax = K.qdq_current(x, scale_max, backend="torch")
    assert y.shape == x.shape and y.dtype == dtype
    assert amax.item() == x.float().abs().max().item()
    assert torch.equal(_bits(y), _bits(hif8_qdq_reference(x, scale_max)))
    # by hand: scaled values land on the HiF8 grid and amax maps to scale_max's HiF8 value
    s = torch.tensor(scale_max, dtype=torch.float32) / amax
    assert torch.equal(hif8_round(x.float() * s) / s, K.qdq_current(x, scale_max, torch.float32, backend="torch")[0])


def _lut_round(x: torch.Tensor, saturate: bool = False) -> torch.Tensor:
    """The Triton kernel's table-driven rounding on the signed bits, re-done with torch int ops (no Triton)."""
    lut, _ = K.round_tables()
    bits = x.view(torch.int32)
    packed = lut[((bits >> 23) & 0x1FF).long()]
    mask = (packed & 0xFFFFFFFF).to(torch.int64)
    mask = torch.where(mask >= 2**31, mask - 2**32, mask).to(torch.int32)
    add = (packed >> 32).to(torch.int32)
    q = ((bits + add) & mask).view(torch.float32)
    big = q.abs() > 32768.0
    return torch.where(big, q.sign() * (32768.0 if saturate else math.inf), q)


@pytest.mark.parametrize("saturate", [False, True])
def test_kernel_rounding_table_equals_codec(saturate):
    g = torch.Generator().manual_seed(11)
    bits = torch.randint(-(2**31), 2**31 - 1, (400_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[~torch.isnan(x)]
    from osp_megatron.quant.hif8 import decode_table

    grid = decode_table()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].sort().values.double()
    grid = torch.cat([grid, torch.tensor([49152.0], dtype=torch.float64)])
    mids = ((grid[:-1] + grid[1:]) / 2).float()
    near = torch.cat([mids, torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, mids * 2)])
    x = torch.cat([x, near, -near, torch.tensor([0.0, -0.0, math.inf, -math.inf, 2.0**-23, 1e-45])])
    assert torch.equal(_lut_round(x, saturate).view(torch.int32), hif8_round(x, saturate=saturate).view(torch.int32))


def test_scale_edge_cases():
    assert K.scale_from_amax(torch.tensor(0.0), 15.0).item() == 1.0
    assert K.scale_from_amax(torch.tensor(math.inf), 15.0).item() == 1.0
    assert K.scale_from_amax(torch.tensor(math.nan), 15.0).item() == 1.0
    assert K.scale_from_amax(torch.tensor(1e-45), 15.0).item() == torch.finfo(torch.float32).max
    assert K.scale_from_amax(torch.tensor(2.0), 15.0).item() == 7.5
    z = torch.zeros(4, 4)
    y, amax = K.qdq_current(z, 15.0)
    assert amax.item() == 0.0 and torch.equal(y, z)
    x = torch.tensor([1.0, math.nan, -3.0])
    y, amax = K.qdq_current(x, 15.0)
    assert math.isnan(amax.item()) and math.isnan(y[1].item()) and y[0].item() == 1.0 and y[2].item() == -3.0


def test_qdq_with_scale_records_amax_of_the_input():
    g = torch.Generator().manual_seed(2)
    x = _mixed(1000, torch.bfloat16, g)
    y, amax = K.qdq_with_scale(x, torch.tensor(0.25), record_amax=True)
    assert amax.item() == x.float().abs().max().item()
    want = (hif8_round(x.float() * 0.25) / 0.25).to(torch.bfloat16)
    assert torch.equal(_bits(y), _bits(want))


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="fp32/bf16/fp16"):
        K.qdq_current(torch.arange(3), 15.0)
    with pytest.raises(ValueError, match="rounding"):
        K.qdq_current(torch.ones(3), 15.0, rounding="nearest")
    with pytest.raises(ValueError, match="backend"):
        K.qdq_current(torch.ones(3), 15.0, backend="cuda")


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from osp_megatron.quant import hif8_kernels as K
    assert K._INTERPRET and K.HAVE_TRITON
    bits = lambda t: t.view({torch.float32: torch.int32}.get(t.dtype, torch.int16))
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(5000, generator=g) * torch.exp2(torch.randint(-12, 10, (5000,), generator=g).float())).to(dt)
        x[:4] = torch.tensor([0.0, -0.0, float("inf") if dt != torch.float16 else 0.0, 1e-30])
        a1, a0 = K.hif8_amax(x, backend="triton"), K.hif8_amax(x, backend="torch")
        assert a1.item() == a0.item() or (a1.isinf() and a0.isinf())
        xf = x[4:]
        amax = K.hif8_amax(xf, backend="torch")
        for rounding in ("ta", "hybrid"):
            for od in (torch.float32, torch.bfloat16, torch.float16):
                y1 = K.qdq_from_amax(xf, amax, 224.0, od, rounding, seed=9, backend="triton")
                y0 = K.qdq_from_amax(xf, amax, 224.0, od, rounding, seed=9, backend="torch")
                assert torch.equal(bits(y1), bits(y0)), (dt, rounding, od)
        y1, m1 = K.qdq_with_scale(xf, torch.tensor(3.7), record_amax=True, backend="triton")
        y0, m0 = K.qdq_with_scale(xf, torch.tensor(3.7), record_amax=True, backend="torch")
        assert torch.equal(bits(y1), bits(y0)) and m1.item() == m0.item()
        y1, _ = K.qdq_with_scale(xf, torch.tensor(1e4), torch.float32, saturate=True, backend="triton")
        y0, _ = K.qdq_with_scale(xf, torch.tensor(1e4), torch.float32, saturate=True, backend="torch")
        assert torch.equal(bits(y1), bits(y0)) and torch.isfinite(y1).all()
        # a whole number of blocks (the unmasked path), with Inf, NaN and overflow to Inf
        xe = torch.cat([xf, xf])[: 2 * K.LAUNCH["qdq"]["block"]].clone()
        xe[:3] = torch.tensor([float("nan"), float("-inf"), -7e4]).to(dt)
        for sat in (False, True):
            y1, m1 = K.qdq_with_scale(xe, torch.tensor(0.5), torch.float32, saturate=sat, record_amax=True, backend="triton")
            y0, m0 = K.qdq_with_scale(xe, torch.tensor(0.5), torch.float32, saturate=sat, record_amax=True, backend="torch")
            assert torch.equal(bits(y1[1:]), bits(y0[1:])) and y1[0].isnan() and m1.isnan(), (dt, sat)
    print("OK")
    """
)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _triton_importable(), reason="triton is not installed (CPU install)")
def test_triton_kernels_in_interpreter_equal_torch_path():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_on_cuda_is_bit_identical_to_codec(dtype):
    assert K.HAVE_TRITON, "CUDA machine without triton"
    g = torch.Generator().manual_seed(3)
    n = 3_000_001  # not a multiple of any block size
    x = _mixed(n, dtype, g, -16, 10)
    x[:6] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1.0625, -18.0]).to(dtype)
    xc = x.cuda()
    amax_gpu = K.hif8_amax(xc)
    assert amax_gpu.item() == x.float().abs().max().item()
    for scale_max in (15.0, 224.0):
        for rounding in ("ta", "hybrid"):
            for od in (torch.float32, torch.bfloat16):
                y_gpu = K.qdq_from_amax(xc, amax_gpu, scale_max, od, rounding, seed=17, backend="triton").cpu()
                y_cpu = K.qdq_from_amax(x, amax_gpu.cpu(), scale_max, od, rounding, seed=17, backend="torch")
                assert torch.equal(_bits(y_gpu), _bits(y_cpu)), (scale_max, rounding, od)
    # the torch path on CUDA tensors agrees too (same IEEE ops)
    y_t = K.qdq_from_amax(xc, amax_gpu, 15.0, backend="torch").cpu()
    assert torch.equal(_bits(y_t), _bits(K.qdq_from_amax(x, amax_gpu.cpu(), 15.0, backend="torch")))
    # one-pass delayed-scaling form
    y1, m1 = K.qdq_with_scale(xc, torch.tensor(0.37, device="cuda"), record_amax=True, backend="triton")
    y0, m0 = K.qdq_with_scale(x, torch.tensor(0.37), record_amax=True, backend="torch")
    assert torch.equal(_bits(y1.cpu()), _bits(y0)) and m1.item() == m0.item()
    # every tie of the scaled grid on the GPU codec path: scale 1 exposes the raw rounding
    from osp_megatron.quant.hif8 import decode_table

    grid = decode_table()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].sort().values.double()
    mids = ((grid[:-1] + grid[1:]) / 2).float()
    ties = torch.cat([mids, -mids, torch.nextafter(mids, torch.zeros_like(mids))]).to(dtype)
    y1, _ = K.qdq_with_scale(ties.cuda(), torch.tensor(1.0, device="cuda"), torch.float32, backend="triton")
    assert torch.equal(_bits(y1.cpu()), _bits(hif8_round(ties.float())))


@pytest.mark.gpu
def test_triton_division_equals_ieee_division_over_scales():
    """The kernel's reciprocal-plus-FMA division (and its div.rn fallback) equals torch's q / s bit for bit.

    Every bf16 bit pattern, and 2^20 random fp32 patterns, quantized with 600 scales spread over 2^-120..2^100
    (both sides of the fast-path range), plus the scales amax -> 15 / 224 of those inputs, compared with
    the torch path (IEEE fp32 division on the device).
    """
    g = torch.Generator().manual_seed(5)
    all_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).cuda()
    rnd_f32 = torch.randint(-(2**31), 2**31 - 1, (2**20,), generator=g, dtype=torch.int64).to(torch.int32)
    rnd_f32 = rnd_f32.view(torch.float32).cuda()
    exps = torch.empty(600).uniform_(-120, 100, generator=g)
    scales = torch.exp2(exps) * torch.empty(600).uniform_(1, 2, generator=g)
    scales = torch.cat([scales, torch.tensor([1.0, 2.0**-100, 2.0**70, 2.0**-101, 2.0**71, 15.0 / 3.0, 224 / 7.0])])
    for x in (all_bf16, rnd_f32):
        for s in scales.tolist():
            st = torch.tensor(s, dtype=torch.float32, device="cuda")
            for od in (torch.float32, torch.bfloat16):
                y1, _ = K.qdq_with_scale(x, st, od, backend="triton")
                y0, _ = K.qdq_with_scale(x, st, od, backend="torch")
                same = (_bits(y1) == _bits(y0)) | (y1.isnan() & y0.isnan())
                assert bool(same.all()), (s, od, x.dtype, int((~same).sum()))
        for scale_max in (15.0, 224.0):
            amax = K.hif8_amax(x[torch.isfinite(x)])
            y1 = K.qdq_from_amax(x, amax, scale_max, torch.float32, backend="triton")
            y0 = K.qdq_from_amax(x, amax, scale_max, torch.float32, backend="torch")
            assert bool(((_bits(y1) == _bits(y0)) | (y1.isnan() & y0.isnan())).all())
