"""osp-sample against the references it claims to reproduce, on the same weights, prompt embeddings and seed:
diffusers' WanPipeline (UniPC flow, shift, CFG, integer timesteps) and OSP-Next's Euler loop (float timesteps,
latents kept in bf16), the latter written out here from OSP-Next's `FlowMatchingScheduler.sample` / `_step`."""
from __future__ import annotations

import json

import pytest
import torch

from osp_megatron.cli import sample as cli
from osp_megatron.diffusion.presets import WAN_NEGATIVE_PROMPT, sample_preset
from osp_megatron.encoders import load_text_encoder

FRAMES, HEIGHT, WIDTH = 9, 32, 48


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A random tiny WanTransformer3DModel (text width 32 = the tiny umT5) saved as a diffusers folder."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(3)
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp("dense") / "transformer"
    ref.save_pretrained(d)
    return d


def _sample(tmp_path, ckpt, *args):
    out = tmp_path / "out"
    code = cli.main(["--checkpoint", str(ckpt), "--output", str(out), "--vae", "tiny", "--text-encoder", "tiny",
                     "--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH), "--save-latents",
                     "--dtype", "fp32", "--device", "cpu", *map(str, args)])
    assert code == 0
    return torch.load(out / "sample_0000.latents.pt"), json.loads((out / "sample_0000.json").read_text())


def _embeds(prompts):
    enc = load_text_encoder("tiny", text_len=512, text_dim=32)
    return enc.encode(list(prompts))


@pytest.mark.parametrize("steps,shift,guidance", [(6, 3.0, 4.0), (4, 7.0, 1.0)])
def test_unipc_equals_wan_pipeline(dense_dir, tmp_path, steps, shift, guidance):
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    prompt, negative, seed = "a red square moving right", "blurry", 11
    got, meta = _sample(tmp_path, dense_dir, "--prompt", prompt, "--negative-prompt", negative, "--sampler", "unipc",
                        "--steps", steps, "--shift", shift, "--guidance", guidance, "--seed", seed)
    assert meta["timesteps"] == "int"
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=shift, num_train_timesteps=1000),
                       transformer=WanTransformer3DModel.from_pretrained(dense_dir).eval())
    pipe.set_progress_bar_config(disable=True)
    want = pipe(prompt_embeds=_embeds([prompt]), negative_prompt_embeds=_embeds([negative]), height=HEIGHT,
                width=WIDTH, num_frames=FRAMES, num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed), output_type="latent").frames
    assert got.shape == want.shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8)
    assert _rel(got, want) <= 1e-5


def _osp_next_euler(model, text, null, shape, steps, shift, guidance, seed, latent_dtype):
    """OSP-Next's loop: fp32 linspace(1, 0, N+1) shifted, timestep = 1000·σ (float), noise from a CPU generator in
    the latent dtype, two model calls for CFG, update in fp32 cast back to the latent dtype."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas.clone() * 1000
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=latent_dtype)
    for i in range(steps):
        t = timesteps[i].expand(shape[0])
        with torch.no_grad():
            cond = model(latents.float(), t, text)
            if guidance > 1.0:
                uncond = model(latents.float(), t, null)
                cond = uncond + guidance * (cond - uncond)
        latents = (latents.to(torch.float32) + cond.to(torch.float32) * (sigmas[i + 1] - sigmas[i])).to(latent_dtype)
    return latents


@pytest.mark.parametrize("latent_dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_euler_equals_osp_next_loop(dense_dir, tmp_path, latent_dtype, tol):
    from osp_megatron.models import build_model
    from osp_megatron.parallel import ParallelState
    from osp_megatron.weights import load_into, open_checkpoint

    prompt, steps = "a blue circle", 5
    flag = "bf16" if latent_dtype == torch.bfloat16 else "fp32"
    got, meta = _sample(tmp_path, dense_dir, "--preset", "osp-next", "--prompt", prompt, "--steps", steps,
                        "--latent-dtype", flag, "--text-dtype", "fp32")
    assert (meta["sampler"], meta["timesteps"], meta["shift"], meta["guidance"], meta["seed"]) == (
        "euler", "float", 7.0, 5.0, 1024)
    assert meta["negative_prompt"] == WAN_NEGATIVE_PROMPT
    ckpt = open_checkpoint(dense_dir)
    model = build_model(ckpt.model, ParallelState.single()).eval()
    load_into(model, ckpt)
    want = _osp_next_euler(model, _embeds([prompt]), _embeds([WAN_NEGATIVE_PROMPT]), tuple(got.shape), steps, 7.0,
                           5.0, 1024, latent_dtype)
    assert _rel(got, want) <= tol


def test_osp_next_preset_and_explicit_flags_win(dense_dir, tmp_path):
    preset = sample_preset("osp-next")
    assert (preset["sampler"], preset["steps"], preset["shift"], preset["guidance"], preset["seed"]) == (
        "euler", 50, 7.0, 5.0, 1024)
    assert (preset["frames"], preset["height"], preset["width"]) == (81, 720, 1280)
    assert preset["latent_dtype"] == preset["text_dtype"] == "bf16"
    out = tmp_path / "o"
    code = cli.main(["--checkpoint", str(dense_dir), "--output", str(out), "--vae", "tiny", "--text-encoder", "tiny",
                     "--preset", "osp-next", "--steps", "2", "--frames", "5", "--height", "16", "--width", "16",
                     "--prompt", "a", "--prompt", "b", "--device", "cpu", "--save-latents"])
    assert code == 0
    metas = [json.loads((out / f"sample_{i:04d}.json").read_text()) for i in (0, 1)]
    assert [m["seed"] for m in metas] == [1024, 1024]  # OSP-Next: one seed for every prompt
    assert metas[0]["steps"] == 2 and metas[0]["latent_dtype"] == "bf16" and metas[0]["text_dtype"] == "bf16"


def test_encoders_are_never_silently_tiny(dense_dir, tmp_path, capsys):
    code = cli.main(["--checkpoint", str(dense_dir), "--output", str(tmp_path / "o"), "--prompt", "x"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--vae: --checkpoint" in err and "--vae tiny" in err
    assert not (tmp_path / "o").exists()


def test_encoders_come_from_a_pipeline_folder_and_explicit_flags_win(tmp_path):
    from types import SimpleNamespace

    pipe = tmp_path / "pipe"
    for sub in ("transformer", "vae", "text_encoder"):
        (pipe / sub).mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    ckpt = SimpleNamespace(format="diffusers")
    args = SimpleNamespace(checkpoint=str(pipe), vae=None, text_encoder=None)
    assert cli.encoder_paths(args, ckpt) == {"vae": str(pipe), "text_encoder": str(pipe)}
    args.vae = "tiny"
    assert cli.encoder_paths(args, ckpt)["vae"] == "tiny"
    (pipe / "text_encoder").rmdir()
    with pytest.raises(cli.SampleError, match="pipeline folder without text_encoder/"):
        cli.encoder_paths(args, ckpt)


def test_precision_hif8_quantizes_a_plain_checkpoint(dense_dir):
    from types import SimpleNamespace

    args = SimpleNamespace(checkpoint=str(dense_dir), format="auto", ema=False, precision="hif8", tp=1, ssp=1,
                           ulysses=1)
    precision = cli.open_dit(args, {})[2]
    assert (precision.recipe, precision.quantize_attention, precision.scale_max_fwd) == ("hif8_current", True, 15.0)
    assert cli.open_dit(SimpleNamespace(**{**vars(args), "precision": "checkpoint"}), {})[2].recipe == "none"
