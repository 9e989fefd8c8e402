"""Native FP8 recipes (no TransformerEngine): E4M3 forward, E5M2 gradients (hybrid), current and delayed scaling.

On CPU the quantized linears run as fake quantization with torch's float8 casts; the `gpu` test checks that the
`torch._scaled_mm` path computes the same values."""
import pytest
import torch

from osp_megatron.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig, load_config
from osp_megatron.models import build_model
from osp_megatron.models.transformer_config import make_osp_config
from osp_megatron.parallel import ParallelState
from osp_megatron.quant.modules import HiF8ColumnParallelLinear, hif8_linear, use_scaled_mm
from osp_megatron.quant.recipes import (FP8CurrentScaling, FP8DelayedScaling, HiF8DelayedScaling, autocast,
                                       recipe_from_config, refresh_te_weight_caches)


def _fq(x, fmt, scale):
    dtype, fmax = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}[fmt]
    return (x.float() * scale).clamp(-fmax, fmax).to(dtype).float() / scale


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 2, 32, generator=g) * 3.0
    w = torch.randn(48, 32, generator=g) * 0.05
    b = torch.randn(48, generator=g)
    dy = torch.randn(16, 2, 48, generator=g) * 1e-3
    return x, w, b, dy


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_fp8_current_linear_equals_the_fake_quant_reference(fmt):
    x, w, b, dy = _data()
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    with autocast(recipe=FP8CurrentScaling(fp8_format=fmt)):
        y = hif8_linear(x, w, b)
    y.backward(dy)
    xq, wq = _fq(x.detach(), "e4m3", 448.0 / x.abs().max()), _fq(w.detach(), "e4m3", 448.0 / w.abs().max())
    g_fmt, g_max = ("e5m2", 57344.0) if fmt == "hybrid" else ("e4m3", 448.0)
    gq = _fq(dy, g_fmt, g_max / dy.abs().max())
    assert torch.equal(y.detach(), xq @ wq.t() + b.detach())
    assert torch.equal(x.grad, gq @ wq)
    assert torch.equal(w.grad, gq.reshape(-1, 48).t() @ xq.reshape(-1, 32))
    assert torch.equal(b.grad, gq.reshape(-1, 48).sum(0))
    plain = torch.nn.functional.linear(x.detach(), w.detach(), b.detach())
    assert 1e-4 < ((y.detach() - plain).norm() / plain.norm()).item() < 0.1  # FP8 rounding is really applied


def test_fp8_delayed_scaling_uses_the_previous_steps_amax():
    x, w, b, _ = _data(1)
    r = FP8DelayedScaling(amax_history_len=4)
    with autocast(recipe=r):
        y1 = hif8_linear(x, w, b, key="lin")
    assert torch.equal(y1, _fq(x, "e4m3", 1.0) @ _fq(w, "e4m3", 1.0).t() + b)  # first step: scale 1
    with autocast(recipe=r):
        y2 = hif8_linear(x * 0.5, w, b, key="lin")
    sx = torch.tensor(448.0) / x.abs().max()  # the amax recorded at step 1
    sw = torch.tensor(448.0) / w.abs().max()
    assert torch.equal(y2, _fq(x * 0.5, "e4m3", sx) @ _fq(w, "e4m3", sw).t() + b)
    assert r.slot("lin", "input").history.numel() == 4
    with pytest.raises(ValueError, match="key="):
        r.quantize(x, "input")


@pytest.mark.parametrize("recipe_cls", [FP8DelayedScaling, HiF8DelayedScaling])
def test_delayed_scaling_quantizes_the_same_dy_object_anew_at_the_next_step(recipe_cls):
    """A dy tensor handed in again at the next step (same object, same version) takes that step's scale: the reuse
    of a quantization within one backward must not reach across steps."""
    x, w, b, dy = _data(2)
    grads = {}
    for fresh in (False, True):
        r = recipe_cls()
        xg = x.clone().requires_grad_(True)
        for _ in range(2):
            xg.grad = None
            with autocast(recipe=r):
                y = hif8_linear(xg, w, b, key="lin")
            y.backward(dy.clone() if fresh else dy)
        grads[fresh] = xg.grad.clone()
        assert r.slot("lin", "grad_output").updates == 1  # the step-1 amax set the step-2 scale
    assert torch.equal(grads[False], grads[True])


