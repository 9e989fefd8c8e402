"""HiF8 codec vs the en-dtypes golden model (`en_dtypes.hifloat8`) and the paper's test vectors."""
import math

import numpy as np
import pytest
import torch

from osp_megatron.quant.hif8 import (
    HIF8_MAX,
    decode_table,
    hash_uniform_bits,
    hif8_decode,
    hif8_encode,
    hif8_round,
)

en_dtypes = pytest.importorskip("en_dtypes")
HIF8 = en_dtypes.hifloat8


def en_round(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # NaN inputs
        return np.asarray(x).astype(HIF8).astype(np.float32)


def en_codes(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.asarray(x).astype(HIF8).view(np.uint8)


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: identical fp32 bit patterns, or both NaN."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def positive_grid() -> np.ndarray:
    """All finite non-negative HiF8 values, sorted (127 values: 0 .. 32768)."""
    t = decode_table().numpy()
    return np.unique(t[np.isfinite(t) & (t >= 0)])


# ------------------------------------------------------------------------------------------------
def test_all_256_codes_decode_like_en_dtypes():
    ref = np.arange(256, dtype=np.uint8).view(HIF8).astype(np.float32)
    ours = hif8_decode(torch.arange(256, dtype=torch.int32).to(torch.uint8)).numpy()
    assert same_bits(ours, ref).all()
    assert np.isnan(ours).sum() == 1 and np.isnan(ours[0x80])
    assert len(positive_grid()) == 127  # 126 positive + zero


def test_all_256_codes_encode_back_to_themselves():
    values = decode_table()
    codes = hif8_encode(values).numpy()
    assert (codes == np.arange(256)).all()
    assert (en_codes(values.numpy()) == np.arange(256)).all()


def test_paper_decode_vectors():
    vectors = {
        0x01: 2.0**-22, 0x07: 2.0**-16, 0x08: 1.0, 0x09: 1.125, 0x0F: 1.875, 0x10: 2.0, 0x18: 0.5,
        0x20: 4.0, 0x27: 7.5, 0x28: 8.0, 0x38: 0.125, 0x40: 16.0, 0x47: 56.0, 0x48: 64.0,
        0x5F: 1.75 * 2.0**-7, 0x60: 256.0, 0x61: 384.0, 0x6E: 32768.0, 0x70: 2.0**-8, 0x7E: 2.0**-15,
        0x7F: 1.5 * 2.0**-15, 0x88: -1.0, 0xEE: -32768.0, 0xFF: -1.5 * 2.0**-15,
        0x00: 0.0, 0x6F: math.inf, 0xEF: -math.inf,
    }
    codes = torch.tensor(list(vectors), dtype=torch.int32).to(torch.uint8)
    got = hif8_decode(codes).tolist()
    assert got == list(vectors.values())
    assert math.isnan(hif8_decode(torch.tensor([0x80], dtype=torch.uint8)).item())


def test_paper_encode_vectors():
    cases = [
        (1.0625, 1.125), (1.1, 1.125), (17.0, 16.0), (18.0, 20.0), (0.3, 0.3125), (3e-5, 2.0**-15),
        (1.4 * 2.0**-17, 2.0**-17), (1.5 * 2.0**-17, 2.0**-16), (2.0**-23, 2.0**-22), (5e-8, 0.0),
        (40959.0, 32768.0), (40960.0, math.inf),
    ]
    x = torch.tensor([c[0] for c in cases], dtype=torch.float32)
    want = [c[1] for c in cases]
    assert hif8_round(x).tolist() == pytest.approx(want, abs=0, rel=0)
    assert hif8_round(-x).tolist() == [-w if w != 0 else 0.0 for w in want]


def test_one_million_random_values_across_all_binades():
    rng = np.random.default_rng(1234)
    n = 1_000_000
    exps = rng.integers(-30, 20, n)  # below 2^-23 (flush) .. above 2^16 (overflow)
    mant = 1.0 + rng.random(n)
    sign = rng.choice([-1.0, 1.0], n)
    x = (sign * mant * np.exp2(exps)).astype(np.float32)
    got = hif8_round(torch.from_numpy(x)).numpy()
    assert same_bits(got, en_round(x)).all()
    assert (hif8_encode(torch.from_numpy(x)).numpy() == en_codes(x)).all()


def test_random_fp32_bit_patterns():
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    got = hif8_round(torch.from_numpy(x.copy())).numpy()
    assert same_bits(got, en_round(x)).all()
    assert (hif8_encode(torch.from_numpy(x.copy())).numpy() == en_codes(x)).all()


def test_every_midpoint_and_its_neighbours():
    grid = positive_grid().astype(np.float64)
    grid = np.append(grid, 1.5 * 2.0**15)  # the (infinite) code above 32768: midpoint 40960 -> Inf
    lo, hi = grid[:-1], grid[1:]
    mid = ((lo + hi) / 2).astype(np.float32)  # exact in fp32
    assert (mid.astype(np.float64) == (lo + hi) / 2).all()
    below = np.nextafter(mid, np.float32(0))
    above = np.nextafter(mid, np.float32(np.inf))
    for sign in (1.0, -1.0):
        for pts in (mid, below, above):
            x = (sign * pts).astype(np.float32)
            got = hif8_round(torch.from_numpy(x)).numpy()
            assert same_bits(got, en_round(x)).all()
            assert (hif8_encode(torch.from_numpy(x)).numpy() == en_codes(x)).all()
        # ties away from zero; just below -> the lower magnitude; just above -> the upper one
        upper = np.where(hi == 1.5 * 2.0**15, np.inf, hi).astype(np.float32)
        assert (hif8_round(torch.from_numpy(sign * mid)).numpy() == sign * upper).all()
        lower = np.where(lo == 0, 0.0, sign * lo).astype(np.float32)
        assert (hif8_round(torch.from_numpy((sign * below).astype(np.float32))).numpy() == lower).all()
        assert (hif8_round(torch.from_numpy((sign * above).astype(np.float32))).numpy() == sign * upper).all()


def test_signed_zero_and_tiny_negatives_encode_to_the_single_zero():
    x = torch.tensor([0.0, -0.0, -5e-8, -2.0**-24, 1e-40, -1e-40], dtype=torch.float32)
    assert hif8_encode(x).tolist() == [0] * 6
    assert (en_codes(x.numpy()) == 0).all()
    r = hif8_round(x)
    assert (r == 0).all() and not torch.signbit(r).any()  # +0.0, as decode(0x00)


def test_subnormal_range_rounds_linearly_between_powers_of_two():
    e = np.arange(-23, -15)
    for k in e:
        x = np.array([2.0**k, 1.25 * 2.0**k, 1.49 * 2.0**k, 1.5 * 2.0**k, 1.99 * 2.0**k], dtype=np.float32)
        got = hif8_round(torch.from_numpy(x)).numpy()
        assert same_bits(got, en_round(x)).all()
    assert hif8_encode(torch.tensor([2.0**-22, 2.0**-16])).tolist() == [0x01, 0x07]


def test_inf_nan_and_overflow_threshold():
    x = torch.tensor([math.inf, -math.inf, math.nan, 40960.0, -40960.0, 40959.996, 1e30, 32768.0])
    codes = hif8_encode(x).tolist()
    assert codes == [0x6F, 0xEF, 0x80, 0x6F, 0xEF, 0x6E, 0x6F, 0x6E]
    assert codes == en_codes(x.numpy()).tolist()
    r = hif8_round(x)
    assert r[:2].tolist() == [math.inf, -math.inf] and math.isnan(r[2].item())
    assert hif8_round(torch.tensor([math.nan]), nan_to_zero=True).item() == 0.0
    assert hif8_encode(torch.tensor([math.nan]), nan_to_zero=True).item() == 0x00


def test_saturate_maps_overflow_and_inf_to_max():
    rng = np.random.default_rng(3)
    x = (rng.choice([-1, 1], 20000) * np.exp2(rng.uniform(-25, 18, 20000))).astype(np.float32)
    x = np.concatenate([x, np.array([np.inf, -np.inf, 40960, -1e38], dtype=np.float32)])
    got = hif8_round(torch.from_numpy(x), saturate=True).numpy()
    ref = en_round(x)
    want = np.where(np.isinf(ref), np.sign(ref) * HIF8_MAX, ref).astype(np.float32)
    assert same_bits(got, want).all()
    assert np.isfinite(got).all()


def test_bf16_exhaustive_and_fp16_exhaustive():
    all16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.bfloat16, torch.float16):
        x = all16.view(dtype)
        got = hif8_round(x)
        assert got.dtype == dtype
        ref = en_round(x.float().numpy())
        assert same_bits(got.float().numpy(), ref).all(), dtype
        assert (hif8_encode(x).numpy() == en_codes(x.float().numpy())).all()
    xh = all16.view(torch.float16).numpy()
    assert (hif8_encode(torch.from_numpy(xh)).numpy() == en_codes(xh)).all()  # fp16 -> hifloat8 directly


def test_fp64_is_rounded_exactly_without_double_rounding():
    x = torch.tensor([1.0625 - 1e-12, 1.0625, 1.0625 + 1e-12, 18.0 - 1e-9], dtype=torch.float64)
    assert hif8_round(x).tolist() == [1.0, 1.125, 1.125, 16.0]
    assert hif8_round(x).dtype == torch.float64


def test_shapes_and_bad_inputs():
    x = torch.randn(3, 4, 5)
    assert hif8_round(x).shape == x.shape and hif8_encode(x).shape == x.shape
    assert hif8_decode(hif8_encode(x)).shape == x.shape
    with pytest.raises(TypeError, match="floating-point"):
        hif8_round(torch.arange(4))
    with pytest.raises(TypeError, match="uint8"):
        hif8_decode(torch.arange(4))
    with pytest.raises(ValueError, match="rounding"):
        hif8_round(x, rounding="sr")


# ------------------------------------------------------------------------------------------------
# hybrid rounding (backward option)
# ------------------------------------------------------------------------------------------------
def _lowbias32(v: int) -> int:
    v ^= v >> 16
    v = (v * 0x7FEB352D) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * 0x846CA68B) & 0xFFFFFFFF
    v ^= v >> 16
    return v


