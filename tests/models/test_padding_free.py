"""Padding-free sparse blocks (`model.padding_free`): the packed path equals the padded one -- outputs, loss and
every gradient -- and no padding slot reaches a per-token op when packed."""
import math

import pytest
import torch

from osp_megatron import skiparse as sk
from osp_megatron.config import ConfigError, ModelConfig, ParallelConfig
from osp_megatron.models import attention as attention_mod
from osp_megatron.models import block as block_mod
from osp_megatron.models import build_model
from osp_megatron.models.attention import SequenceContext
from osp_megatron.models.transformer_config import make_osp_config
from osp_megatron.parallel import ContextParallel, ParallelState, TokenPlacement


# fp64 model, but the per-sample modulation vectors are fp32 (block.py: `.float()`): their gradients are fp32 sums
# over the rows, in a different order with and without the padding rows (which contribute exact zeros)
GRAD_TOL = 1e-6


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _model(schedule="dual_end", ratio=2, padding_free=None, layers=8, num_full=4):
    mc = ModelConfig(size="tiny", schedule=schedule, sparse_ratio=ratio, num_layers=layers, num_full_blocks=num_full,
                     padding_free=padding_free)
    torch.manual_seed(0)
    return build_model(mc, ParallelState.single(), dtype=torch.float64, device="cpu")