def test_refresh_te_weight_caches_marks_every_linear_that_caches_fp8_weights():
    """megatron's TE linears keep their FP8 weight copy while `is_first_microbatch` is False; the trainer sets it
    again at each quantized step so that the copy follows the optimizer."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()))
    model[0].is_first_microbatch = False
    model[1][0].is_first_microbatch = False
    assert refresh_te_weight_caches(model) == 2
    assert model[0].is_first_microbatch is True and model[1][0].is_first_microbatch is True
    assert not hasattr(model[1][1], "is_first_microbatch")


def test_cpu_tensors_take_the_fake_quant_path():
    x, w, _, _ = _data()
    assert not use_scaled_mm(FP8CurrentScaling(), x, w)


def test_config_maps_fp8_recipes_to_native_or_te():
    cur = recipe_from_config(PrecisionConfig(recipe="fp8_current", fp8_format="e4m3", margin=1))
    assert isinstance(cur, FP8CurrentScaling) and (cur.fp8_format, cur.margin) == ("e4m3", 1)
    dl = recipe_from_config(PrecisionConfig(recipe="fp8_delayed", amax_history_len=8))
    assert isinstance(dl, FP8DelayedScaling) and dl.amax_history_len == 8
    mc = ModelConfig(size="tiny")
    with pytest.raises(ConfigError, match="fp8_block is a TransformerEngine"):
        make_osp_config(mc, ParallelConfig(), PrecisionConfig(recipe="fp8_block"))
    cfg = make_osp_config(mc, ParallelConfig(), PrecisionConfig(recipe="fp8_current", dtype="fp32"), torch.float32)
    model = build_model(cfg, ParallelState.single(), device="cpu")
    assert sum(isinstance(m, HiF8ColumnParallelLinear) for m in model.modules()) >= 8 * 4


def test_tiny_model_trains_with_native_fp8():
    cfg = load_config(None, ["data.kind=synthetic", "model.size=tiny", "model.schedule=full", "precision.dtype=fp32",
                             "precision.recipe=fp8_current", "precision.quantize_attention=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model, ParallelState.single(), precision=cfg.precision, device="cpu")
    recipe = recipe_from_config(cfg.precision, cfg.model.spec)
    g = torch.Generator().manual_seed(42)
    x0 = torch.randn(2, 16, 2, 8, 8, generator=g)
    text = torch.randn(2, 6, 32, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0.3, 0.7])
    xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        with autocast(recipe=recipe):
            loss = torch.nn.functional.mse_loss(model(xt, t * 1000.0, text), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.gpu
@pytest.mark.parametrize("recipe_cls", [
    FP8CurrentScaling,
    FP8DelayedScaling,
])
def test_scaled_mm_path_equals_fake_quant(recipe_cls):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability >= 8.9 (Ada / Hopper)")
    from osp_megatron.quant.modules import _FP8ScaledMMFn, _HiF8LinearFn

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(256, 2, 1536, generator=g, device="cuda") * 2).bfloat16().requires_grad_(True)
    w = (torch.randn(4608, 1536, generator=g, device="cuda") * 0.02).bfloat16().requires_grad_(True)
    b = torch.randn(4608, generator=g, device="cuda").bfloat16().requires_grad_(True)
    dy = (torch.randn(256, 2, 4608, generator=g, device="cuda") * 1e-3).bfloat16()
    assert use_scaled_mm(recipe_cls(), x, w)
    outs = {}
    for name, fn in (("scaled_mm", _FP8ScaledMMFn), ("fake", _HiF8LinearFn)):
        recipe = recipe_cls()
        for step in range(2):  # delayed: the second step uses the recorded amax
            for t in (x, w, b):
                t.grad = None
            with autocast(recipe=recipe):
                args = (x, w, b, recipe, "lin", None, False)
                y = fn.apply(*args, None, None, None) if fn is _FP8ScaledMMFn else fn.apply(*args, False, None, None,
                                                                                             None)
            y.backward(dy)
        outs[name] = [y.detach().float(), x.grad.float(), w.grad.float(), b.grad.float()]
    for got, want, what in zip(outs["scaled_mm"], outs["fake"], ("y", "dgrad", "wgrad", "bias grad")):
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-2, (what, rel)  # same fp8 operands; bf16 rounding of the fake path's operands and outputs


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_compiled_fp8_cast_and_amax_equal_eager_bit_for_bit(fmt, monkeypatch):
    from osp_megatron.quant import recipes

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(3000, 1536, generator=g, device="cuda") * 3).bfloat16()
    x[0, :4] = torch.tensor([float("inf"), -float("inf"), 1e30, 0.0])
    scale = torch.tensor(37.5, device="cuda")
    compiled = (recipes.fp8_cast(x, scale, fmt), recipes.fp8_amax(x[1:]))
    monkeypatch.setenv("OSP_COMPILE", "0")
    eager = (recipes.fp8_cast(x, scale, fmt), recipes.fp8_amax(x[1:]))
    assert torch.equal(compiled[0].view(torch.uint8), eager[0].view(torch.uint8))
    assert torch.equal(compiled[1], eager[1])
