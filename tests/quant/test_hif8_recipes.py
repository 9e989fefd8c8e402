"""Recipes: delayed scaling follows TE's DelayedScaling update rule; config selection; TE bridge absence."""
import math

import pytest
import torch

from osp_megatron.config import PrecisionConfig
from osp_megatron.quant.hif8 import hif8_round
from osp_megatron.quant.recipes import (
    HiF8CurrentScaling,
    HiF8DelayedScaling,
    autocast,
    recipe_from_config,
    te_custom_recipe,
    te_fp8_recipe,
    te_version,
)


def _tensor_with_amax(amax: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(64, generator=g) * 2 - 1
    if amax == 0:
        return torch.zeros(64)
    x = x / x.abs().max() * amax
    assert x.abs().max().item() == pytest.approx(amax, rel=1e-6)
    return x


def _expected(x: torch.Tensor, scale: float) -> torch.Tensor:
    s = torch.tensor(scale, dtype=torch.float32)
    return hif8_round(x * s, saturate=True) / s


def test_delayed_scaling_history_rolls_and_scale_updates_like_te():
    r = HiF8DelayedScaling(amax_history_len=3, amax_compute_algo="max", margin=1, scale_max_fwd=15.0)
    amaxes = [2.0, 8.0, 4.0, 1.0, 0.0, 3.0]
    # scale used at step t = (15 / max(amax of the last <=3 recorded steps)) / 2^margin, 1 before any record
    want_scales = [1.0, 15 / 2 / 2, 15 / 8 / 2, 15 / 8 / 2, 15 / 8 / 2, 15 / 4 / 2]
    want_hist_after = [[2, 0, 0], [8, 0, 2], [4, 2, 8], [1, 8, 4], [0, 4, 1], [3, 1, 0]]
    for t, (a, s_want, h_want) in enumerate(zip(amaxes, want_scales, want_hist_after)):
        x = _tensor_with_amax(a, t)
        a_true = x.abs().max().item()
        with autocast(recipe=r):
            y = r.quantize(x, "input", key="lin0")
        slot = r.slot("lin0", "input")
        assert slot.scale.item() == pytest.approx(s_want, rel=1e-6), t
        assert torch.equal(y, _expected(x, slot.scale.item()))
        assert slot.history.tolist() == pytest.approx([a_true if v == a else v for v in h_want], rel=1e-6)


def test_delayed_most_recent_keeps_scale_on_zero_amax_and_interval():
    r = HiF8DelayedScaling(amax_history_len=4, amax_compute_algo="most_recent", margin=0, scale_max_bwd=224.0)
    scales = []
    for a in (4.0, 0.0, 2.0, 8.0):
        with autocast(recipe=r):
            r.quantize(_tensor_with_amax(a, 1), "grad_output", key="k")
        scales.append(r.slot("k", "grad_output").scale.item())
    assert scales == pytest.approx([1.0, 224 / 4, 224 / 4, 224 / 2])  # amax 0 keeps the previous scale
    r2 = HiF8DelayedScaling(amax_history_len=1, amax_compute_algo="most_recent", interval=2)
    got = []
    for a in (1.0, 3.0, 5.0, 7.0):
        with autocast(recipe=r2):
            r2.quantize(_tensor_with_amax(a, 2), "weight", key="w")
        got.append(r2.slot("w", "weight").scale.item())
    assert got == pytest.approx([1.0, 1.0, 15 / 3, 15 / 3])  # recomputed every 2nd update only


def test_delayed_scaling_amax_within_one_step_is_the_max_and_not_applied_until_next_step():
    r = HiF8DelayedScaling(amax_history_len=2)
    with autocast(recipe=r):
        r.quantize(_tensor_with_amax(3.0, 0), "input", key="a")
        with autocast(recipe=r):  # nested region of the same recipe is the same step
            r.quantize(_tensor_with_amax(5.0, 1), "input", key="a")
        assert r.slot("a", "input").scale.item() == 1.0
    assert r.slot("a", "input").history[0].item() == pytest.approx(5.0)
    with autocast(recipe=r):
        r.quantize(torch.ones(3), "input", key="a")
    assert r.slot("a", "input").scale.item() == pytest.approx(3.0)  # 15 / 5
    callable_r = HiF8DelayedScaling(amax_history_len=2, amax_compute_algo=lambda h: h.sum())
    for a in (1.0, 2.0):
        with autocast(recipe=callable_r):
            callable_r.quantize(_tensor_with_amax(a, 3), "input", key="c")
    assert callable_r.slot("c", "input").scale.item() == pytest.approx(15.0)


def test_delayed_scaling_state_dict_round_trip():
    r = HiF8DelayedScaling(amax_history_len=3)
    for a in (2.0, 6.0):
        with autocast(recipe=r):
            r.quantize(_tensor_with_amax(a, 4), "input", key="blocks.0.linear_q")
    state = r.state_dict()
    r2 = HiF8DelayedScaling(amax_history_len=3)
    r2.load_state_dict(state)
    x = _tensor_with_amax(5.0, 6)
    with autocast(recipe=r):
        y1 = r.quantize(x, "input", key="blocks.0.linear_q")
    with autocast(recipe=r2):
        y2 = r2.quantize(x, "input", key="blocks.0.linear_q")
    assert torch.equal(y1, y2) and r2.slot("blocks.0.linear_q", "input").scale.item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="amax_history_len"):
        HiF8DelayedScaling(amax_history_len=4).load_state_dict(state)