def _inputs(grid, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    t_, h, w = grid
    x = torch.randn(batch, 16, t_, 2 * h, 2 * w, generator=g, dtype=torch.float64)
    t = torch.tensor([812.0, 37.0, 400.0][:batch], dtype=torch.float64)  # different conditioning per sample
    text = torch.randn(batch, 5, 32, generator=g, dtype=torch.float64)
    target = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, t, text, target


def _run(model, inputs):
    x, t, text, target = inputs
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    loss = model(x, t, text, target=target)
    loss.backward()
    with torch.no_grad():
        out = model(x, t, text)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("schedule,ratio,grid", [
    ("dual_end", 2, (2, 6, 10)),   # 480P-like: H 6 -> 8, W 10 -> 12 with P = 2
    ("dual_end", 2, (1, 7, 5)),    # odd H and W
    ("uniform", 2, (2, 6, 10)),    # the last blocks sparse: the final layout is packed
    ("dual_end", 4, (1, 9, 18)),   # P = 4: H 9 -> 16, W 18 -> 32
])
def test_packed_model_equals_padded_model(schedule, ratio, grid):
    packed, padded = _model(schedule, ratio, None), _model(schedule, ratio, False)
    seq_p = packed.sequence_for(grid, torch.device("cpu"))
    seq_d = padded.sequence_for(grid, torch.device("cpu"))
    assert seq_p.placement.packed and not seq_d.placement.packed
    inputs = _inputs(grid)
    out_p, loss_p, gx_p, g_p = _run(packed, inputs)
    out_d, loss_d, gx_d, g_d = _run(padded, inputs)
    assert _rel(out_p, out_d) <= 1e-12
    assert abs(loss_p.item() - loss_d.item()) <= 1e-12 * abs(loss_d.item())
    assert _rel(gx_p, gx_d) <= 1e-12
    assert g_p.keys() == g_d.keys() and len(g_p) == len(list(packed.parameters()))
    for name in g_d:
        assert _rel(g_p[name], g_d[name]) <= GRAD_TOL, name
    # the two samples saw different conditioning: the outputs differ per sample
    assert _rel(out_p[0], out_p[1]) > 1e-3


def _contexts(model, grid):
    out = []
    for padding_free in (True, False):
        pl = TokenPlacement(grid, model.config.sparse_ratio, model.schedule, ParallelState(), padding_free=padding_free)
        out.append(SequenceContext(pl, model.config.head_dim, model.config.rope_theta))
    return out


def test_packed_sparse_blocks_equal_padded_blocks_forward_and_grads():
    """One run of sparse blocks (token, group) on its own: entered from raster, left to raster."""
    model = _model("dual_end", 2, None)
    grid, b = (2, 6, 10), 2
    n, c = math.prod(grid), model.config.hidden_size
    run = [blk for blk in model.blocks if blk.kind != "full"][:2]
    assert [blk.kind for blk in run] == ["token", "group"] and run[0].step.switch_from == "raster"
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(n, b, c, generator=g, dtype=torch.float64)
    e0 = torch.randn(b, 6, c, generator=g, dtype=torch.float64)
    txt0 = torch.randn(7, b, c, generator=g, dtype=torch.float64)
    cot = torch.randn(n, b, c, generator=g, dtype=torch.float64)
    results = []
    for seq in _contexts(model, grid):
        model.zero_grad(set_to_none=True)
        x, e, txt = (v.clone().requires_grad_(True) for v in (x0, e0, txt0))
        y = x
        for blk in run:
            y = blk(y, e, txt, seq)
        pl = seq.placement
        if pl.packed:
            assert y.shape == (n, b, c)  # packed: the real tokens only
            y = pl.switch(y, "group", "raster")
        else:
            assert y.shape[0] * y.shape[1] > n * b  # padded layout
            y = pl.switch(y, "group", "raster")
        (y * cot).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((y.detach(), x.grad, e.grad, txt.grad, grads))
    (yp, gxp, gep, gtp, gp), (yd, gxd, ged, gtd, gd) = results
    assert _rel(yp, yd) <= 1e-12
    assert _rel(gxp, gxd) <= 1e-12 and _rel(gtp, gtd) <= 1e-12
    assert _rel(gep, ged) <= GRAD_TOL
    assert gp.keys() == gd.keys() and any(k.startswith("blocks.") for k in gp)
    for name in gd:
        assert _rel(gp[name], gd[name]) <= GRAD_TOL, name


class _RowCounter:
    """Rows (tokens x samples) seen by every per-token op of the sparse blocks."""

    def __init__(self, model, monkeypatch):
        self.rows = {}
        self.current = None
        for i, blk in enumerate(model.blocks):
            if blk.kind == "full":
                continue
            blk.register_forward_pre_hook(self._enter(i))
            for name, mod in blk.named_modules():
                if name.endswith(("linear_q", "linear_k", "linear_v", "linear_proj", "linear_fc1", "linear_fc2",
                                  "q_norm", "k_norm")) and not name.startswith("cross_attention.linear_k") \
                        and not name.startswith("cross_attention.linear_v") \
                        and not name.startswith("cross_attention.k_norm"):
                    mod.register_forward_pre_hook(self._module(i, name))
        for fn in ("modulated_layernorm", "affine_layernorm", "gated_residual", "bias_gelu"):
            monkeypatch.setattr(block_mod, fn, self._function(fn, getattr(block_mod, fn)))
        monkeypatch.setattr(attention_mod, "apply_rope", self._function("apply_rope", attention_mod.apply_rope, 2))

    def _enter(self, i):
        def hook(module, args):
            self.current = i
        return hook

    def _record(self, name, x, tail):
        if self.current is not None:
            self.rows.setdefault((self.current, name), []).append(x.numel() // math.prod(x.shape[-tail:]))

    def _module(self, i, name):
        def hook(module, args):
            self._record(name, args[0], 1)
        return hook

    def _function(self, name, fn, tail=1):
        def wrapped(x, *args):
            self._record(name, x, tail)
            return fn(x, *args)
        return wrapped


@pytest.mark.parametrize("padding_free", [None, False])
def test_no_padding_row_enters_a_per_token_op_when_packed(padding_free, monkeypatch):
    model = _model("dual_end", 2, padding_free)
    grid, b = (2, 6, 10), 2
    counter = _RowCounter(model, monkeypatch)
    for blk in model.blocks:  # full blocks run on the raster sequence: they close the count
        if blk.kind == "full":
            blk.register_forward_pre_hook(lambda m, a: setattr(counter, "current", None))
    x, t, text, target = _inputs(grid, b)
    model(x, t, text, target=target).backward()
    sparse = [i for i, blk in enumerate(model.blocks) if blk.kind != "full"]
    ops = {name for _, name in counter.rows}
    assert {"modulated_layernorm", "affine_layernorm", "gated_residual", "bias_gelu", "apply_rope",
            "self_attention.linear_q", "self_attention.linear_k", "self_attention.linear_v", "self_attention.q_norm",
            "self_attention.k_norm",
            "self_attention.linear_proj", "cross_attention.linear_q", "cross_attention.q_norm",
            "cross_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"} == ops
    assert {i for i, _ in counter.rows} == set(sparse)
    seen = {r for counts in counter.rows.values() for r in counts}
    real = b * math.prod(grid)
    padded = b * math.prod(sk.padded_grid(grid, 2))
    assert padded > real
    assert seen == ({real} if padding_free is None else {padded})


def test_packed_layout_index_math():
    grid, ratio = (2, 6, 10), 2
    n = math.prod(grid)
    x = torch.randn(n, 3, 4)
    for layout in ("token", "group"):
        pk = sk.packed_layout(grid, ratio, layout)
        assert torch.equal(torch.sort(pk.positions).values, torch.arange(n))
        assert sum(m * c for m, c in pk.segments) == n
        # class by class, the valid slots of the padded layout in its sequence order
        y = sk.to_layout(x, grid, ratio, layout)  # [S, C*b, R]
        pos = sk.positions(grid, ratio, layout)
        v = y.view(y.shape[0], ratio * ratio, 3, 4)
        rows = torch.cat([v[pos[:, c] >= 0, c] for c in pk.classes])
        assert torch.equal(rows, x[pk.positions])
    tok, grp = sk.packed_layout(grid, ratio, "token"), sk.packed_layout(grid, ratio, "group")
    assert torch.equal(x[tok.positions][grp.index_from(tok)], x[grp.positions])
    assert [n_ for _, n_ in grp.segments] == sorted(n_ for _, n_ in grp.segments)  # equal lengths adjacent


def test_packed_attention_segments_equal_grouped_attention():
    grid, ratio, b, h, d = (2, 6, 10), 2, 2, 2, 4
    g = torch.Generator().manual_seed(0)
    kernel = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    for layout in ("token", "group"):
        pos = sk.positions(grid, ratio, layout)
        s, c = pos.shape
        q, k, v = (torch.randn(s, c * b, h, d, generator=g, dtype=torch.float64) for _ in range(3))
        want = sk.grouped_attention(q, k, v, sk.AttentionProblems.from_positions(pos, "sparse"), kernel)
        pk = sk.packed_layout(grid, ratio, layout)
        sel = lambda t: torch.cat([t.view(s, c, b, h, d)[pos[:, cl] >= 0, cl] for cl in pk.classes])  # noqa: E731
        got = sk.grouped_attention(sel(q), sel(k), sel(v), sk.AttentionProblems.from_segments(pk.segments), kernel)
        assert torch.allclose(got, sel(want), rtol=0, atol=1e-12)


def test_padding_free_config_is_validated():
    mc = ModelConfig(size="tiny", padding_free=True)
    with pytest.raises(ConfigError, match="model.padding_free=true with parallel.sequence_parallel"):
        make_osp_config(mc, ParallelConfig(tensor_parallel=2, sequence_parallel=True))
    assert make_osp_config(mc, ParallelConfig(ssp=2)).padding_free is True
    assert make_osp_config(ModelConfig(size="tiny"), ParallelConfig(ssp=2)).padding_free is None  # auto
    assert make_osp_config(ModelConfig(size="tiny", padding_free=False)).padding_free is False
    sched = sk.block_schedule(8, "dual_end", 4)
    cp2 = ParallelState(cp=ContextParallel(ssp=2))
    # auto: a split sequence keeps the padded shards; true: packed there too
    assert not TokenPlacement((2, 6, 10), 2, sched, cp2, padding_free=None).packed
    pl = TokenPlacement((2, 6, 10), 2, sched, cp2, padding_free=True)
    assert pl.layout_native and pl.packed and pl.classes_per_rank("token") == 1
    # an unpadded grid (H, W multiples of P^2): the padded layouts hold no padding, nothing to pack
    pl = TokenPlacement((2, 8, 12), 2, sched, ParallelState(), padding_free=True)
    assert not pl.packed and pl.classes_per_rank("token") == 4
    assert TokenPlacement((2, 8, 10), 2, sched, ParallelState(), padding_free=True).packed
