"""Padding-free Skiparse attention with an injected kernel equals dense attention under the class mask."""
import math

import pytest
import torch

from osp_megatron import skiparse as sk
from osp_megatron.skiparse import AttentionProblems, SkiparseAttention, grouped_attention


class CountingKernel:
    """Plain softmax attention [B, S, h, d] (fp64) that records the shapes it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v):
        self.calls.append(tuple(q.shape))
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)

    def rows(self):
        return sum(b * s for b, s, _, _ in self.calls)


def _class_of(grid, ratio, layout):
    t, h, w = grid
    hh = torch.arange(h)[:, None].expand(h, w)
    ww = torch.arange(w)[None, :].expand(h, w)
    if layout == "token":
        cls = (hh % ratio) * ratio + ww % ratio
    elif layout == "group":
        cls = ((hh // ratio) % ratio) * ratio + (ww // ratio) % ratio
    else:
        cls = torch.zeros(h, w, dtype=torch.long)
    return cls.reshape(1, h * w).expand(t, h * w).reshape(-1)


def _masked_reference(q, k, v, grid, ratio, layout):
    """Dense attention over the raster sequence [N, b, h, d] with the class-equality mask."""
    cls = _class_of(grid, ratio, layout)
    mask = cls[:, None] == cls[None, :]
    s = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,kbhd->qbhd", s.softmax(-1), v)


def _qkv(grid, b=2, h=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2]
    return [torch.randn(n, b, h, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def _grads(out, inputs, seed=1):
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, go)


@pytest.mark.parametrize("grid,ratio", [((2, 9, 6), 2), ((1, 5, 7), 4), ((2, 8, 8), 2)])
@pytest.mark.parametrize("layout", ["token", "group"])
def test_in_layout_and_raster_ops_equal_the_masked_reference(grid, ratio, layout):
    q, k, v = _qkv(grid)
    want = _masked_reference(q, k, v, grid, ratio, layout)
    want_grads = _grads(want, (q, k, v))
    n, b = q.shape[:2]

    # raster in / raster out
    kernel = CountingKernel()
    got = SkiparseAttention(kernel)(q, k, v, grid, ratio, layout)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert kernel.rows() == n * b  # exactly the valid tokens reach the kernel, no padding
    for a, w in zip(_grads(got, (q, k, v)), want_grads):
        assert torch.allclose(a, w, rtol=1e-10, atol=1e-12)

    # the model's path: q/k/v already in the (padded) layout, problems from its positions
    kernel = CountingKernel()
    ql, kl, vl = (sk.to_layout(t, grid, ratio, layout) for t in (q, k, v))
    problems = AttentionProblems.from_positions(sk.positions(grid, ratio, layout), "sparse")
    assert problems.classes == ratio * ratio
    out = grouped_attention(ql, kl, vl, problems, kernel)
    assert kernel.rows() == n * b
    valid = sk.valid_mask(grid, ratio, layout)  # [S, C]
    assert (out.view(out.shape[0], ratio * ratio, b, -1)[~valid] == 0).all()  # padding slots come back zero
    got = sk.from_layout(out, grid, ratio, layout)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    for a, w in zip(_grads(got, (q, k, v)), want_grads):
        assert torch.allclose(a, w, rtol=1e-10, atol=1e-12)


def test_full_attention_on_a_padded_layout_skips_padding():
    grid, ratio = (2, 9, 6), 2
    q, k, v = _qkv(grid)
    n, b = q.shape[:2]
    want = _masked_reference(q, k, v, grid, ratio, "raster")  # plain dense attention
    kernel = CountingKernel()
    ql, kl, vl = (sk.to_layout(t, grid, ratio, "token") for t in (q, k, v))
    problems = AttentionProblems.from_positions(sk.positions(grid, ratio, "token"), "full")
    got = sk.from_layout(grouped_attention(ql, kl, vl, problems, kernel), grid, ratio, "token")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert kernel.calls == [(b, n, 3, 8)]  # one problem per sample over its valid tokens only
    # every slot valid: no gather at all, one dense call per sample
    kernel = CountingKernel()
    dense = AttentionProblems.from_positions(sk.positions(grid, ratio, "raster"), "full")
    assert dense.groups is None
    assert torch.allclose(grouped_attention(q, k, v, dense, kernel), want, rtol=1e-10, atol=1e-12)
    assert kernel.calls == [(b, n, 3, 8)]


def test_row_cache_lives_on_the_object():
    grid, ratio = (1, 5, 7), 2
    q, k, v = _qkv(grid)
    op = SkiparseAttention(CountingKernel())
    op(q, k, v, grid, ratio, "token")
    op(q, k, v, grid, ratio, "group")
    assert len(op._rows) == 2 and SkiparseAttention(CountingKernel())._rows == {}
    with pytest.raises(ValueError, match="attention kind"):
        AttentionProblems.from_positions(sk.positions(grid, ratio, "token"), "token")
