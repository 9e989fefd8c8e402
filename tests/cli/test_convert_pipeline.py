"""osp-convert --to diffusers-pipeline: the folder opens with diffusers' WanPipeline and generates, its transformer
is the plain diffusers export, the model card records the checkpoint, missing VAE / text encoder are null
components passed at load time, a sparse layout travels in transformer/config.json, an existing output is refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from osp_megatron.cli import convert
from osp_megatron.encoders.text import tiny_text_model
from osp_megatron.encoders.tokenizer import ByteTokenizer, byte_tokenizer_fast
from osp_megatron.encoders.vae import tiny_vae_model
from osp_megatron.weights import open_checkpoint, read_state_dict
from tests.cli.test_convert import _cli, _worker, diffusers_dir  # noqa: F401  (diffusers_dir: fixture)


def _export(diffusers_dir, out, *extra):
    return convert.main(["--from", "diffusers", "--to", "diffusers-pipeline", "--input", str(diffusers_dir),
                         "--output", str(out), *map(str, extra)])


def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n"), card[:200]
    return yaml.safe_load(card.split("---\n")[1])


def _transformer_inputs(transformer):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, transformer.config.in_channels, 2, 4, 4, generator=g)
    text = torch.randn(1, 6, transformer.config.text_dim, generator=g)
    return dict(hidden_states=x, timestep=torch.tensor([700]), encoder_hidden_states=text, return_dict=False)


def test_pipeline_opens_generates_and_matches_the_transformer_export(diffusers_dir, tmp_path, capsys):
    from diffusers import WanPipeline, WanTransformer3DModel

    out = tmp_path / "pipe"
    assert _export(diffusers_dir, out, "--vae", "tiny", "--text-encoder", "tiny", "--check") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["check"]["ok"] and report["pipeline"]["missing"] == []
    assert not list(tmp_path.glob("pipe.tmp-*")), "the build folder must be renamed into place"
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"] and index["text_encoder"][1] == "UMT5EncoderModel"
    # transformer/ is the plain diffusers export: the source weights, bitwise
    src, got = read_state_dict(diffusers_dir), read_state_dict(out / "transformer")
    assert set(src) == set(got) and all(torch.equal(src[k], got[k]) for k in src)

    pipe = WanPipeline.from_pretrained(str(out))
    sched = pipe.scheduler.config
    assert (sched.prediction_type, sched.use_flow_sigmas, sched.flow_shift) == ("flow_prediction", True, 7.0)
    ids = pipe.tokenizer(["a red fox"], padding="max_length", max_length=12, truncation=True,
                         return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ByteTokenizer()(["a red fox"], 12)[0])  # the tiny tokenizer = osp-sample's byte ids
    video = pipe("a red square moving right", negative_prompt="", height=16, width=16, num_frames=5,
                 num_inference_steps=2, guidance_scale=2.0, max_sequence_length=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 5, 16, 16, 3) and np.isfinite(video).all()
    latents = pipe("a red square", height=16, width=16, num_frames=5, num_inference_steps=2, guidance_scale=1.0,
                   max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    assert latents.shape == (1, 16, 2, 2, 2) and torch.isfinite(latents).all()

    alone = WanTransformer3DModel.from_pretrained(str(out / "transformer")).eval()
    with torch.no_grad():
        a = pipe.transformer.eval()(**_transformer_inputs(alone))[0]
        b = alone(**_transformer_inputs(alone))[0]
    assert torch.equal(a, b)

    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-video"
    assert meta["license"] == "apache-2.0" and "base_model" not in meta  # not known for a bare diffusers input
    assert "| blocks | 4 |" in card and "| block schedule | full |" in card and "flow_shift=7" in card


def test_sparse_layout_travels_and_missing_components_are_null(diffusers_dir, tmp_path, capsys):
    from diffusers import WanPipeline, WanTransformer3DModel

    out = tmp_path / "sparse"
    assert _export(diffusers_dir, out, "--model", "schedule=dual_end", "--flow-shift", "3",
                   "--base-model", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == 0
    captured = capsys.readouterr()
    assert "has no vae, text_encoder, tokenizer" in captured.err and "vae=..." in captured.err
    config = json.loads((out / "transformer" / "config.json").read_text())
    # the same layout block as `--to diffusers` writes, read back by every osp reader of the folder
    plain = tmp_path / "plain"
    assert convert.main(["--from", "diffusers", "--to", "diffusers", "--input", str(diffusers_dir), "--output",
                         str(plain), "--model", "schedule=dual_end"]) == 0
    assert config == json.loads((plain / "config.json").read_text())
    assert config["_osp_model"]["schedule"] == "dual_end"
    back = open_checkpoint(out)
    assert back.format == "diffusers" and back.model.schedule == "dual_end"
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == index["text_encoder"] == index["tokenizer"] == [None, None]

    pipe = WanPipeline.from_pretrained(str(out), vae=tiny_vae_model(), text_encoder=tiny_text_model(32),
                                       tokenizer=byte_tokenizer_fast())
    assert pipe.scheduler.config.flow_shift == 3.0
    alone = WanTransformer3DModel.from_pretrained(str(out / "transformer")).eval()
    with torch.no_grad():
        assert torch.equal(pipe.transformer.eval()(**_transformer_inputs(alone))[0],
                           alone(**_transformer_inputs(alone))[0])
    card = (out / "README.md").read_text()
    assert _front_matter(card)["base_model"] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert "skiparse" in _front_matter(card)["tags"]
    assert "| block schedule | dual_end |" in card and "| Skiparse sparse ratio P | 2 |" in card
    assert "vae=AutoencoderKLWan.from_pretrained" in card  # the usage snippet passes the missing components


def test_existing_output_is_refused_and_overwrite_replaces_it_whole(diffusers_dir, tmp_path, capsys):
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert _export(diffusers_dir, out) == 2
    assert "exists and is not empty; choose a new folder or pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert _export(diffusers_dir, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no build / old folders left behind


@pytest.mark.parametrize("args,message", [
    (["--to", "diffusers", "--vae", "tiny"], "--vae: apply to --to diffusers-pipeline only"),
    (["--to", "diffusers-pipeline", "--flow-shift", "0"], "--flow-shift 0.0: must be > 0"),
    (["--to", "diffusers-pipeline", "--vae", "{empty}"], "neither a vae folder (config.json) nor a diffusers "
                                                          "pipeline folder with vae/"),
    (["--to", "diffusers-pipeline", "--text-encoder", "{wide}"], "d_model=48, but the DiT takes text_dim=32"),
    (["--to", "diffusers-pipeline", "--text-encoder", "tiny", "--tokenizer", "{empty}"],
     "no tokenizer_config.json / tokenizer.json / spiece.model in it"),
    (["--to", "diffusers-pipeline", "--tokenizer", "tiny"], "needs the text encoder and its tokenizer together"),
])
def test_bad_pipeline_arguments_fail_before_writing(diffusers_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    tiny_text_model(48).config.save_pretrained(tmp_path / "wide")  # a umT5 config of the wrong width
    args = [a.format(empty=tmp_path / "empty", wide=tmp_path / "wide") for a in args]
    code = convert.main(["--from", "diffusers", "--input", str(diffusers_dir), "--output", str(tmp_path / "o"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp-*"))


def test_megatron_run_card_records_steps_ema_and_its_sample_shift(diffusers_dir, tmp_path):
    run = tmp_path / "run"
    _worker("ema-checkpoint", diffusers_dir, run)  # torch_dist checkpoint at step 7, EMA = weights x 0.5
    out = tmp_path / "pipe"
    report = _cli("--from", "megatron", "--to", "diffusers-pipeline", "--input", run, "--output", out, "--ema")
    assert report["pipeline"]["flow_shift"] == 5.0 and report["pipeline"]["flow_shift_from"] == "train.sample_shift"
    ema = read_state_dict(out / "transformer")
    src = read_state_dict(diffusers_dir)
    assert all(torch.equal(ema[k], src[k] * 0.5) for k in src)
    card = (out / "README.md").read_text()
    assert _front_matter(card)["library_name"] == "diffusers"
    assert "- optimizer steps: 7" in card and "| weights | EMA |" in card
    assert "- precision recipe: none" in card and "- EMA decay:" in card
