"""TokenPlacement on one device: entry/exit/switch round trips and the attention view of a layout."""
import pytest
import torch

from osp_megatron import skiparse as sk
from osp_megatron.parallel import ContextParallel, ParallelState, TokenPlacement


def test_one_device_placement_round_trips():
    grid, ratio = (2, 9, 6), 2
    sched = sk.block_schedule(8, "dual_end", 4)
    pl = TokenPlacement(grid, ratio, sched, ParallelState())
    assert not pl.layout_native and (pl.entry_layout, pl.final_layout) == ("raster", "raster")
    assert [(s.layout, s.switch_from) for s in pl.steps[1:4]] == [("raster", None), ("token", "raster"), ("group", "token")]
    n = grid[0] * grid[1] * grid[2]
    x = torch.randn(n, 2, 5)
    assert torch.equal(pl.exit(pl.enter(x)), x)
    tok = pl.switch(x, "raster", "token")
    assert torch.equal(tok, sk.to_layout(x, grid, ratio, "token"))
    grp = pl.switch(tok, "token", "group")
    assert torch.equal(grp, sk.to_layout(x, grid, ratio, "group"))
    assert torch.equal(pl.switch(pl.switch(grp, "group", "token"), "token", "raster"), x)
    assert torch.equal(pl.shard_target(x), x) and pl.target_valid().all()
    # one device: Ulysses is the identity and the kernel sees this rank's own positions
    q = torch.randn(pl.local_len("token"), 4 * 2, 3, 8)
    assert pl.seq_to_heads(q, "token", "sparse") is q and pl.heads_to_seq(q, "token", "sparse") is q
    assert torch.equal(pl.attention_positions("token", "sparse"), pl.positions("token"))


def test_placement_rejects_impossible_plans():
    with pytest.raises(ValueError, match="needs sparse blocks"):
        TokenPlacement((2, 8, 8), 2, ["full"] * 4, ParallelState(cp=ContextParallel(ssp=2)))
    pl = TokenPlacement((2, 8, 8), 2, ["full", "token", "group", "full"], ParallelState())
    with pytest.raises(ValueError, match="token <-> group"):
        pl.switch(torch.zeros(32, 8, 1), "token", "token2")
