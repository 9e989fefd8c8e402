"""model.offload_blocks: the first blocks' saved activations wait in host memory; loss and gradients are those of
the same model without offload, bit for bit (on CPU the copies are host-to-host, the bookkeeping is the same)."""
import pytest
import torch

from osp_megatron.config import ConfigError, ModelConfig, ParallelConfig, load_config
from osp_megatron.models import build_model, offload
from osp_megatron.models.transformer_config import make_osp_config
from osp_megatron.parallel import ParallelState


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 18, 16, generator=g)  # grid 3 x 9 x 8: H padded for the P=2 layouts
    return x, torch.tensor([100.0, 700.0]), torch.randn(2, 8, 32, generator=g), torch.randn(x.shape, generator=g)


@pytest.fixture(autouse=True)
def _small_tensors_count(monkeypatch):
    monkeypatch.setattr(offload, "MIN_BYTES", 16 << 10)  # the tiny model's activations are ~100 KB


def _run(inputs, recompute="none", offload_blocks=0, schedule="dual_end", steps=1):
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", schedule=schedule, recompute=recompute,
                                    offload_blocks=offload_blocks), ParallelState.single(), device="cpu").float().train()
    for _ in range(steps):  # the second step reuses the pooled host buffers
        model.zero_grad(set_to_none=True)
        loss = model(*inputs[:3], target=inputs[3])
        loss.backward()
    return model, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_offloaded_blocks_give_the_gradients_of_no_offload(recompute, monkeypatch):
    inputs = _inputs()
    _, loss0, g0 = _run(inputs, recompute)
    counts = {"out": 0, "back": 0, "prefetched": 0}
    to_host, start_restore, prefetch = (offload.ActivationOffload.to_host, offload.ActivationOffload.start_restore,
                                        offload._Pass.prefetch)

    def counting_to_host(self, t):
        assert not isinstance(t, torch.nn.Parameter)
        counts["out"] += 1
        return to_host(self, t)

    def counting_restore(self, s):
        counts["back"] += s.restored is None
        return start_restore(self, s)

    def counting_prefetch(self):
        counts["prefetched"] += len(self.saved)
        return prefetch(self)

    monkeypatch.setattr(offload.ActivationOffload, "to_host", counting_to_host)
    monkeypatch.setattr(offload.ActivationOffload, "start_restore", counting_restore)
    monkeypatch.setattr(offload._Pass, "prefetch", counting_prefetch)
    model, loss1, g1 = _run(inputs, recompute, offload_blocks=2, steps=2)
    assert torch.equal(loss1, loss0)
    assert g1.keys() == g0.keys()
    for name in g0:
        assert torch.equal(g1[name], g0[name]), name
    # 8 tiny blocks: blocks 0-1 offloaded, the copies back start when backward reaches block 4 = min(2N, L-1)
    assert model.activation_offload.prefetch_block == 4
    assert counts["out"] > 0 and counts["back"] == counts["out"] == counts["prefetched"], counts
    assert model.activation_offload.offloaded_bytes > 0
    # the host buffers of the first step are reused by the second
    pooled = sum(len(v) for v in model.activation_offload._pool.values())
    assert pooled == counts["out"] // 2, (pooled, counts)


def test_small_tensors_and_parameters_stay_on_the_device():
    inputs = _inputs()
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", schedule="dual_end", offload_blocks=8), ParallelState.single(),
                        device="cpu").float().train()
    pass_ = model.activation_offload.start_pass(model.parameters())
    w = model.blocks[0].mlp.linear_fc1.weight
    big = torch.randn(offload.MIN_BYTES // 4)
    assert pass_._pack(w) is w  # a parameter is saved as itself
    assert pass_._pack(torch.randn(4)).__class__ is torch.Tensor  # below MIN_BYTES
    saved = pass_._pack(big)
    assert isinstance(saved, offload._Saved) and torch.equal(pass_._unpack(saved), big)
    loss = model(*inputs[:3], target=inputs[3])  # every block offloaded: no prefetch point, copies on demand
    assert model.activation_offload.prefetch_block == 7
    loss.backward()


def test_offload_blocks_beyond_a_pipeline_stage_is_refused():
    with pytest.raises(ConfigError, match="model.offload_blocks=5 exceeds the 4 blocks of a pipeline stage"):
        make_osp_config(ModelConfig(size="tiny", offload_blocks=5), ParallelConfig(pipeline_parallel=2))
    cfg = load_config(None, ["model.offload_blocks=9"])
    assert any("model.offload_blocks=9" in e for e in cfg.errors())


@pytest.mark.gpu
def test_cuda_offload_keeps_the_gradients_and_lowers_the_peak():
    """On CUDA the copies run on a side stream: the same gradients, and the peak memory of forward + backward drops."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 9, 64, 64, generator=g)
    inputs = [t.cuda() for t in (x, torch.tensor([500.0]), torch.randn(1, 8, 32, generator=g),
                                 torch.randn(x.shape, generator=g))]
    out = {}
    for n in (0, 4):
        torch.manual_seed(0)
        model = build_model(ModelConfig(size="tiny", schedule="dual_end", offload_blocks=n), ParallelState.single(),
                            device="cpu").float().train().cuda()
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(*inputs[:3], target=inputs[3]).backward()
            torch.cuda.synchronize()
        out[n] = (torch.cuda.max_memory_allocated() - base, {k: p.grad.clone() for k, p in model.named_parameters()})
    for name, grad in out[0][1].items():
        assert torch.equal(out[4][1][name], grad), name
    assert out[4][0] < 0.8 * out[0][0], (out[4][0], out[0][0])
