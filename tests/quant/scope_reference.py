"""Single-process references for the HiF8 amax scopes (used by test_hif8_scopes.py).

`segmented_reference(model, plan, ...)` runs the one-process model with a recipe that quantizes every tensor in
the pieces a rank of `plan` holds, each piece with its own amax (what `precision.amax_scope=local` does on that
rank), so it must equal the multi-process run:

- ssp2 (CP = SSP 2): activations (linear x and dy, Q/K/V of sparse blocks) split by the rank owning each token
  in the block's layout; Q/K/V of full blocks split by head chunk (after the Ulysses all-to-all a rank holds
  all tokens of h/2 heads); cross-attention runs once per rank's queries with its own text K/V projection, so
  each rank's partial gradient of the text K/V is quantized on its own, as on the ranks.
- tp2: W rows (column-parallel) or columns (row-parallel), dy columns (column-parallel), x columns
  (row-parallel) and Q/K/V heads split in TP halves; x of column-parallel and dy of row-parallel are whole.
"""
from __future__ import annotations

import types

import torch

from osp_megatron.quant.hif8_kernels import qdq_from_amax
from osp_megatron.quant.modules import assign_hif8_keys
from osp_megatron.quant.recipes import HiF8CurrentScaling, autocast
from osp_megatron.skiparse import LayoutGeometry, plan_blocks
from osp_megatron.skiparse.layouts import positions

COLUMN = ("linear_q", "linear_k", "linear_v", "linear_fc1")


def _along(x: torch.Tensor, dim: int, parts: int) -> torch.Tensor:
    """Owner ids [1, .., n, .., 1] of `parts` contiguous chunks along x's dim."""
    n = x.shape[dim]
    shape = [1] * x.dim()
    shape[dim] = n
    return (torch.arange(n) // (n // parts)).view(shape)


def segmented_qdq(x: torch.Tensor, owner, scale_max: float) -> torch.Tensor:
    if owner is None:
        return qdq_from_amax(x, x.detach().abs().amax().float(), scale_max)
    owner = owner.expand_as(x)
    y = torch.empty_like(x)
    for r in owner.unique():
        m = owner == r
        piece = x[m]
        y[m] = qdq_from_amax(piece, piece.detach().abs().amax().float(), scale_max)
    return y


class SegmentedCurrentScaling(HiF8CurrentScaling):
    """HiF8CurrentScaling whose every tensor is quantized in pieces: owner_fn(x, role, key) -> owner ids
    broadcastable to x, or None (one piece)."""

    def __init__(self, owner_fn):
        super().__init__()
        self.owner_fn = owner_fn

    def quantize(self, x, role, key=None, tp_group=None):
        backward = role in ("grad_output", "grad_qkv")
        return segmented_qdq(x, self.owner_fn(x, role, key), self.scale_max_bwd if backward else self.scale_max_fwd)


def _row_owners(model, grid, ratio, ssp):
    """Per block: owner rank of every row [S, G] of the block's single-process layout (b = 1)."""
    _, steps, _ = plan_blocks(model.schedule, True)
    geom = LayoutGeometry(grid, ratio, ssp, 1)
    owners = []
    for blk, multi in zip(model.blocks, steps):
        owner_of = torch.full((geom.num_tokens,), -1, dtype=torch.long)
        for r in range(ssp):
            pos = geom.positions(multi.layout, r, 0).reshape(-1)
            owner_of[pos[pos >= 0]] = r
        single = positions(grid, ratio, blk.step.layout)
        assert (single >= 0).all() and (owner_of >= 0).all(), "use a grid without padding"
        owners.append(owner_of[single])
    return owners


def ssp_owner_fn(model, grid, ratio, ssp):
    rows = _row_owners(model, grid, ratio, ssp)

    def owner(x, role, key):
        if isinstance(key, tuple):  # Q/K/V quantizer: (attn<i> | xattn<i>, q | k | v)
            name = key[0]
            if name.startswith("xattn"):
                return None  # cross-attention is run per rank's queries (patched forward)
            i = int(name[len("attn"):])
            if model.blocks[i].kind == "full":
                return _along(x, 2, ssp)  # [S, b, h, d]: head chunks after Ulysses
            return rows[i][:, :, None, None]
        if role == "weight" or ".cross_attention.linear_k" in key or ".cross_attention.linear_v" in key:
            return None
        i = int(key.split(".")[1])
        return rows[i][:, :, None]  # x or dy [S, G*b, C]

    return owner


def tp_owner_fn(tp):
    def owner(x, role, key):
        if isinstance(key, tuple):
            return _along(x, 2, tp)  # heads
        column = key.rsplit(".", 1)[1] in COLUMN
        if role == "weight":
            return _along(x, 0 if column else 1, tp)
        if role == "input":
            return None if column else _along(x, x.dim() - 1, tp)
        return _along(x, x.dim() - 1, tp) if column else None

    return owner


def _per_rank_cross_attention(owners_flat):
    """CrossAttention.forward run once per rank's queries (each with its own text K/V projection)."""

    def forward(self, x, text, classes):
        q = self.q_norm(self._proj(self.linear_q, x))
        s, gb = q.shape[0], q.shape[1]
        b = gb // classes
        h, d = self.heads, self.head_dim
        q = q.view(s, classes, b, h, d).permute(2, 1, 0, 3, 4).reshape(b, classes * s, h, d)
        owner = owners_flat[self.layer_number]
        o = torch.zeros_like(q)
        for r in owner.unique():
            idx = (owner == r).nonzero().squeeze(1)
            k = self.k_norm(self._proj(self.linear_k, text)).view(-1, b, h, d).transpose(0, 1)
            v = self._proj(self.linear_v, text).view(-1, b, h, d).transpose(0, 1)
            q_r, k, v = self.qkv_quantizer(q[:, idx].contiguous(), k.contiguous(), v.contiguous())
            o = o.index_copy(1, idx, self.core_attention(q_r, k, v))
        o = o.view(b, classes, s, h, d).permute(2, 1, 0, 3, 4).reshape(s, gb, h * d)
        return self._proj(self.linear_proj, o)

    return forward


def run(model, x, t, text, target, recipe):
    """velocity, loss, grads (global names) of one HiF8 forward / backward."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), autocast(recipe=recipe):
        velocity = model(x, t, text)
    with autocast(recipe=recipe):
        loss = model(x, t, text, target=target)
    loss.backward()
    grads = {model.global_name(n): p.grad.clone() for n, p in model.named_parameters()}
    return {"velocity": velocity, "loss": loss.detach(), "grads": grads}


def segmented_reference(model, plan, grid, ratio, x, t, text, target):
    assign_hif8_keys(model)
    if plan == "tp2":
        return run(model, x, t, text, target, SegmentedCurrentScaling(tp_owner_fn(2)))
    owner_fn = ssp_owner_fn(model, grid, ratio, 2)
    rows = _row_owners(model, grid, ratio, 2)
    flat = [r.t().reshape(-1) for r in rows]  # query order of cross-attention: class-major [G * S] (b = 1)
    for blk in model.blocks:
        blk.cross_attention.layer_number = blk.layer_number
        blk.cross_attention.forward = types.MethodType(_per_rank_cross_attention(flat), blk.cross_attention)
    try:
        return run(model, x, t, text, target, SegmentedCurrentScaling(owner_fn))
    finally:
        for blk in model.blocks:
            del blk.cross_attention.forward
