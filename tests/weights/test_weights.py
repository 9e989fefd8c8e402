"""osp_megatron.weights: format detection (incl. diffusers pipeline folders, the same answer for training and
sampling), OSP-Next's released format read and written (bitwise round trip, schedule and HiF8 fields), its
training checkpoints and .pt EMA files, the `_osp_model` schedule of diffusers/wan exports, weight files."""
from __future__ import annotations

import json

import pytest
import torch

import osp_next_files as onf
from osp_megatron.config import ModelConfig, PrecisionConfig
from osp_megatron.models import build_model
from osp_megatron.models.adapters import diffusers as ad
from osp_megatron.models.adapters import osp_next as ao
from osp_megatron.parallel import ParallelState
from osp_megatron.weights import (
    WeightsError,
    detect_format,
    find_checkpoint_dir,
    load_into,
    open_checkpoint,
    read_latest,
    read_state_dict,
    read_weights,
    write_weights,
)

TINY_SPARSE = ModelConfig(size="tiny", schedule="dual_end", num_full_blocks=4)


def _ours(seed=0, mc=TINY_SPARSE):
    torch.manual_seed(seed)
    model = build_model(mc, ParallelState.single(), device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.full_state_dict()


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A diffusers *pipeline* folder: model_index.json + transformer/ (WanTransformer3DModel.save_pretrained)."""
    from diffusers import WanTransformer3DModel

    mc = ModelConfig(size="tiny", schedule="full")
    torch.manual_seed(1)
    dense = WanTransformer3DModel(**{k: v for k, v in ad.diffusers_config(mc).items() if k != "_class_name"})
    root = tmp_path_factory.mktemp("pipe") / "Wan2.1-T2V-tiny-Diffusers"
    dense.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "transformer":
                                                       ["diffusers", "WanTransformer3DModel"]}))
    return root


def test_pipeline_folder_is_diffusers_for_training_and_sampling(pipeline_dir):
    """train.init_from and osp-sample --checkpoint of one pipeline folder: same format, same weights."""
    from types import SimpleNamespace

    from osp_megatron.cli.sample import open_dit

    assert detect_format(pipeline_dir) == "diffusers"
    # what Trainer._init_weights does with train.init_from / init_format=auto and its model: section
    model = build_model(TINY_SPARSE, ParallelState.single(), device="cpu")
    ckpt = load_into(model, pipeline_dir, "auto", model_config=TINY_SPARSE)
    assert ckpt.format == "diffusers" and ckpt.where == pipeline_dir / "transformer"
    want = ad.from_diffusers(read_state_dict(pipeline_dir / "transformer"), ckpt.model)
    _same(model.full_state_dict(), want)
    # what osp-sample does with the same folder: same answer, and the folder's own (dense) schedule
    args = SimpleNamespace(checkpoint=str(pipeline_dir), format="auto", ema=False, precision="checkpoint", tp=1, ssp=1,
                           ulysses=1)
    sample_ckpt, model_config, _ = open_dit(args, {})
    assert sample_ckpt.format == "diffusers" and model_config.schedule == "full"


def test_bare_weight_files_detected_by_key_names(tmp_path):
    from safetensors.torch import save_file

    sd = ao.to_osp_next(_ours(), TINY_SPARSE)  # Wan2.1 original names
    (tmp_path / "wan").mkdir()
    save_file(sd, str(tmp_path / "wan" / "model.safetensors"))
    torch.save(sd, tmp_path / "wan.pth")
    assert detect_format(tmp_path / "wan") == "wan" and detect_format(tmp_path / "wan.pth") == "wan"
    ckpt = open_checkpoint(tmp_path / "wan.pth")
    assert ckpt.model is None  # no config: the caller's model config is used
    with pytest.raises(WeightsError, match="carry no model config"):
        read_weights(ckpt)
    _same(read_weights(ckpt, model_config=TINY_SPARSE), _ours())


def test_explicit_format_mismatch_and_unknown_paths_name_the_fix(pipeline_dir, tmp_path):
    assert detect_format(pipeline_dir, "wan") == "wan"  # explicit wins for detection ...
    with pytest.raises(WeightsError, match="is a diffusers config, not wan: use format diffusers"):
        open_checkpoint(pipeline_dir, "wan")  # ... but reading checks the config
    with pytest.raises(WeightsError, match="does not exist"):
        detect_format(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no weights"):
        detect_format(tmp_path / "empty")


def test_weight_files_index_and_weights_only(tmp_path):
    from osp_megatron.weights import save_safetensors_dir

    sd = ao.to_osp_next(_ours(), TINY_SPARSE)
    save_safetensors_dir(sd, tmp_path / "m", "diffusion_pytorch_model", max_shard_bytes=40_000)
    shards = sorted((tmp_path / "m").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 2
    _same(read_state_dict(tmp_path / "m"), sd)
    shards[1].unlink()
    with pytest.raises(WeightsError, match="names shard .* which is missing"):
        read_state_dict(tmp_path / "m")
    # .pt files are read with weights_only=True: a pickled object is refused, never executed
    torch.save({"w": torch.zeros(1), "obj": ValueError("x")}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        read_state_dict(tmp_path / "evil.pt")


def test_latest_pointer_and_checkpoint_dirs(tmp_path):
    from osp_megatron.training.checkpoint import CheckpointError

    run = tmp_path / "run" / "checkpoints"
    (run / "step_0000002").mkdir(parents=True)
    (run / "step_0000002" / "metadata.json").write_text("{}")
    (run / "latest").write_text("step_0000002\n")
    assert read_latest(run) == run / "step_0000002"
    assert find_checkpoint_dir(tmp_path / "run") == find_checkpoint_dir(run) == run / "step_0000002"
    assert find_checkpoint_dir(run / "step_0000002") == run / "step_0000002"
    assert detect_format(tmp_path / "run") == "megatron"
    (run / "latest").write_text("step_0000009\n")
    with pytest.raises(CheckpointError, match="names 'step_0000009', which does not exist"):
        read_latest(run, error=CheckpointError)
    assert read_latest(tmp_path) is None


# ------------------------------------------------------------------------------------------ OSP-Next
def test_osp_next_folder_reads_its_schedule_and_keys(tmp_path):
    folder = onf.write_folder(tmp_path / "osp", onf.random_state_dict(0))
    assert detect_format(folder) == "osp-next"
    ckpt = open_checkpoint(folder)
    d = ckpt.model.resolve()
    assert (ckpt.model.schedule, d.num_full_blocks, ckpt.model.sparse_ratio) == ("dual_end", 4, 2)
    assert (d.hidden_size, d.num_attention_heads, d.num_layers, d.text_dim, d.freq_dim) == (64, 4, 8, 32, 32)
    assert ckpt.precision == PrecisionConfig()  # quant: null
    sd = read_weights(ckpt)
    raw = onf.random_state_dict(0)
    assert torch.equal(sd["blocks.3.self_attention.linear_q.weight"], raw["blocks.3.self_attn.q.weight"])
    assert torch.equal(sd["blocks.5.norm2.weight"], raw["blocks.5.norm3.weight"])
    assert torch.equal(sd["patch_embedding.weight"], raw["patch_embedding.weight"].reshape(64, -1))
    model = build_model(ckpt.model, ParallelState.single(), device="cpu")
    load_into(model, ckpt)  # strict: every key of the folder has a place in the model
    assert model.schedule[:6] == ["full", "full", "token", "group", "token", "group"]


def test_osp_next_round_trip_is_bitwise_with_schedule_and_hif8(tmp_path):
    ours = _ours(3)
    hif8 = PrecisionConfig(recipe="hif8_current", quantize_attention=True, scale_max_fwd=14.0, scale_max_bwd=200.0)
    write_weights(ours, TINY_SPARSE, tmp_path / "osp", "osp-next", precision=hif8, max_shard_bytes=60_000)
    config = json.loads((tmp_path / "osp" / "config.json").read_text())
    assert config["_class_name"] == "OSPNextModel" and config["skiparse_model_type"] == "dual_end"
    assert (config["sparse_ratio"], config["num_full_blocks"], config["quant"], config["quant_attn"]) == (2, 4, "hif8",
                                                                                                         "hif8")
    assert (config["scale_max_forward"], config["scale_max_backward"]) == (14.0, 200.0)
    assert "blocks.0.self_attn.q.weight" in read_state_dict(tmp_path / "osp")  # OSP-Next's (Wan's) names
    back = open_checkpoint(tmp_path / "osp")
    assert back.model == TINY_SPARSE
    assert (back.precision.recipe, back.precision.quantize_attention, back.precision.scale_max_fwd,
            back.precision.scale_max_bwd) == ("hif8_current", True, 14.0, 200.0)
    _same(read_weights(back), ours)
    # dense models export as skiparse_model_type: full (sparse_ratio 1, as OSP-Next forces it)
    dense = ModelConfig(size="tiny", schedule="full")
    write_weights(ours, dense, tmp_path / "dense", "osp-next")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert (config["skiparse_model_type"], config["sparse_ratio"], config["quant"]) == ("full", 1, None)
    assert open_checkpoint(tmp_path / "dense").model.schedule == "full"


def test_osp_next_export_loads_with_diffusers_from_pretrained(tmp_path):
    """What `OSPNextModel.from_pretrained` (OSP-Next's loader) does with our export: every config field lands in
    its constructor, every tensor in a parameter of OSP-Next's name and shape, nothing missing or left over."""
    ours = _ours(5)
    write_weights(ours, TINY_SPARSE, tmp_path / "osp", "osp-next")
    model, info = onf.loader_stand_in().from_pretrained(tmp_path / "osp", low_cpu_mem_usage=False,
                                                        output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    c = model.config
    assert (c.dim, c.num_heads, c.num_layers, c.skiparse_model_type, c.sparse_ratio, c.num_full_blocks) == (
        64, 4, 8, "dual_end", 2, 4)
    _same({k: v.detach() for k, v in model.state_dict().items()}, ao.to_osp_next(ours, TINY_SPARSE))


def test_osp_next_refuses_what_its_constructor_refuses(tmp_path):
    ours = _ours()
    for mc, message in [(ModelConfig(size="tiny", schedule="uniform"), "builds only full / dual_end"),
                        (ModelConfig(size="tiny", schedule="dual_end", num_full_blocks=2), "divisible by 4")]:
        with pytest.raises(ValueError, match=message):
            write_weights(ours, mc, tmp_path / "x", "osp-next")
        assert not (tmp_path / "x" / "config.json").exists()
    for bad, message in [({"skiparse_model_type": "uniform"}, "builds only full / dual_end"),
                         ({"skiparse_1d": True}, "Skiparse-1D"), ({"quant": "fp8"}, "quant='fp8'")]:
        folder = onf.write_folder(tmp_path / f"bad{len(message)}", onf.random_state_dict(), **bad)
        with pytest.raises(WeightsError, match=message):
            open_checkpoint(folder)


def test_osp_next_training_output_and_pt_ema(tmp_path):
    main, ema, old = (onf.random_state_dict(s) for s in (0, 1, 2))
    run = onf.write_training_output(tmp_path / "out", {500: {"model": old, "ema_model": old},
                                                      1000: {"model": main, "ema_model": ema}})
    newest = run / "iter_000001000"
    for path in (run, newest, newest / "ema_model_state_dict.pt"):
        assert detect_format(path) == "osp-next", path
    ckpt = open_checkpoint(run)
    assert ckpt.where == newest and ckpt.model.schedule == "dual_end"  # from config.yaml's model_config
    mc = ckpt.model
    _same(read_weights(run), ao.from_osp_next(main, mc))
    _same(read_weights(run, ema=True), ao.from_osp_next(ema, mc))
    _same(read_weights(newest / "ema_model_state_dict.pt"), ao.from_osp_next(ema, mc))
    with pytest.raises(WeightsError, match="give the ema_model_state_dict.pt file"):
        read_weights(newest / "model_state_dict.pt", ema=True)
    lone = tmp_path / "lone"
    lone.mkdir()
    torch.save(ema, lone / "ema_model_state_dict.pt")
    with pytest.raises(WeightsError, match="without their model config"):
        open_checkpoint(lone / "ema_model_state_dict.pt", "osp-next")


def test_sparse_exports_to_diffusers_and_wan_keep_their_schedule(tmp_path):
    """The `_osp_model` block: written with every diffusers/wan export, applied by every reader; diffusers'
    own model ignores it; a broken block is refused with the field named."""
    from diffusers import WanTransformer3DModel

    ours = _ours(4)
    for fmt in ("diffusers", "wan"):
        write_weights(ours, TINY_SPARSE, tmp_path / fmt, fmt)
        config = json.loads((tmp_path / fmt / "config.json").read_text())
        assert config["_osp_model"] == {"schedule": "dual_end", "num_full_blocks": 4, "sparse_ratio": 2}
        back = open_checkpoint(tmp_path / fmt)
        assert back.format == fmt and back.model == TINY_SPARSE
        _same(read_weights(back), ours)
    ref = WanTransformer3DModel.from_config(json.loads((tmp_path / "diffusers" / "config.json").read_text()))
    ref.load_state_dict(read_state_dict(tmp_path / "diffusers"), strict=True)
    config = json.loads((tmp_path / "wan" / "config.json").read_text())
    config["_osp_model"]["schedule"] = "sparse"
    (tmp_path / "wan" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.schedule"):
        open_checkpoint(tmp_path / "wan")


def test_osp_next_sparse_and_dense_builds_differ():
    """The schedule is part of the model: the same weights run dense give another velocity (so a reader that
    dropped it would be caught by the sampling test comparing against our own megatron format)."""
    sd = ao.from_osp_next(onf.random_state_dict(0), TINY_SPARSE)
    x, t, text = torch.randn(1, 16, 2, 8, 8), torch.tensor([700.0]), torch.randn(1, 8, 32)
    out = {}
    for mc in (TINY_SPARSE, ModelConfig(size="tiny", schedule="full")):
        model = build_model(mc, ParallelState.single(), device="cpu").eval()
        model.load_full_state_dict(sd)
        with torch.no_grad():
            out[mc.schedule] = model(x, t, text)
    assert not torch.allclose(out["dual_end"], out["full"], atol=1e-4)


def test_hif8_checkpoint_samples_with_its_recipe_unless_told_otherwise(tmp_path):
    """osp-sample applies an OSP-Next `quant: hif8` checkpoint's recipe (as OSP-Next's HiF8 inference configs do);
    `--precision none` samples unquantized; the quantized forward differs from the plain one."""
    from types import SimpleNamespace

    from osp_megatron.cli.sample import load_dit, open_dit, quantization

    folder = onf.write_folder(tmp_path / "hif8", onf.random_state_dict(0), quant="hif8", quant_attn="hif8")
    args = SimpleNamespace(checkpoint=str(folder), format="auto", ema=False, precision="checkpoint", tp=1, ssp=1,
                           ulysses=1)
    ckpt, mc, precision = open_dit(args, {})
    assert (precision.recipe, precision.quantize_attention, precision.scale_max_fwd) == ("hif8_current", True, 15.0)
    assert open_dit(SimpleNamespace(**{**vars(args), "precision": "none"}), {})[2] == PrecisionConfig()
    x, t, text = torch.randn(1, 16, 2, 8, 8), torch.tensor([700.0]), torch.randn(1, 8, 32)
    out = {}
    for p in (precision, PrecisionConfig()):
        model = load_dit(args, ckpt, mc, p, ParallelState.single(), torch.float32, "cpu")
        with torch.no_grad(), quantization(p):
            out[p.recipe] = model(x, t, text)
    assert not torch.allclose(out["hif8_current"], out["none"], atol=1e-4)