def test_hash_matches_plain_python_lowbias32():
    seed = 987654321
    got = hash_uniform_bits(1000, seed, offset=2**32 - 500).tolist()
    want = [_lowbias32((i + seed * 0x9E3779B9) & 0xFFFFFFFF) for i in range(2**32 - 500, 2**32 + 500)]
    assert got == want


def test_hybrid_rounding_rule():
    rng = np.random.default_rng(5)
    n = 200_000
    x = (rng.choice([-1, 1], n) * np.exp2(rng.uniform(-24, 16, n))).astype(np.float32)
    xt = torch.from_numpy(x)
    hr = hif8_round(xt, rounding="hybrid", seed=11).numpy()
    ta = hif8_round(xt).numpy()
    e = np.floor(np.log2(np.abs(x.astype(np.float64))))
    ta_region = (np.abs(e) <= 3) | (e >= 15) | (e <= -23)
    assert same_bits(hr[ta_region], ta[ta_region]).all()
    # SR results are always one of the two HiF8 neighbours of x
    grid = positive_grid()
    a = np.abs(x[~ta_region]).astype(np.float64)
    idx = np.searchsorted(grid, a, side="right")
    lo, hi = grid[idx - 1], grid[np.minimum(idx, len(grid) - 1)]
    got = np.abs(hr[~ta_region])
    assert ((got == lo) | (got == hi)).all()
    assert (got != ta[~ta_region].__abs__()).any()  # stochastic rounding really differs from TA somewhere
    # deterministic in the seed
    assert same_bits(hif8_round(xt, rounding="hybrid", seed=11).numpy(), hr).all()
    assert not same_bits(hif8_round(xt, rounding="hybrid", seed=12).numpy(), hr).all()


def test_hybrid_rounding_is_unbiased():
    # 100 (2-bit band: neighbours 96, 112), 3e-3 (1-bit band: 1.5 * 2^-9, 2^-8), 3e-6 (denormal: 2^-19, 2^-18):
    # the mean of SR equals x within 5 sigma
    cases = ((100.0, 96.0, 112.0), (3e-3, 1.5 * 2.0**-9, 2.0**-8), (3e-6, 2.0**-19, 2.0**-18))
    for v, lo, hi in cases:
        v = float(np.float32(v))
        x = torch.full((400_000,), v, dtype=torch.float32)
        r = hif8_round(x, rounding="hybrid", seed=3).double()
        assert set(torch.unique(r).tolist()) == {lo, hi}
        p = (v - lo) / (hi - lo)
        sigma = (hi - lo) * math.sqrt(p * (1 - p) / x.numel())
        assert abs(r.mean().item() - v) < 5 * sigma
