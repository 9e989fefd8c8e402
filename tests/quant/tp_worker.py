"""One rank of the HiF8 TP2-vs-TP1 check (launched by test_hif8_tp.py): python tp_worker.py RANK WORLD PORT.

Each HiF8 megatron layer runs with TP=2 (with and without sequence parallelism). With amax_scope=tp it is compared
with the single-process HiF8 linear on the gathered full weights: outputs and gradients within fp32
summation-order noise, and the quantized operands of every TP shard bit-identical to the slices of the TP=1
quantized tensor. With amax_scope=local (OSP-Next) it equals a single-process computation that quantizes each
rank's own shards with their own amax. Bias gradients are sums of the quantized dy in both. Exits non-zero with
a message naming the mismatch.
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    err = rel_err(got, want)
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol}")


def check_local_scope(col, row, sp, gather, recipe, qdq, x_full, x_row_full, dy_col_full, dy_row_full, rank, world):
    """amax_scope=local: each rank quantizes its own shards (x, W, dy) with their own amax; the single-process
    reference below does the same per shard and combines the shards' GEMMs as TP does."""
    from osp_megatron.quant.recipes import autocast

    col.amax_scope = row.amax_scope = "local"
    for m in (col, row):
        for prm in m.parameters():
            prm.grad = None
    chunks = lambda t, dim: t.chunk(world, dim)  # noqa: E731
    # column-parallel: y_r = Q(x_r) Q(W_r)^T + b_r, dy_r quantized per rank; x_r is the SP chunk (or all of x)
    w1 = gather(col.weight.detach(), 0)
    b1 = gather(col.bias.detach(), 0)
    x_in = (chunks(x_full, 0)[rank] if sp else x_full).clone().requires_grad_(True)
    with autocast(recipe=recipe):
        y, _ = col(x_in)
    y.backward(chunks(dy_col_full, 2)[rank])
    x_parts = chunks(x_full, 0) if sp else [x_full]
    xq = torch.cat([qdq(p, 15.0) for p in x_parts], 0)
    wq, bq = chunks(w1, 0), chunks(b1, 0)
    wq = [qdq(w, 15.0) for w in wq]
    gq = [qdq(g, 224.0) for g in chunks(dy_col_full, 2)]
    y_ref = torch.cat([torch.matmul(xq, w.t()) + b for w, b in zip(wq, bq)], 2)
    tag = f"local column sp={sp}"
    check(f"{tag} output", gather(y.detach(), 2), y_ref)
    dgrad = sum(g.matmul(w) for g, w in zip(gq, wq))
    check(f"{tag} dgrad", gather(x_in.grad, 0) if sp else x_in.grad, dgrad)
    check(f"{tag} wgrad", col.weight.grad, gq[rank].reshape(-1, gq[rank].shape[-1]).t() @ xq.reshape(-1, xq.shape[-1]))
    check(f"{tag} bias grad", col.bias.grad, gq[rank].reshape(-1, gq[rank].shape[-1]).sum(0))
    # row-parallel: y = sum_r Q(x_r) Q(W_r)^T + b; dy replicated (SP: the bias sees this rank's chunk of it)
    w2 = gather(row.weight.detach(), 1)
    x_in = chunks(x_row_full, 2)[rank].clone().requires_grad_(True)
    with autocast(recipe=recipe):
        y, _ = row(x_in)
    y.backward(chunks(dy_row_full, 0)[rank] if sp else dy_row_full)
    xq = [qdq(p, 15.0) for p in chunks(x_row_full, 2)]
    wq = [qdq(w, 15.0) for w in chunks(w2, 1)]
    y_ref = sum(torch.matmul(a, w.t()) for a, w in zip(xq, wq)) + row.bias.detach()
    tag = f"local row sp={sp}"
    check(f"{tag} output", gather(y.detach(), 0) if sp else y.detach(), y_ref)
    gq = qdq(dy_row_full, 224.0)
    check(f"{tag} dgrad", x_in.grad, gq.matmul(wq[rank]))
    check(f"{tag} wgrad", row.weight.grad, gq.reshape(-1, gq.shape[-1]).t() @ xq[rank].reshape(-1, xq[rank].shape[-1]))
    g_bias = qdq(chunks(dy_row_full, 0)[rank], 224.0) if sp else gq
    check(f"{tag} bias grad", row.bias.grad, g_bias.reshape(-1, g_bias.shape[-1]).sum(0))
    # the local scope is really local: rank 0's weight shard (the small rows) quantizes differently
    if rank == 0 and torch.equal(qdq(w1, 15.0).chunk(world, 0)[0], qdq(w1.chunk(world, 0)[0], 15.0)):
        raise AssertionError("test data too weak: a shard's local amax equals the global one")


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from osp_megatron import cpu_shims

    cpu_shims.apply()
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    from osp_megatron.quant.hif8 import hif8_qdq_reference as qdq
    from osp_megatron.quant.modules import HiF8ColumnParallelLinear, HiF8RowParallelLinear, hif8_linear
    from osp_megatron.quant.recipes import HiF8CurrentScaling, autocast

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    tp = parallel_state.get_tensor_model_parallel_group()
    s, b, k, n = 8, 2, 32, 48
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(s, b, k, generator=g) * torch.linspace(0.1, 4.0, k)  # column shards: different amax
    x_row_full = torch.randn(s, b, n, generator=g) * torch.linspace(4.0, 0.1, n)
    dy_col_full = torch.randn(s, b, n, generator=g) * torch.linspace(1e-3, 1e-2, n)
    dy_row_full = torch.randn(s, b, k, generator=g) * 1e-3

    def init(w):
        return torch.nn.init.normal_(w, std=0.05)

    recipe = HiF8CurrentScaling()

    # -- quantized operands: shard with the TP-reduced amax == slice of the full quantized tensor ------------
    w_full = torch.randn(n, k, generator=g) * torch.linspace(0.01, 1.0, n)[:, None]
    shard = w_full.chunk(world, 0)[rank]
    q_tp = recipe.quantize(shard, "weight", tp_group=tp)
    q_one = recipe.quantize(w_full, "weight").chunk(world, 0)[rank]
    if not torch.equal(q_tp, q_one):
        raise AssertionError("quantized weight shard differs from the slice of the TP=1 quantized weight")
    if rank == 0 and torch.equal(recipe.quantize(shard, "weight"), q_one):  # rank 0 holds the small rows
        raise AssertionError("test data too weak: a shard's local amax already equals the global one")

    for sp in (False, True):
        cfg = ModelParallelConfig(
            tensor_model_parallel_size=world, sequence_parallel=sp, use_cpu_initialization=True,
            params_dtype=torch.float32,
        )
        torch.manual_seed(1)
        col = HiF8ColumnParallelLinear(k, n, config=cfg, init_method=init, bias=True, gather_output=False)
        row = HiF8RowParallelLinear(
            n, k, config=cfg, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False
        )
        with torch.no_grad():
            col.bias.copy_(torch.linspace(-1, 1, n).chunk(world)[rank])
            row.bias.copy_(torch.linspace(1, -1, k))
            col.weight.mul_(torch.linspace(0.2, 2.0, n).chunk(world)[rank][:, None])  # shards: different amax
            row.weight.mul_(torch.linspace(2.0, 0.2, n).chunk(world)[rank][None, :])
        col.amax_scope = row.amax_scope = "tp"  # every TP shard scaled like the whole tensor

        def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
            parts = [torch.empty_like(t) for _ in range(world)]
            torch.distributed.all_gather(parts, t.contiguous(), group=tp)
            return torch.cat(parts, dim)

        # column-parallel: x replicated (or sequence-sharded under SP), W rows split, output columns split
        x_in = (x_full.chunk(world, 0)[rank] if sp else x_full).clone().requires_grad_(True)
        with autocast(recipe=recipe):
            y, bias_out = col(x_in)
        assert bias_out is None
        y.backward(dy_col_full.chunk(world, 2)[rank])
        w1 = gather(col.weight.detach(), 0).requires_grad_(True)
        b1 = gather(col.bias.detach(), 0).requires_grad_(True)
        x_ref = x_full.clone().requires_grad_(True)
        with autocast(recipe=recipe):
            y_ref = hif8_linear(x_ref, w1, b1)
        y_ref.backward(dy_col_full)
        tag = f"column sp={sp}"
        check(f"{tag} output", gather(y.detach(), 2), y_ref.detach())
        check(f"{tag} dgrad", gather(x_in.grad, 0) if sp else x_in.grad, x_ref.grad)
        check(f"{tag} wgrad", gather(col.weight.grad, 0), w1.grad)
        check(f"{tag} bias grad", gather(col.bias.grad, 0), b1.grad)

        # row-parallel: x columns split, W columns split, output all-reduced (or reduce-scattered under SP)
        x_in = x_row_full.chunk(world, 2)[rank].clone().requires_grad_(True)
        with autocast(recipe=recipe):
            y, _ = row(x_in)
        y.backward(dy_row_full.chunk(world, 0)[rank] if sp else dy_row_full)
        w2 = gather(row.weight.detach(), 1).requires_grad_(True)
        b2 = row.bias.detach().clone().requires_grad_(True)
        x_ref = x_row_full.clone().requires_grad_(True)
        with autocast(recipe=recipe):  # the bias grad is the sum of the quantized dy in both
            y_ref = hif8_linear(x_ref, w2, b2)
        y_ref.backward(dy_row_full)
        tag = f"row sp={sp}"
        check(f"{tag} output", gather(y.detach(), 0) if sp else y.detach(), y_ref.detach())
        check(f"{tag} dgrad", gather(x_in.grad, 2), x_ref.grad)
        check(f"{tag} wgrad", gather(row.weight.grad, 1), w2.grad)
        bias_grad = row.bias.grad
        if sp:  # megatron leaves the SP bias grad partial per rank (its DDP all-reduces sequence_parallel params)
            torch.distributed.all_reduce(bias_grad, group=tp)
        check(f"{tag} bias grad", bias_grad, b2.grad)

        check_local_scope(col, row, sp, gather, recipe, qdq, x_full, x_row_full, dy_col_full, dy_row_full, rank, world)

    # without a recipe the subclasses are megatron's layers
    y_plain, _ = col(x_full.chunk(world, 0)[rank])
    if not torch.isfinite(y_plain).all():
        raise AssertionError("plain megatron path broken")
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    print(f"rank {rank} OK")


if __name__ == "__main__":
    main()
