"""Per-layer block specs carry every per-block choice: attention kind, HiF8 or bf16 edge linears, Q/K/V
quantizer, kernel; the built model follows them (and bf16 edge blocks really run unquantized)."""
import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from osp_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig
from osp_megatron.models import build_model
from osp_megatron.models.attention import QKVIdentity
from osp_megatron.models.core_attention import DenseAttention
from osp_megatron.models.specs import get_layer_specs
from osp_megatron.models.transformer_config import make_osp_config
from osp_megatron.parallel import ParallelState
from osp_megatron.quant.modules import HiF8ColumnParallelLinear, HiF8QKV, HiF8RowParallelLinear
from osp_megatron.quant.recipes import HiF8CurrentScaling, autocast
from osp_megatron.skiparse import block_schedule


def _config(schedule="dual_end", **precision):
    mc = ModelConfig(size="tiny", schedule=schedule, num_full_blocks=4, attention_backend="math")
    return make_osp_config(mc, ParallelConfig(), PrecisionConfig(dtype="fp32", **precision), torch.float32)


def test_layer_specs_follow_schedule_and_precision():
    cfg = _config(recipe="hif8_current", quantize_attention=True, bf16_first_blocks=1, bf16_last_blocks=2)
    specs = get_layer_specs(cfg)
    assert [s.params["kind"] for s in specs] == block_schedule(8, "dual_end", 4)
    for i, s in enumerate(specs):
        attn = s.submodules.self_attention.submodules
        edge = i < 1 or i >= 6
        assert attn.linear_q is (ColumnParallelLinear if edge else HiF8ColumnParallelLinear)
        assert s.submodules.mlp.submodules.linear_fc2 is (RowParallelLinear if edge else HiF8RowParallelLinear)
        assert attn.qkv_quantizer is HiF8QKV
        assert attn.core_attention.module is DenseAttention and attn.core_attention.params == {"backend": "math"}
    plain = get_layer_specs(_config())
    assert all(s.submodules.self_attention.submodules.qkv_quantizer is QKVIdentity for s in plain)
    assert all(s.submodules.cross_attention.submodules.linear_k is ColumnParallelLinear for s in plain)


def test_built_blocks_take_kind_layer_number_and_groups_from_construction():
    cfg = _config(recipe="hif8_current", quantize_attention=True, bf16_first_blocks=1)
    model = build_model(cfg, parallel=ParallelState.single())
    kinds = block_schedule(8, "dual_end", 4)
    for i, blk in enumerate(model.blocks):
        assert blk.kind == kinds[i] and blk.layer_number == i
        assert blk.step.attention == ("full" if kinds[i] == "full" else "sparse")
        assert isinstance(blk.self_attention.qkv_quantizer, HiF8QKV)
        assert blk.self_attention.qkv_quantizer.key == f"attn{i}" and blk.self_attention.qkv_quantizer.group is None
        assert isinstance(blk.self_attention.linear_q, HiF8ColumnParallelLinear) == (i >= 1)


def test_bf16_edge_blocks_run_unquantized():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8)
    t, text = torch.tensor([400.0]), torch.randn(1, 4, 32)
    outs = {}
    for name, edges in (("all_bf16", 8), ("quantized", 0)):
        torch.manual_seed(1)
        model = build_model(_config("full", recipe="hif8_current", bf16_first_blocks=edges),
                            parallel=ParallelState.single())
        with torch.no_grad():
            outs[name, "plain"] = model(x, t, text)
            with autocast(recipe=HiF8CurrentScaling()):
                outs[name, "hif8"] = model(x, t, text)
    assert torch.equal(outs["all_bf16", "hif8"], outs["all_bf16", "plain"])  # no block quantizes
    assert torch.equal(outs["quantized", "plain"], outs["all_bf16", "plain"])  # same weights either way
    assert not torch.allclose(outs["quantized", "hif8"], outs["quantized", "plain"], rtol=1e-4)


def test_block_spec_and_step_must_agree():
    from megatron.core.transformer.spec_utils import build_module

    from osp_megatron.models.specs import get_block_spec
    from osp_megatron.skiparse import BlockStep

    cfg = _config()
    with pytest.raises(ValueError, match="does not match its step"):
        build_module(get_block_spec(kind="token"), config=cfg, layer_number=3, parallel=ParallelState.single(),
                     step=BlockStep("group", None, "sparse"))



def _init_parameters(module, class_name):
    """(positional names, keyword-only names without default, all keyword names) of `class_name.__init__` in the
    source of `module` (megatron's TE classes are mocks when TransformerEngine is not installed)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    a = init.args
    positional = [x.arg for x in a.posonlyargs + a.args][1:]
    required = {x.arg for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is None}
    return positional, required, set(positional) | {x.arg for x in a.kwonlyargs}


def test_linears_are_built_with_arguments_the_te_linears_accept(monkeypatch):
    """model.spec=te swaps in megatron's TEColumnParallelLinear / TERowParallelLinear, whose skip_bias_add and
    is_expert are keyword-only without defaults: every linear of a block is built with arguments their
    signatures accept (checked here with the local linears, since TE itself needs a GPU)."""
    from megatron.core.extensions import transformer_engine as te_ext

    from osp_megatron.models import specs

    built = []

    def checked(local_cls, te_name):
        positional, required, known = _init_parameters(te_ext, te_name)

        class Checked(local_cls):
            def __init__(self, *args, **kwargs):
                given = set(positional[:len(args)]) | set(kwargs)
                assert required <= given, (te_name, sorted(required - given))
                assert set(kwargs) <= known, (te_name, sorted(set(kwargs) - known))
                built.append(te_name)
                super().__init__(*args, **kwargs)
        return Checked

    column = checked(ColumnParallelLinear, "TEColumnParallelLinear")
    row = checked(RowParallelLinear, "TERowParallelLinear")
    monkeypatch.setattr(specs, "_linears", lambda spec_name, quantized: (column, row))
    build_model(_config(), parallel=ParallelState.single())
    # per block: q, k, v and fc1 of self-attention, q, k, v of cross-attention; o of both and fc2
    assert built.count("TEColumnParallelLinear") == 8 * 7 and built.count("TERowParallelLinear") == 8 * 3, built
