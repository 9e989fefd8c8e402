"""The explicit FLOPs formula: hand-checked terms, work counted as executed (padded sparse layouts,
padding-free attention per class)."""
from osp_megatron.config import ModelConfig
from osp_megatron.training.flops import forward_flops, model_flops_per_sample, train_flops_per_sample


def test_dense_tiny_matches_hand_count():
    m = ModelConfig(size="tiny", schedule="full")
    c, f, layers, text_dim = 64, 128, 8, 32
    lt = 8
    n = 2 * 4 * 4  # latents [16, 2, 8, 8] -> patch 1x2x2
    out = forward_flops(m, [16, 2, 8, 8], lt)
    per_block = (6 * 2 * n * c * c + 2 * 2 * lt * c * c) + 4 * n * n * c + 4 * n * lt * c + 4 * n * c * f
    expect = layers * per_block + 2 * n * 64 * c + 2 * n * c * 64 + 2 * lt * (text_dim * c + c * c)
    assert out["total"] == expect
    assert train_flops_per_sample(m, [16, 2, 8, 8], lt) == 3 * expect
    assert train_flops_per_sample(m, [16, 2, 8, 8], lt, recompute=True) == 4 * expect
    assert model_flops_per_sample(m, [16, 2, 8, 8], lt) == 3 * expect


def test_sparse_blocks_count_padding_and_attention_per_class():
    from osp_megatron.training.flops import class_sizes

    shape = [16, 21, 60, 104]  # 81x480x832 latents: grid 21x30x52, padded to 21x32x52 for P=2
    dense = forward_flops(ModelConfig(size="wan_1_3b", schedule="full"), shape, 512)
    sparse = forward_flops(ModelConfig(size="wan_1_3b", schedule="dual_end"), shape, 512)
    assert dense["tokens"] == 21 * 30 * 52 and sparse["tokens_padded"] == 21 * 32 * 52
    n, npad, c = dense["tokens"], sparse["tokens_padded"], 1536
    # 8 full blocks over the n valid tokens; 22 sparse blocks attend within each class's valid tokens
    per_class = {k: sum(4 * m * m * c for m in class_sizes((21, 30, 52), 2, k)) for k in ("token", "group")}
    expect_attn = 8 * 4 * n * n * c + 11 * per_class["token"] + 11 * per_class["group"]
    assert abs(sparse["self_attention"] - expect_attn) / expect_attn < 1e-12
    assert per_class["token"] < 4 * npad * npad * c / 4  # padding never reaches the kernel
    assert sparse["ffn"] > dense["ffn"]  # padded tokens run through the FFN too
    assert 1.4 < dense["total"] / sparse["total"] < 1.7


def test_padding_free_single_device_counts_valid_tokens_per_class():
    from osp_megatron.skiparse import valid_mask
    from osp_megatron.training.flops import class_sizes

    grid = (3, 5, 7)  # odd sizes: classes of unequal length
    for layout in ("token", "group"):
        assert class_sizes(grid, 2, layout) == valid_mask(grid, 2, layout).sum(0).tolist()
    m = ModelConfig(size="wan_1_3b", schedule="dual_end")
    shape = [16, 21, 60, 104]
    free = forward_flops(m, shape, 512, padded=False)
    pad = forward_flops(m, shape, 512, padded=True)
    assert free["total"] < pad["total"]
    n, c = 21 * 30 * 52, 1536
    exact = 8 * 4 * n * n * c + 11 * sum(4 * k * k * c for k in class_sizes((21, 30, 52), 2, "token")) \
        + 11 * sum(4 * k * k * c for k in class_sizes((21, 30, 52), 2, "group"))
    assert free["self_attention"] == exact == pad["self_attention"]
    npad, f = 21 * 32 * 52, 8960
    # one device: full blocks' FFN on the raster n tokens, sparse blocks' on the padded grid
    assert free["ffn"] == 8 * 4 * n * c * f + 22 * 4 * npad * c * f
    assert pad["ffn"] == 30 * 4 * npad * c * f


def test_padding_free_plans_and_model_flops_count_the_real_tokens_only():
    from osp_megatron.training.flops import packed_plan

    m = ModelConfig(size="wan_1_3b", schedule="dual_end")
    shape = [16, 21, 60, 104]
    n, npad, c, f = 21 * 30 * 52, 21 * 32 * 52, 1536, 8960
    packed = forward_flops(m, shape, 512, padded=False, packed=True)
    padded = forward_flops(m, shape, 512, padded=False)
    assert packed["ffn"] == 30 * 4 * n * c * f and padded["ffn"] == 8 * 4 * n * c * f + 22 * 4 * npad * c * f
    assert packed["self_attention"] == padded["self_attention"]  # attention already skipped the padding
    assert forward_flops(m, shape, 512, padded=True, packed=True)["total"] == packed["total"]
    assert train_flops_per_sample(m, shape, 512, recompute=True, padded=False, packed=True) == 4 * packed["total"]
    # MFU's numerator: the useful work, whatever the placement executes
    assert model_flops_per_sample(m, shape, 512) == 3 * packed["total"] < 3 * padded["total"]
    # model.padding_free: null packs where the plan is not layout-native; true / false force it
    assert packed_plan(None, padded=False) and not packed_plan(None, padded=True)
    assert packed_plan(True, padded=True) and not packed_plan(False, padded=False)
