"""HiF8 as OSP-Next runs it, in one process: the Q/K/V quantizer sits on the kernel inputs of self- *and*
cross-attention (forward Q_fwd, backward Q_bwd of dQ/dK/dV), and bias gradients are sums of the quantized dy,
for row-parallel linears too."""
import pytest
import torch
from megatron.core.model_parallel_config import ModelParallelConfig

from osp_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig
from osp_megatron.models import build_model
from osp_megatron.models.attention import QKVIdentity
from osp_megatron.models.transformer_config import make_osp_config
from osp_megatron.parallel import ParallelState
from osp_megatron.quant.hif8 import hif8_qdq_reference as qdq
from osp_megatron.quant.modules import HiF8QKV, HiF8RowParallelLinear
from osp_megatron.quant.recipes import HiF8CurrentScaling, HiF8DelayedScaling, autocast


def _model(quantize_attention=True):
    mc = ModelConfig(size="tiny", schedule="dual_end", num_full_blocks=4, attention_backend="math")
    cfg = make_osp_config(mc, ParallelConfig(), PrecisionConfig(dtype="fp32", recipe="hif8_current",
                                                                quantize_attention=quantize_attention), torch.float32)
    torch.manual_seed(0)
    return build_model(cfg, parallel=ParallelState.single(), device="cpu")


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 5, 32, generator=g),
            torch.randn(1, 16, 2, 8, 8, generator=g))


def _capture(quantizer):
    """Record the quantizer's inputs / outputs and the gradients arriving at each (tensor hooks)."""
    seen = {"in": [], "out": [], "grad_in": {}, "grad_out": {}}

    def hook(module, args, output):
        seen["in"], seen["out"] = [a.detach() for a in args], [o.detach() for o in output]
        for i, (a, o) in enumerate(zip(args, output)):
            a.register_hook(lambda g, i=i: seen["grad_in"].__setitem__(i, g))
            o.register_hook(lambda g, i=i: seen["grad_out"].__setitem__(i, g))

    return seen, quantizer.register_forward_hook(hook)


@pytest.mark.parametrize("which", ["cross_attention", "self_attention"])
def test_qkv_quantizer_on_the_kernel_inputs_forward_and_backward(which):
    model = _model()
    x, t, text, target = _inputs()
    blocks = [model.blocks[1], model.blocks[4]]  # a full block and a sparse one
    for blk in model.blocks:
        quantizer = getattr(blk, which).qkv_quantizer
        assert isinstance(quantizer, HiF8QKV)
        assert quantizer.key == f"{'x' if which == 'cross_attention' else ''}attn{blk.layer_number}"
    records = []
    for blk in blocks:
        records.append(_capture(getattr(blk, which).qkv_quantizer))
    with autocast(recipe=HiF8CurrentScaling()):
        model(x, t, text, target=target).backward()
    for seen, handle in records:
        handle.remove()
        for i in range(3):  # q, k, v
            pre, post = seen["in"][i], seen["out"][i]
            assert torch.equal(post, qdq(pre, 15.0))  # forward: Q_fwd (scale 15 / amax)
            assert not torch.equal(post, pre)
            d_kernel, d_pre = seen["grad_out"][i], seen["grad_in"][i]
            assert torch.equal(d_pre, qdq(d_kernel, 224.0))  # backward: Q_bwd of dQ / dK / dV (224 / amax)
            assert not torch.equal(d_pre, d_kernel)


def test_quantize_attention_false_leaves_cross_attention_unquantized():
    model = _model(quantize_attention=False)
    assert all(isinstance(b.cross_attention.qkv_quantizer, QKVIdentity) for b in model.blocks)
    x, t, text, _ = _inputs()
    quantized = _model(quantize_attention=True)
    with torch.no_grad(), autocast(recipe=HiF8CurrentScaling()):
        plain_attn, q_attn = model(x, t, text), quantized(x, t, text)
    assert not torch.allclose(plain_attn, q_attn, rtol=1e-4)  # same weights (seed 0), only Q/K/V quantization differs


def _row_linear():
    ps = ParallelState.single()
    cfg = ModelParallelConfig(tensor_model_parallel_size=1, use_cpu_initialization=True, params_dtype=torch.float32)
    torch.manual_seed(2)
    return HiF8RowParallelLinear(16, 24, config=cfg, init_method=lambda w: torch.nn.init.normal_(w, std=0.1),
                                 bias=True, input_is_parallel=True, skip_bias_add=False, tp_group=ps.tp_group)


@pytest.mark.parametrize("recipe", [HiF8CurrentScaling(), HiF8CurrentScaling(backward_rounding="hybrid", seed=5),
                                    HiF8DelayedScaling(amax_history_len=2)], ids=["ta", "hybrid", "delayed"])
def test_row_parallel_bias_grad_is_the_sum_of_the_quantized_dy(recipe):
    row = _row_linear()
    x = torch.eye(16).reshape(2, 8, 16)  # one-hot rows: wgrad = g_q^T x_q shows the GEMM's own g_q
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(2, 8, 24, generator=g) * torch.linspace(1e-3, 1.0, 24)
    for _ in range(2):  # delayed scaling: a second step quantizes with the recorded scale
        row.weight.grad = row.bias.grad = None
        with autocast(recipe=recipe):
            y, bias_out = row(x)
        assert bias_out is None
        y.backward(dy)
    g_gemm = row.weight.grad.t().contiguous()  # [16, 24] = g_q reshaped to rows
    # the bias sees the very g_q the GEMM used (hybrid rounding: the same stochastic draw)
    torch.testing.assert_close(row.bias.grad, g_gemm.sum(0), rtol=1e-6, atol=0)
    assert not torch.allclose(row.bias.grad, dy.reshape(-1, 24).sum(0), rtol=1e-4)
    if isinstance(recipe, HiF8CurrentScaling) and recipe.backward_rounding == "ta":
        assert torch.equal(row.bias.grad, qdq(dy.reshape(-1, 24), 224.0).sum(0))
