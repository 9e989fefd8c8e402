"""Skiparse-2D layout properties: classes, round trips, involution, two-hop connectivity, sharding."""
import pytest
import torch

from osp_megatron import skiparse as sk


GRIDS = [(2, 45, 6), (3, 8, 8), (1, 5, 7)]


def _hw(pos, grid):
    t, h, w = grid
    return (pos // w) % h, pos % w


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [2, 4])
def test_classes_are_the_reference_index_sets(grid, ratio):
    t, h, w = grid
    for layout in ("token", "group"):
        pos = sk.positions(grid, ratio, layout)
        assert pos.shape[1] == ratio * ratio
        seen = []
        for c in range(ratio * ratio):
            p, q = divmod(c, ratio)
            ids = pos[:, c][pos[:, c] >= 0]
            hh, ww = _hw(ids, grid)
            if layout == "token":
                assert ((hh % ratio == p) & (ww % ratio == q)).all()
                want = {i for i in range(t * h * w) if ((i // w) % h) % ratio == p and (i % w) % ratio == q}
            else:
                assert (((hh // ratio) % ratio == p) & ((ww // ratio) % ratio == q)).all()
                want = {i for i in range(t * h * w)
                        if ((i // w) % h // ratio) % ratio == p and ((i % w) // ratio) % ratio == q}
            assert set(ids.tolist()) == want
            # every class spans all frames
            assert set((ids // (h * w)).tolist()) == set(range(t)) or not want
            seen += ids.tolist()
        assert sorted(seen) == list(range(t * h * w))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [2, 4])
def test_round_trips_and_involution(grid, ratio):
    n = grid[0] * grid[1] * grid[2]
    x = torch.randn(n, 3, 5)
    padded = sk.padded_grid(grid, ratio)
    for layout in ("token", "group", "raster"):
        assert torch.equal(sk.from_layout(sk.to_layout(x, grid, ratio, layout), grid, ratio, layout), x)
    tok = sk.to_layout(x, grid, ratio, "token")
    grp = sk.to_layout(x, grid, ratio, "group")
    assert torch.equal(sk.token_to_group(tok, padded, ratio), grp)
    assert torch.equal(sk.token_to_group(sk.token_to_group(tok, padded, ratio), padded, ratio), tok)
    assert torch.equal(sk.group_to_token(grp, padded, ratio), tok)


@pytest.mark.parametrize("ratio", [2, 4])
def test_every_pair_connected_by_one_token_and_one_group_block(ratio):
    grid = (2, ratio * ratio + 3, ratio * ratio + 1)
    t, h, w = grid
    n = t * h * w

    def adjacency(layout):
        pos = sk.positions(grid, ratio, layout)
        a = torch.zeros(n, n, dtype=torch.bool)
        for c in range(pos.shape[1]):
            ids = pos[:, c][pos[:, c] >= 0]
            a[ids[:, None], ids[None, :]] = True
        return a

    tok, grp = adjacency("token").float(), adjacency("group").float()
    two_hop = (tok @ grp) > 0  # i -> m in a token block, m -> j in a group block
    assert two_hop.all()
    assert not tok.bool().all() and not grp.bool().all()


def test_valid_mask_counts_720p():
    grid = (21, 45, 80)
    valid = sk.valid_mask(grid, 2, "token")
    assert valid.shape == (21 * 48 * 80 // 4, 4)
    counts = sorted(valid.sum(0).tolist())
    assert counts == [18480, 18480, 19320, 19320]


@pytest.mark.parametrize("layout", ["token", "group", "raster"])
@pytest.mark.parametrize("ssp,ulysses", [(1, 2), (2, 1), (4, 1), (2, 2)])
def test_shard_unshard(layout, ssp, ulysses):
    if layout == "raster" and ssp > 1:
        pytest.skip("raster layout has one class")
    grid, ratio = (2, 9, 6), 2
    padded = sk.padded_grid(grid, ratio, ulysses, sparse=layout != "raster")
    x = torch.randn(grid[0] * grid[1] * grid[2], 2, 3)
    y = sk.to_layout(x, grid, ratio, layout, ulysses)
    pieces = [[sk.shard(y, padded, ratio, layout, s, ssp, u, ulysses) for u in range(ulysses)] for s in range(ssp)]
    assert torch.equal(sk.unshard(pieces, padded, ratio, layout), y)


def test_schedule_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        sk.block_schedule(30, "dual_end", 6)
    with pytest.raises(ValueError, match="unknown schedule"):
        sk.block_schedule(30, "zigzag", 8)


@pytest.mark.parametrize("layout", ["token", "group", "raster"])
@pytest.mark.parametrize("ssp,ulysses", [(1, 1), (1, 2), (2, 1), (4, 1), (2, 2)])
def test_geometry_shards_every_rank_and_positions_travel_with_the_data(layout, ssp, ulysses):
    grid, ratio = (2, 9, 6), 2
    if layout == "raster" and ssp > 1:
        ssp, ulysses = 1, ssp * ulysses  # raster rows are split over every CP rank
    geo = sk.LayoutGeometry(grid, ratio, ssp, ulysses)
    n = grid[0] * grid[1] * grid[2]
    x = torch.randn(n, 2, 3)
    ranks = [(s, u) for s in range(geo.ssp) for u in range(geo.ulysses)]  # CP-rank order
    shards = [geo.shard(x, layout, s, u) for s, u in ranks]
    seen = []
    for (s, u), y in zip(ranks, shards):
        pos = geo.positions(layout, s, u)
        g = geo.classes_per_rank(layout)
        assert y.shape == (geo.local_len(layout), g * 2, 3) and pos.shape == (geo.local_len(layout), g)
        y4 = y.view(pos.shape[0], g, 2, 3)
        valid = pos >= 0
        assert torch.equal(y4[valid], x[pos[valid]])  # the slot holds the token its position names
        assert (y4[~valid] == 0).all()  # padding is zeros
        seen += pos[valid].tolist()
    assert sorted(seen) == list(range(n))  # every token on exactly one rank
    assert torch.equal(geo.unshard(shards, layout), x)
