"""GRPO adapters as PEFT folders with diffusers' module names: diffusers' WanTransformer3DModel + PEFT reproduces the
adapted model, the folder reads back into our names, osp-convert merges it, and every checkpoint carries one
(its EMA as well when the run keeps one)."""
import json

import pytest
import torch

pytest.importorskip("peft")
from diffusers import WanTransformer3DModel  # noqa: E402
from peft import PeftModel  # noqa: E402

from osp_megatron.models import build_model  # noqa: E402
from osp_megatron.models.adapters import diffusers as ad  # noqa: E402
from osp_megatron.parallel import ParallelState  # noqa: E402
from osp_megatron.rl.lora import apply_lora, full_adapters, lora_parameters, merge_lora  # noqa: E402
from osp_megatron.training.ema import unwrap  # noqa: E402
from osp_megatron.weights.lora import read_lora, read_peft_adapter, write_peft_adapter  # noqa: E402

TARGETS = [r"(self_attention|cross_attention)\.linear_(q|k|v|proj)$", r"mlp\.linear_fc[12]$"]


def _pair():
    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6).eval()
    mc = ad.config_from_diffusers(dict(ref.config))
    ours = build_model(mc, ParallelState.single()).eval()
    ours.load_full_state_dict(ad.from_diffusers(ref.state_dict(), mc))
    apply_lora(ours, 4, 8.0, TARGETS, seed=3, init="gaussian")
    with torch.no_grad():
        for p in lora_parameters(ours):
            if p.abs().max() == 0:  # B: away from 0 so the adapters change the output
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    return ref, ours, mc


def test_peft_folder_loads_in_diffusers_and_matches_ours(tmp_path):
    ref, ours, mc = _pair()
    adapters = full_adapters(ours)
    folder = write_peft_adapter(adapters, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and "blocks.0.attn1.to_q" in config["target_modules"]
    assert "blocks.1.ffn.net.0.proj" in config["target_modules"] and "blocks.1.attn2.to_out.0" in config["target_modules"]
    x, t, txt = torch.randn(2, 16, 2, 4, 4), torch.tensor([300.0, 700.0]), torch.randn(2, 8, 32)
    with torch.no_grad():
        base = ref(x, t, txt, return_dict=False)[0]
        peft_model = PeftModel.from_pretrained(ref, str(folder)).eval()
        theirs = peft_model(hidden_states=x, timestep=t, encoder_hidden_states=txt, return_dict=False)[0]
        mine = ours(x, t, txt)
    rel = float((theirs - mine).norm() / mine.norm())
    assert rel <= 1e-5, rel
    assert float((base - mine).norm() / mine.norm()) > 1e-2  # the adapters matter
    # back into our names: same tensors, and merged weights equal the adapted model
    back = read_peft_adapter(folder)
    assert set(back) == set(adapters) and all(torch.equal(back[k], adapters[k]) for k in adapters)
    assert read_lora(str(folder), {}).keys() == back.keys()
    plain = build_model(mc, ParallelState.single()).eval()
    base_sd = {k: v for k, v in ours.state_dict().items() if "lora" not in k and "_extra_state" not in k}
    plain.load_full_state_dict(merge_lora({**base_sd, **back}))
    with torch.no_grad():
        assert float((plain(x, t, txt) - mine).norm() / mine.norm()) <= 1e-5


def test_grpo_checkpoint_carries_peft_adapters_and_export_prefers_the_ema(tmp_path):
    from tests.rl.test_grpo_e2e import make_trainer

    t = make_trainer(tmp_path, layers=2, schedule="full", iterations=2, steps=6, group_size=2,
                     prompts_per_iteration=1, rollout_batch=2, train_batch=2, latent_shape=[1, 4, 4],
                     window=dict(strategy="fixed", size=2), eval_interval=0, lr=1e-2, ema_decay=0.5)
    t.fit(track=False)
    ckpt = tmp_path / "grpo_checkpoints" / "iter_0000002"
    live, ema = read_peft_adapter(ckpt / "adapter"), read_peft_adapter(ckpt / "adapter_ema")
    own = full_adapters(unwrap(t.model))
    assert all(torch.equal(live[k], own[k]) for k in own)
    assert all(torch.equal(ema[k], v) for k, v in t.ema.tensors().items())
    default = read_lora(str(tmp_path), {})  # a run dir: latest checkpoint, its EMA
    assert all(torch.equal(default[k], ema[k]) for k in ema)
    assert all(torch.equal(read_lora(str(tmp_path), {}, ema=False)[k], live[k]) for k in live)
