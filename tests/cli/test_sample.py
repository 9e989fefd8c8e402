"""osp-sample: deterministic for a seed, mp4s that decord reads back, json of the settings, SSP / Ulysses
runs under torchrun equal to the single-process run, megatron checkpoints equal to their diffusers source."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from osp_megatron.cli import sample as cli

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--vae", "tiny", "--text-encoder", "tiny", "--steps", "4", "--frames", "9", "--height", "32", "--width", "64",
          "--guidance", "3.0", "--shift", "3.0", "--seed", "7", "--save-latents", "--model", "schedule=dual_end",
          "--model", "num_full_blocks=4"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(args, nproc=1):
    if nproc == 1:
        cmd = [sys.executable, "-m", "osp_megatron.cli.sample", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(_free_port()), "-m", "osp_megatron.cli.sample", *map(str, args)]
    out = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _frames(mp4: Path) -> torch.Tensor:
    import decord

    vr = decord.VideoReader(str(mp4))
    return torch.from_numpy(vr.get_batch(list(range(len(vr)))).asnumpy()).int()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    """A diffusers WanTransformer3DModel folder: 8 blocks (dual_end with 4 full: 2 sparse token + 2 group
    blocks between them), 4 heads, text width 32 = the tiny umT5."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=96, num_layers=8, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    d = tmp_path_factory.mktemp("dit") / "diffusers"
    ref.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def single_run(dit_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    prompts = root / "prompts.txt"
    prompts.write_text("# two prompts\na red square moving right\n\na blue circle\n")
    _run(["--checkpoint", dit_dir, "--prompts", prompts, "--output", root / "out", *COMMON])
    return root / "out", prompts


def test_single_run_writes_mp4_and_settings(single_run):
    out, _ = single_run
    for i, prompt in enumerate(["a red square moving right", "a blue circle"]):
        frames = _frames(out / f"sample_{i:04d}.mp4")
        assert tuple(frames.shape) == (9, 32, 64, 3)
        assert frames.float().std() > 1.0  # an actual picture, not a constant
        meta = json.loads((out / f"sample_{i:04d}.json").read_text())
        assert meta["prompt"] == prompt and meta["seed"] == 7 + i
        assert (meta["steps"], meta["shift"], meta["guidance"], meta["sampler"]) == (4, 3.0, 3.0, "unipc")
        assert meta["schedule"]["kind"] == "unipc_flow_sigmas" and len(meta["schedule"]["sigmas"]) == 5
        assert meta["schedule"]["sigmas"][-1] == 0.0
        assert meta["model"]["schedule"] == "dual_end" and meta["latent_shape"] == [16, 3, 4, 8]
    a, b = (torch.load(out / f"sample_{i:04d}.latents.pt") for i in (0, 1))
    assert not torch.equal(a, b)  # different prompt and seed


def test_same_seed_same_video_other_seed_other_video(single_run, dit_dir, tmp_path):
    out, prompts = single_run
    _run(["--checkpoint", dit_dir, "--prompts", prompts, "--output", tmp_path / "again", *COMMON])
    for i in (0, 1):
        assert torch.equal(torch.load(out / f"sample_{i:04d}.latents.pt"),
                           torch.load(tmp_path / "again" / f"sample_{i:04d}.latents.pt"))
        assert (out / f"sample_{i:04d}.mp4").read_bytes() == (tmp_path / "again" / f"sample_{i:04d}.mp4").read_bytes()
    # seed 8: the file's second prompt (seed 7 + 1) sampled alone is the same video (no batching effects);
    # the first prompt with seed 9 instead of 7 is a different one
    other = [a if a != "7" else "8" for a in COMMON]
    _run(["--checkpoint", dit_dir, "--prompt", "a blue circle", "--prompt", "a red square moving right",
          "--output", tmp_path / "seed8", *other])
    assert torch.equal(torch.load(tmp_path / "seed8" / "sample_0000.latents.pt"),
                       torch.load(out / "sample_0001.latents.pt"))
    assert not torch.equal(torch.load(tmp_path / "seed8" / "sample_0001.latents.pt"),
                           torch.load(out / "sample_0000.latents.pt"))


@pytest.mark.parametrize("degrees", [pytest.param(["--ssp", "2"], id="ssp2"),
                                     pytest.param(["--ulysses", "2"], id="ulysses2", marks=pytest.mark.slow)])
def test_parallel_run_equals_single_run(single_run, dit_dir, tmp_path, degrees):
    from osp_megatron.encoders import load_vae

    out, prompts = single_run
    _run(["--checkpoint", dit_dir, "--prompts", prompts, "--output", tmp_path / "par", *COMMON, *degrees], nproc=2)
    vae = load_vae("tiny")
    for i in (0, 1):
        ref = torch.load(out / f"sample_{i:04d}.latents.pt")
        got = torch.load(tmp_path / "par" / f"sample_{i:04d}.latents.pt")
        assert _rel(got, ref) <= 1e-5
        # decoded videos agree to float precision; the mp4s only on average (H.264 may code a 1-level input
        # difference into a visibly different block, so no per-pixel bound on the encoded files)
        assert (vae.decode(got) - vae.decode(ref)).abs().max() <= 1e-4
        par, single = _frames(tmp_path / "par" / f"sample_{i:04d}.mp4"), _frames(out / f"sample_{i:04d}.mp4")
        assert par.shape == single.shape and (par - single).abs().float().mean() < 2.0
        meta = json.loads((tmp_path / "par" / f"sample_{i:04d}.json").read_text())
        assert meta["parallel"]["world"] == 2


@pytest.mark.slow
def test_megatron_checkpoint_samples_like_its_diffusers_source(single_run, dit_dir, tmp_path):
    out, _ = single_run
    conv = subprocess.run([sys.executable, "-m", "osp_megatron.cli.convert", "--from", "diffusers", "--to", "megatron",
                           "--input", str(dit_dir), "--output", str(tmp_path / "meg"), "--tp", "2"],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert conv.returncode == 0, conv.stderr[-3000:]
    _run(["--checkpoint", tmp_path / "meg", "--prompt", "a red square moving right", "--output", tmp_path / "s",
          *COMMON])
    assert torch.equal(torch.load(tmp_path / "s" / "sample_0000.latents.pt"), torch.load(out / "sample_0000.latents.pt"))
    assert json.loads((tmp_path / "s" / "sample_0000.json").read_text())["format"] == "megatron"


@pytest.mark.slow
def test_ema_weights_of_a_training_checkpoint(dit_dir, tmp_path):
    """`--ema` samples with the `ema.` weights of a torch_dist checkpoint (here: the model weights x 0.5),
    i.e. like the diffusers export of those EMA weights."""
    worker = REPO / "tests" / "cli" / "convert_worker.py"
    made = subprocess.run([sys.executable, str(worker), "ema-checkpoint", str(dit_dir), str(tmp_path / "run")],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    conv = subprocess.run([sys.executable, "-m", "osp_megatron.cli.convert", "--from", "megatron", "--to", "diffusers", "--ema",
                           "--input", str(tmp_path / "run"), "--output", str(tmp_path / "ema_export")],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert conv.returncode == 0, conv.stderr[-3000:]
    args = ["--prompt", "a red square moving right", *COMMON]
    _run(["--checkpoint", tmp_path / "run", "--ema", "--output", tmp_path / "a", *args])
    _run(["--checkpoint", tmp_path / "ema_export", "--output", tmp_path / "b", *args])
    _run(["--checkpoint", tmp_path / "run", "--output", tmp_path / "c", *args])  # raw weights: another video
    a, b, c = (torch.load(tmp_path / d / "sample_0000.latents.pt") for d in "abc")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert json.loads((tmp_path / "a" / "sample_0000.json").read_text())["ema"] is True


def test_osp_next_folder_samples_with_its_schedule_like_our_megatron_format(tmp_path):
    """An OSPNextModel folder (OSP-Next's key names and config, written without project code) is sampled with its
    own dual_end schedule, and equals the same weights converted to our megatron format; the EMA `.pt` of an
    OSP-Next training output (`--ema`) gives the same video when it holds those weights."""
    import osp_next_files as onf

    weights = onf.random_state_dict(5)
    folder = onf.write_folder(tmp_path / "osp_next", weights)
    plain = [a for a in COMMON if a not in ("--model", "schedule=dual_end", "num_full_blocks=4")]
    args = ["--prompt", "a red square moving right", *plain]
    _run(["--checkpoint", folder, "--output", tmp_path / "a", *args])
    meta = json.loads((tmp_path / "a" / "sample_0000.json").read_text())
    assert meta["format"] == "osp-next" and meta["precision"]["recipe"] == "none"
    assert (meta["model"]["schedule"], meta["model"]["num_full_blocks"], meta["model"]["sparse_ratio"]) == (
        "dual_end", 4, 2)
    conv = subprocess.run([sys.executable, "-m", "osp_megatron.cli.convert", "--from", "osp-next", "--to", "megatron",
                           "--input", str(folder), "--output", str(tmp_path / "meg")],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert conv.returncode == 0, conv.stderr[-3000:]
    _run(["--checkpoint", tmp_path / "meg", "--output", tmp_path / "b", *args])
    run = onf.write_training_output(tmp_path / "out", {10: {"model": onf.random_state_dict(6), "ema_model": weights}})
    _run(["--checkpoint", run, "--ema", "--output", tmp_path / "c", *args])
    a, b, c = (torch.load(tmp_path / d / "sample_0000.latents.pt") for d in "abc")
    assert torch.equal(a, b) and torch.equal(a, c)
    assert json.loads((tmp_path / "b" / "sample_0000.json").read_text())["model"]["schedule"] == "dual_end"


@pytest.mark.parametrize("args,message", [
    (["--frames", "10"], "--frames 10: must be 4k+1"),
    (["--width", "40"], "--width 40: must be a positive multiple of 16"),
    (["--ssp", "2"], "launch with torchrun --nproc-per-node 2"),
    (["--model", "num_layers=3"], "--model 'num_layers=3'"),
    (["--guidance", "0.5"], "--guidance 0.5"),
])
def test_bad_arguments_fail_before_loading(tmp_path, capsys, args, message):
    code = cli.main(["--checkpoint", str(tmp_path), "--prompt", "x", "--output", str(tmp_path / "o"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_no_prompts_is_an_error(tmp_path, capsys):
    assert cli.main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "no prompts" in capsys.readouterr().err
