"""LoRA: plain nn.Linear and the real tiny OSP-Next model (megatron Column/Row linears), disable, merge, state."""
import pytest
import torch
import torch.nn as nn

from osp_megatron.config import Config
from osp_megatron.rl.config import LoraConfig
from osp_megatron.rl.lora import (
    apply_lora,
    load_lora_state_dict,
    lora_disabled,
    lora_parameters,
    lora_state_dict,
    merge_lora,
)


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.q = nn.Linear(6, 5)
        self.ffn = nn.Linear(5, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.ffn(self.attn.q(x)))


def test_nn_linear_lora_math_and_freeze():
    torch.manual_seed(0)
    net = TwoLinear()
    x = torch.randn(3, 6)
    y0 = net(x)
    names = apply_lora(net, rank=2, alpha=6.0, targets=[r"attn\.", r"^ffn$"])
    assert names == ["attn.q", "ffn"]
    assert torch.equal(net(x), y0)  # B = 0: unchanged
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        "attn.q.lora_A", "attn.q.lora_B", "ffn.lora_A", "ffn.lora_B"}
    with torch.no_grad():
        net.attn.q.lora_B.normal_()
    q = net.attn.q
    expect = x @ q.weight.T + q.bias + 3.0 * (x @ q.lora_A.T) @ q.lora_B.T
    assert torch.allclose(q(x), expect, atol=1e-6)
    with lora_disabled(net):
        assert torch.equal(net(x), y0)
    assert not torch.allclose(net(x), y0)


def test_merge_equals_adapted_forward():
    torch.manual_seed(1)
    net = TwoLinear()
    apply_lora(net, rank=3, alpha=3.0, targets=["attn", "ffn"])
    with torch.no_grad():
        for p in lora_parameters(net):
            p.normal_()
    x = torch.randn(4, 6)
    y = net(x)
    merged = merge_lora(net.state_dict())
    assert not any("lora" in k for k in merged)
    plain = TwoLinear()
    plain.load_state_dict(merged)
    assert torch.allclose(plain(x), y, atol=1e-5)


def test_state_roundtrip_and_mismatch():
    torch.manual_seed(2)
    a, b = TwoLinear(), TwoLinear()
    apply_lora(a, 2, 2.0, ["attn", "ffn"], seed=0)
    apply_lora(b, 2, 2.0, ["attn", "ffn"], seed=5)
    with torch.no_grad():
        a.ffn.lora_B.fill_(0.5)
    load_lora_state_dict(b, lora_state_dict(a))
    assert torch.equal(b.ffn.lora_B, a.ffn.lora_B) and torch.equal(b.attn.q.lora_A, a.attn.q.lora_A)
    c = TwoLinear()
    apply_lora(c, 4, 2.0, ["attn", "ffn"])
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(c, lora_state_dict(a))


def test_no_match_is_a_clear_error():
    with pytest.raises(ValueError, match="matched no linear layer"):
        apply_lora(TwoLinear(), 2, 2.0, ["nothing_here"])


def test_unsupported_linear_type_is_rejected():
    class TELinear(nn.Module):
        def forward(self, x):
            return x

    net = nn.Module()
    net.attn = TELinear()
    with pytest.raises(NotImplementedError, match="only nn.Linear"):
        apply_lora(net, 2, 2.0, ["attn"])


def _tiny_model(layers=2):
    from osp_megatron.models import build_model
    from osp_megatron.parallel import ParallelState

    cfg = Config()
    cfg.data.kind = "synthetic"
    cfg.model.num_layers, cfg.model.schedule = layers, "full"
    torch.manual_seed(0)
    return build_model(cfg, parallel=ParallelState.single(), device="cpu")


def test_default_targets_on_tiny_model():
    """Default targets hit q/k/v/proj of self- and cross-attention and both FFN linears (megatron Column/Row)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    model = _tiny_model()
    x, t, txt = torch.randn(2, 16, 1, 4, 4), torch.tensor([300.0, 700.0]), torch.randn(2, 5, 32)
    with torch.no_grad():
        y0 = model(x, t, txt)
    names = apply_lora(model, 4, 8.0, LoraConfig().targets)
    per_block = sorted(n.split(".", 2)[2] for n in names if n.startswith("blocks.0."))
    assert per_block == sorted([f"{a}.linear_{p}" for a in ("self_attention", "cross_attention")
                                for p in ("q", "k", "v", "proj")] + ["mlp.linear_fc1", "mlp.linear_fc2"])
    kinds = {type(m) for n, m in model.named_modules() if n in names}
    assert kinds == {ColumnParallelLinear, RowParallelLinear}
    with torch.no_grad():
        y_frozen = model(x, t, txt)  # B = 0; frozen base weights take megatron's no-wgrad path (last-bit differences)
        assert torch.allclose(y_frozen, y0, rtol=0, atol=1e-6)
        for p in lora_parameters(model):
            p.normal_(std=0.05)
        y1 = model(x, t, txt)
        with lora_disabled(model):
            assert torch.equal(model(x, t, txt), y_frozen)
    assert not torch.allclose(y1, y0)
    # merging into the base weights reproduces the adapted model
    base = _tiny_model()
    base.load_state_dict(merge_lora(model.state_dict()), strict=False)
    with torch.no_grad():
        assert torch.allclose(base(x, t, txt), y1, atol=1e-5)
    # gradients reach every adapter
    model.zero_grad()
    model(x, t, txt).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
