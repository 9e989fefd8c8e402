"""The DiT against diffusers' WanTransformer3DModel (dense) and against masked raster attention (sparse)."""
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from osp_megatron.config import Config, ConfigError, ModelConfig, load_config
from osp_megatron import skiparse
from osp_megatron.models import build_model
from osp_megatron.models.adapters import diffusers as ad
from osp_megatron.models.adapters import wan as aw
from osp_megatron.models.adapters.common import StateDictMismatch
from osp_megatron.parallel import ParallelState


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _reference(num_layers=4, heads=4, head_dim=16, seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    ).eval()


def _ours_from(ref, schedule="full", ratio=2, num_full=None):
    mc = ad.config_from_diffusers(dict(ref.config))
    mc.schedule, mc.sparse_ratio, mc.num_full_blocks = schedule, ratio, num_full
    model = build_model(mc, ParallelState.single()).eval()
    model.load_full_state_dict(ad.from_diffusers(ref.state_dict(), mc))
    return model, mc


class _MaskedProcessor(WanAttnProcessor):
    """diffusers' processor with a fixed boolean attention mask (True = may attend)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def _class_mask(grid, ratio, kind):
    t, h, w = grid
    hh = torch.arange(h)[:, None].expand(h, w)
    ww = torch.arange(w)[None, :].expand(h, w)
    if kind == "token":
        cls = (hh % ratio) * ratio + ww % ratio
    else:
        cls = ((hh // ratio) % ratio) * ratio + (ww // ratio) % ratio
    cls = cls.reshape(1, h * w).expand(t, h * w).reshape(-1)
    return (cls[:, None] == cls[None, :])[None, None]  # [1, 1, N, N]


def test_dense_matches_diffusers_on_odd_grid():
    ref = _reference()
    model, _ = _ours_from(ref)
    x = torch.randn(2, 16, 3, 2 * 7, 2 * 5)  # H=7, W=5 patches: not multiples of 4
    t, txt = torch.tensor([812.0, 37.0]), torch.randn(2, 11, 32)
    with torch.no_grad():
        want = ref(x, t, txt, return_dict=False)[0]
        got = model(x, t, txt)
    assert _rel(got, want) <= 1e-5


@pytest.mark.parametrize("ratio,schedule,num_full", [(2, "dual_end", 4), (4, "dual_end", 4), (2, "uniform", 4)])
def test_sparse_matches_masked_raster_attention(ratio, schedule, num_full):
    layers = 8
    ref = _reference(num_layers=layers)
    model, _ = _ours_from(ref, schedule, ratio, num_full)
    grid = (2, 45, 6)  # 720P-shaped height (45 -> padded 48), W and T scaled down
    sched = skiparse.block_schedule(layers, schedule, num_full)
    assert set(sched) == {"full", "token", "group"}
    for blk, kind in zip(ref.blocks, sched):
        if kind != "full":
            blk.attn1.set_processor(_MaskedProcessor(_class_mask(grid, ratio, kind)))
    torch.manual_seed(1)
    x = torch.randn(1, 16, grid[0], 2 * grid[1], 2 * grid[2])
    t, txt = torch.tensor([640.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        want = ref(x, t, txt, return_dict=False)[0]
        got = model(x, t, txt)
    assert _rel(got, want) <= 1e-5
    # and the sparse model is really different from the dense one
    dense, _ = _ours_from(ref)
    with torch.no_grad():
        assert _rel(dense(x, t, txt), want) > 1e-3


def test_training_loss_equals_mse_of_velocity():
    ref = _reference()
    model, _ = _ours_from(ref, "dual_end", 2, 4)
    x = torch.randn(2, 16, 2, 2 * 9, 2 * 6)
    t, txt = torch.tensor([300.0, 900.0]), torch.randn(2, 4, 32)
    target = torch.randn_like(x)
    with torch.no_grad():
        v = model(x, t, txt)
        loss = model(x, t, txt, target=target)
    assert torch.allclose(loss, ((v - target) ** 2).mean(), rtol=1e-5)


def test_adapters_round_trip_bitwise_and_wan_equals_diffusers():
    ref = _reference(num_layers=2)
    mc = ad.config_from_diffusers(dict(ref.config))
    ours = ad.from_diffusers(ref.state_dict(), mc)
    back = ad.to_diffusers(ours, mc)
    assert set(back) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back[k], v), k
    wan_sd = aw.to_wan(ours, mc)
    assert "blocks.0.norm3.weight" in wan_sd and "head.head.weight" in wan_sd and "time_projection.1.weight" in wan_sd
    again = aw.from_wan(wan_sd, aw.config_from_wan(aw.wan_config(mc)))
    assert set(again) == set(ours) and all(torch.equal(again[k], ours[k]) for k in ours)
    model = build_model(mc, ParallelState.single()).eval()
    model.load_full_state_dict(again)
    full = model.full_state_dict()
    assert all(torch.equal(full[k], ours[k]) for k in ours)


def test_adapter_errors_name_the_keys():
    ref = _reference(num_layers=2)
    mc = ad.config_from_diffusers(dict(ref.config))
    sd = dict(ref.state_dict())
    del sd["blocks.1.attn2.to_k.weight"]
    with pytest.raises(StateDictMismatch, match="blocks.1.cross_attention.linear_k.weight"):
        ad.from_diffusers(sd, mc)
    sd = dict(ref.state_dict())
    sd["blocks.0.attn1.extra_thing"] = torch.zeros(1)
    with pytest.raises(StateDictMismatch, match="extra_thing"):
        ad.from_diffusers(sd, mc)
    mc3 = ModelConfig(**{**mc.__dict__, "num_layers": 3})
    with pytest.raises(StateDictMismatch, match="missing"):
        ad.from_diffusers(ref.state_dict(), mc3)


def test_safetensors_sharded_round_trip(tmp_path):
    from osp_megatron.weights import read_state_dict, save_safetensors_dir

    ref = _reference(num_layers=2)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    save_safetensors_dir(sd, tmp_path / "m", "diffusion_pytorch_model", max_shard_bytes=20_000, config=dict(ref.config))
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors.index.json").exists()
    back = read_state_dict(tmp_path / "m")
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_registry_sizes_and_released_schedules():
    d14 = ModelConfig(size="wan_14b").resolve()
    assert (d14.hidden_size, d14.ffn_hidden_size, d14.num_attention_heads, d14.num_layers) == (5120, 13824, 40, 40)
    d13 = ModelConfig(size="wan_1_3b").resolve()
    assert (d13.hidden_size, d13.ffn_hidden_size, d13.num_attention_heads, d13.num_layers) == (1536, 8960, 12, 30)
    s14 = skiparse.block_schedule(40, "dual_end", 8)
    assert [i for i, k in enumerate(s14) if k == "full"] == [0, 1, 2, 3, 36, 37, 38, 39]
    assert [i for i, k in enumerate(s14) if k == "token"] == list(range(4, 36, 2))
    assert [i for i, k in enumerate(s14) if k == "group"] == list(range(5, 36, 2))
    s13 = skiparse.block_schedule(30, "dual_end", 8)
    assert [i for i, k in enumerate(s13) if k == "full"] == [0, 1, 2, 3, 26, 27, 28, 29]
    u = skiparse.block_schedule(30, "uniform", 10)
    assert [i for i, k in enumerate(u) if k == "full"] == [0, 1, 6, 7, 12, 13, 18, 19, 24, 25]
    from osp_megatron.models.rope import axis_dims

    assert axis_dims(128) == (44, 42, 42)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.sparse_ratio=3"], "model.sparse_ratio=3"),
        (["model.num_attention_heads=5"], "hidden_size=64 is not divisible by num_attention_heads=5"),
        (["data.buckets=[{frames: 80, height: 64, width: 64}]"], "must be 4k+1"),
        (["model.schedule=dual_end", "model.num_full_blocks=6"], "divisible by 4"),
        (["parallel.ssp=3"], "does not divide P^2=4"),
        (["model.size=wan_14b", "parallel.tensor_parallel=4", "parallel.ulysses=4"], "40 attention heads"),
        (["parallel.pipeline_parallel=3"], "does not divide model.num_layers=8"),
        (["train.lr_schedule=linear"], "train.lr_schedule"),
    ],
)
def test_config_validation_names_the_field(overrides, needle):
    cfg = load_config(None, ["data.kind=synthetic", *overrides])
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=16)
    assert needle in str(err.value)


def test_config_overrides_and_unknown_field():
    cfg = load_config(None, ["train.lr=3e-4", "parallel.ssp=2", "model.schedule=dual_end", "data.kind=synthetic"])
    assert cfg.train.lr == 3e-4 and cfg.parallel.ssp == 2
    cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(None, ["train.learning_rate=1"])
