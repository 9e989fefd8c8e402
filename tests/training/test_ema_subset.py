"""EMA of a parameter subset (LoRA on a frozen base): the recursion on those tensors only, checkpoint entries with
the model's own sharding under `ema.`, load back, and no twin module."""
import pytest
import torch

from osp_megatron.training.ema import EMA


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))


def test_subset_ema_follows_the_recursion_and_leaves_the_rest():
    src = _net()
    names = ["1.weight", "0.bias"]
    ema = EMA(None, src, decay=0.75, names=names)
    assert not ema.has_module and set(ema.tensors()) == set(names)
    with pytest.raises(AttributeError, match="tensors"):
        ema.module
    ref = {n: p.detach().clone() for n, p in src.named_parameters() if n in names}
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 4):
        with torch.no_grad():
            for p in src.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        assert ema.update(src, step)
        for n, p in src.named_parameters():
            if n in ref:
                ref[n] = 0.75 * ref[n] + 0.25 * p.detach()
    for n, e in ema.tensors().items():
        torch.testing.assert_close(e, ref[n], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="not parameters"):
        EMA(None, src, decay=0.5, names=["2.weight"])
    with pytest.raises(ValueError, match="either"):
        EMA(lambda: _net(), src, decay=0.5, names=names)


def test_subset_ema_sharded_entries_mirror_the_model_and_load_back():
    from megatron.core.dist_checkpointing import ShardedTensor

    src = _net()
    names = ["0.weight", "1.bias"]
    ema = EMA(None, src, decay=0.5, names=names)
    model_state = {n: ShardedTensor.from_rank_offsets(f"model.{n}", p.detach(), replica_id=0)
                   for n, p in src.named_parameters()}
    state = ema.sharded_state_dict(model_state=model_state)
    assert sorted(state) == ["ema.0.weight", "ema.1.bias"]
    for n in names:
        entry = state[f"ema.{n}"]
        assert entry.key == f"ema.model.{n}" and entry.global_shape == model_state[n].global_shape
        assert entry.data is ema.tensors()[n]  # the EMA tensor itself, not the weight
    loaded = {k: torch.full_like(v.data, 3.0) for k, v in state.items()}
    ema.load_state_dict(loaded)
    assert all(torch.equal(t, torch.full_like(t, 3.0)) for t in ema.tensors().values())
    with pytest.raises(RuntimeError, match="lacks"):
        ema.load_state_dict({"ema.0.weight": loaded["ema.0.weight"]})
