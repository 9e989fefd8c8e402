"""osp-convert: bitwise round trips diffusers <-> wan <-> megatron, TP2 -> diffusers -> TP1 equal outputs,
EMA and LoRA export, dtype, --check catching a bad conversion, argument errors before any work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from osp_megatron.models.adapters import diffusers as ad
from osp_megatron.cli import convert
from osp_megatron.weights import read_state_dict

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("convert_worker.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _cli(*args, expect=0):
    """osp-convert in its own process (megatron's process groups stay out of the test process)."""
    out = subprocess.run([sys.executable, "-m", "osp_megatron.cli.convert", *map(str, args)], env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == expect, f"osp-convert {' '.join(map(str, args))} -> {out.returncode}\n{out.stderr[-4000:]}"
    return json.loads(out.stdout) if expect == 0 else out.stderr


def _worker(*args):
    out = subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    """A real diffusers WanTransformer3DModel (4 blocks, 4 heads) saved with diffusers' own writer."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=96, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
    with torch.no_grad():  # diffusers zero-inits some tensors: make every weight informative
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    d = tmp_path_factory.mktemp("conv") / "diffusers"
    ref.save_pretrained(d)
    return d


def _same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_diffusers_wan_round_trip_is_bitwise_with_sharded_files(diffusers_dir, tmp_path):
    assert convert.main(["--from", "diffusers", "--to", "wan", "--input", str(diffusers_dir), "--output",
                         str(tmp_path / "wan"), "--max-shard-size", "100K"]) == 0
    wan = tmp_path / "wan"
    assert (wan / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(wan.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    wan_sd = read_state_dict(wan)
    assert "blocks.0.self_attn.q.weight" in wan_sd and "blocks.0.norm3.weight" in wan_sd  # Wan's own names
    assert json.loads((wan / "config.json").read_text())["dim"] == 64
    assert convert.main(["--from", "wan", "--to", "diffusers", "--input", str(wan), "--output",
                         str(tmp_path / "back")]) == 0
    _same(read_state_dict(diffusers_dir), read_state_dict(tmp_path / "back"))


@pytest.mark.slow
def test_megatron_tp2_to_diffusers_to_megatron_tp1_identical(diffusers_dir, tmp_path):
    tp2, exported, tp1 = tmp_path / "tp2", tmp_path / "exported", tmp_path / "tp1"
    rep = _cli("--from", "diffusers", "--to", "megatron", "--input", diffusers_dir, "--output", tp2, "--tp", 2,
               "--check")
    assert rep["layout"]["tp"] == 2 and rep["check"]["ok"], rep
    assert rep["check"]["reference"].startswith("diffusers"), rep  # checked against diffusers' own model
    assert rep["check"]["rel"] <= 1e-5
    assert (tp2 / "latest").read_text().strip() == "step_0000000"
    assert (tp2 / "step_0000000" / "osp_checkpoint.json").is_file()  # completion marker of training checkpoints
    _cli("--from", "megatron", "--to", "diffusers", "--input", tp2, "--output", exported)
    _same(read_state_dict(diffusers_dir), read_state_dict(exported))  # TP2 shards joined bitwise
    _cli("--from", "diffusers", "--to", "megatron", "--input", exported, "--output", tp1, "--tp", 1)
    # a: the TP2 checkpoint run by 2 ranks (gloo); b: the TP1 checkpoint; c: TP2 resharded to TP1 on load
    _worker("forward", tmp_path, tp2, tp1)
    a, b, c = (torch.load(tmp_path / n) for n in ("a.pt", "b.pt", "c.pt"))
    assert torch.equal(b, c)  # same weights, same layout: bitwise
    assert ((a - b).norm() / b.norm()).item() <= 1e-5  # TP2 vs TP1 (reduction order only)


def test_ema_lora_and_dtype_export(diffusers_dir, tmp_path):
    ckpt = tmp_path / "run"
    _worker("ema-checkpoint", diffusers_dir, ckpt)
    base = read_state_dict(diffusers_dir)
    # LoRA for one column-parallel (q) and one row-parallel (out proj) linear, stored as 2 TP shards the way
    # osp-grpo writes them (column: B split on out; row: A split on in)
    g = torch.Generator().manual_seed(1)
    q, o = "blocks.1.self_attention.linear_q", "blocks.2.self_attention.linear_proj"
    full = {f"{q}.lora_A": torch.randn(4, 64, generator=g), f"{q}.lora_B": torch.randn(64, 4, generator=g),
            f"{o}.lora_A": torch.randn(4, 64, generator=g), f"{o}.lora_B": torch.randn(64, 4, generator=g),
            f"{q}.lora_scaling": torch.tensor(2.0), f"{o}.lora_scaling": torch.tensor(0.5)}
    lora_dir = tmp_path / "grpo" / "grpo_checkpoints" / "iter_0000003"
    lora_dir.mkdir(parents=True)
    (lora_dir.parent / "latest").write_text("iter_0000003\n")
    for r in range(2):
        shard = {f"module.{q}.lora_A": full[f"{q}.lora_A"], f"module.{q}.lora_B": full[f"{q}.lora_B"].chunk(2, 0)[r],
                 f"module.{o}.lora_A": full[f"{o}.lora_A"].chunk(2, 1)[r], f"module.{o}.lora_B": full[f"{o}.lora_B"],
                 f"module.{q}.lora_scaling": full[f"{q}.lora_scaling"],
                 f"module.{o}.lora_scaling": full[f"{o}.lora_scaling"]}
        torch.save({"lora": shard, "optimizer": {}}, lora_dir / f"lora_tp{r:02d}.pt")
    _cli("--from", "megatron", "--to", "diffusers", "--input", ckpt, "--output", tmp_path / "ema", "--ema",
         "--lora", tmp_path / "grpo", "--dtype", "bf16", "--check")
    got = read_state_dict(tmp_path / "ema")
    ours = ad.from_diffusers(base, ad.config_from_diffusers(json.loads((diffusers_dir / "config.json").read_text())))
    ema = {k: v * 0.5 for k, v in ours.items()}
    for name in (q, o):
        a, b, s = full[f"{name}.lora_A"], full[f"{name}.lora_B"], float(full[f"{name}.lora_scaling"])
        ema[f"{name}.weight"] = ema[f"{name}.weight"] + s * (b @ a)
    want = ad.to_diffusers({k: v.to(torch.bfloat16) for k, v in ema.items()},
                           ad.config_from_diffusers(json.loads((diffusers_dir / "config.json").read_text())))
    _same(want, got)
    # without --ema: the raw weights, untouched
    _cli("--from", "megatron", "--to", "diffusers", "--input", ckpt, "--output", tmp_path / "raw")
    _same(base, read_state_dict(tmp_path / "raw"))


def test_check_fails_on_a_wrong_conversion(diffusers_dir, tmp_path, monkeypatch, capsys):
    real = ad.to_diffusers

    def broken(sd, mc):  # swap q and k of one block: shapes fit, numbers do not
        out = real(sd, mc)
        out["blocks.0.attn1.to_q.weight"], out["blocks.0.attn1.to_k.weight"] = (
            out["blocks.0.attn1.to_k.weight"], out["blocks.0.attn1.to_q.weight"])
        return out

    monkeypatch.setattr(ad, "to_diffusers", broken)
    code = convert.main(["--from", "diffusers", "--to", "diffusers", "--input", str(diffusers_dir), "--output",
                         str(tmp_path / "bad"), "--check"])
    assert code == 1
    assert "--check failed" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--to", "wan", "--tp", "2"], "apply to --to megatron only"),
    (["--to", "wan", "--ema"], "EMA weights exist only in megatron"),
    (["--to", "megatron", "--tp", "3"], "must divide the 4 attention heads"),
    (["--to", "megatron", "--ssp", "3"], "must divide P^2"),
    (["--to", "wan", "--model", "num_layers=3"], "--model 'num_layers=3'"),
    (["--to", "wan", "--model", "schedule=weird"], "model.schedule"),
])
def test_bad_arguments_fail_fast_with_the_fix(diffusers_dir, tmp_path, capsys, args, message):
    code = convert.main(["--from", "diffusers", "--input", str(diffusers_dir), "--output", str(tmp_path / "o"),
                         *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_refuses_non_empty_output_and_wrong_format(diffusers_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert convert.main(["--from", "diffusers", "--to", "wan", "--input", str(diffusers_dir), "--output",
                         str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert convert.main(["--from", "wan", "--to", "diffusers", "--input", str(diffusers_dir), "--output",
                         str(tmp_path / "p")]) == 2
    assert "use --from diffusers" in capsys.readouterr().err