def test_assign_keys_names_hif8_linears_by_path():
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    from osp_megatron.parallel import ParallelState
    from osp_megatron.quant.modules import HiF8ColumnParallelLinear, assign_hif8_keys

    ParallelState.single()
    assert parallel_state.model_parallel_is_initialized()
    cfg = ModelParallelConfig(use_cpu_initialization=True)
    net = torch.nn.Sequential(
        HiF8ColumnParallelLinear(4, 4, config=cfg, init_method=torch.nn.init.zeros_),
        torch.nn.Sequential(HiF8ColumnParallelLinear(4, 4, config=cfg, init_method=torch.nn.init.zeros_)),
    )
    assert assign_hif8_keys(net, "m.") == 2
    assert [net[0].hif8_key, net[1][0].hif8_key] == ["m.0", "m.1.0"]


def test_delayed_scaling_saturates_instead_of_inf():
    r = HiF8DelayedScaling()
    with autocast(recipe=r):
        y = r.quantize(torch.tensor([1e6, -1e6, 1.0]), "input", key="s")  # scale 1: beyond 32768
    assert y.tolist() == [32768.0, -32768.0, 1.0]


def test_current_scaling_is_per_call():
    r = HiF8CurrentScaling()
    x = _tensor_with_amax(6.0, 5)
    s = 15.0 / x.abs().max()
    assert torch.equal(r.quantize(x, "weight"), hif8_round(x * s) / s)
    with pytest.raises(ValueError, match="role"):
        r.quantize(x, "activation")
    with pytest.raises(ValueError, match="scale_max"):
        HiF8CurrentScaling(scale_max_fwd=0)


def test_current_scaling_reuses_an_unchanged_input():
    r = HiF8CurrentScaling()
    x = torch.randn(32, 8)
    y1 = r.quantize(x, "input")
    assert r.quantize(x, "input") is y1  # shared input of Q/K/V: quantized once
    assert r.quantize(x.clone(), "input") is not y1
    x.mul_(3.0)  # in-place change bumps the version: recomputed
    y2 = r.quantize(x, "input")
    assert y2 is not y1 and torch.equal(y2, r.quantize(x.clone(), "input"))
    assert r.quantize(x, "weight") is not y2  # only the "input" role is cached


def test_recipe_from_config():
    assert recipe_from_config(PrecisionConfig(recipe="none")) is None
    cur = recipe_from_config(PrecisionConfig(recipe="hif8_current", scale_max_fwd=7.0, backward_rounding="hybrid"))
    assert isinstance(cur, HiF8CurrentScaling) and cur.scale_max_fwd == 7.0 and cur.backward_rounding == "hybrid"
    dl = recipe_from_config(
        PrecisionConfig(recipe="hif8_delayed", amax_history_len=5, amax_compute_algo="most_recent", margin=2)
    )
    assert isinstance(dl, HiF8DelayedScaling)
    assert (dl.amax_history_len, dl.amax_compute_algo, dl.margin) == (5, "most_recent", 2)
    with pytest.raises(ValueError, match="precision.recipe"):
        recipe_from_config(PrecisionConfig(recipe="int8"))


@pytest.mark.skipif(te_version() is not None, reason="TransformerEngine is installed")
def test_te_recipes_say_what_is_missing():
    for name in ("fp8_delayed", "fp8_current", "fp8_block"):  # TE's FP8 recipes: the te spec
        with pytest.raises(RuntimeError, match="TransformerEngine >= 2.*not importable"):
            recipe_from_config(PrecisionConfig(recipe=name), spec="te")
    with pytest.raises(RuntimeError, match="TransformerEngine >= 2.9"):
        te_custom_recipe(HiF8CurrentScaling())
    with pytest.raises(ValueError, match="fp8_delayed"):
        te_fp8_recipe("fp8_mx")


@pytest.mark.gpu
@pytest.mark.skipif(te_version() is None or te_version() < (2, 9), reason="needs TransformerEngine >= 2.9")
def test_te_custom_recipe_runs_a_te_linear_like_the_hif8_linear():
    import transformer_engine.pytorch as te

    from osp_megatron.quant.hif8 import hif8_qdq_reference as qdq

    torch.manual_seed(0)
    lin = te.Linear(256, 128, bias=False, params_dtype=torch.bfloat16).cuda()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with te.autocast(enabled=True, recipe=te_custom_recipe(HiF8CurrentScaling())):
        y = lin(x)
    want = torch.matmul(qdq(x.detach(), 15.0), qdq(lin.weight.detach(), 15.0).t())
    assert torch.allclose(y.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert math.isfinite(y.float().sum().item())


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["precision.interval=0"], "precision.interval=0"),
        (["precision.recipe=hif8_current", "model.spec=te"], "model.spec=local"),
        (["precision.amax_compute_algo=mean"], "precision.amax_compute_algo"),
        (["precision.backward_rounding=sr"], "precision.backward_rounding"),
    ],
)
def test_precision_validation_names_the_field(overrides, needle):
    from osp_megatron.config import ConfigError, load_config

    cfg = load_config(None, ["data.kind=synthetic", *overrides])
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        cfg.validate()
