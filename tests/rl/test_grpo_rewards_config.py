"""Reward interface, user reward loading by path, multi-reward, and `grpo:` config validation."""
import textwrap

import pytest
import torch

from osp_megatron.config import ConfigError, load_config
from osp_megatron.config import GRPOConfig, RewardSpec, parse_section
from osp_megatron.rl.rewards import Brightness, Colourfulness, LatentPreviewDecoder, MultiReward, TargetColour, load_reward


def solid(rgb, b=2, t=3, h=4, w=5):
    """Video of one colour; rgb in [0, 1] -> values in [-1, 1]."""
    v = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1, 1) * 2 - 1
    return v.expand(b, 3, t, h, w).clone()


def test_builtin_rewards_on_known_videos():
    white, black, red = solid([1, 1, 1]), solid([0, 0, 0]), solid([1, 0, 0])
    assert torch.allclose(Brightness()(white, ["a", "b"]), torch.ones(2))
    assert torch.allclose(Brightness()(black, ["a", "b"]), torch.zeros(2))
    assert torch.allclose(TargetColour([1, 0, 0])(red, ["a", "b"]), torch.ones(2))
    assert torch.allclose(TargetColour([1, 0, 0])(solid([0, 1, 1]), ["a", "b"]), torch.zeros(2))
    # colourfulness of a flat grey video is 0; of flat red: 0.3*sqrt(1 + 0.25)
    assert torch.allclose(Colourfulness()(solid([0.5, 0.5, 0.5]), ["", ""]), torch.zeros(2))
    assert torch.allclose(Colourfulness()(red, ["", ""]), torch.full((2,), 0.3 * 1.25 ** 0.5))
    with pytest.raises(ValueError, match=r"\[b, 3, T, H, W\]"):
        Brightness()(torch.zeros(2, 4, 1, 1, 1), ["", ""])


def test_user_reward_from_file_and_module(tmp_path, monkeypatch):
    f = tmp_path / "my_scorer.py"
    f.write_text(textwrap.dedent("""
        import torch
        class PromptLength:
            name = "prompt_len"
            def __init__(self, scale=1.0):
                self.scale = scale
            def __call__(self, videos, prompts):
                return [self.scale * len(p) for p in prompts]
        class Bad:
            def __call__(self, videos, prompts):
                return [1.0]
    """))
    r = load_reward(RewardSpec(name="", path=f"{f}:PromptLength", kwargs={"scale": 2.0}))
    assert r.name == "prompt_len"
    assert torch.equal(r(torch.zeros(2, 3, 1, 2, 2), ["ab", "abcd"]), torch.tensor([4.0, 8.0]))
    monkeypatch.syspath_prepend(str(tmp_path))
    r2 = load_reward(RewardSpec(name="len", path="my_scorer:PromptLength"))
    assert r2.name == "len" and r2(torch.zeros(1, 3, 1, 2, 2), ["abc"]).item() == 3.0
    bad = load_reward(RewardSpec(name="bad", path=f"{f}:Bad"))
    with pytest.raises(ValueError, match="one score per video"):
        bad(torch.zeros(2, 3, 1, 2, 2), ["a", "b"])
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        load_reward(RewardSpec(path=f"{f}:Nope"))
    with pytest.raises(FileNotFoundError):
        load_reward(RewardSpec(path=str(tmp_path / "missing.py")))
    with pytest.raises(ValueError, match="not built in"):
        load_reward(RewardSpec(name="hps_v2"))


def test_multi_reward_names_and_weights():
    m = MultiReward([RewardSpec("brightness", 1.0), RewardSpec("brightness", 2.0),
                     RewardSpec("target_colour", 1.0, kwargs={"rgb": [0, 0, 1]})])
    out = m(solid([0, 0, 1]), ["x", "y"])
    assert list(out) == ["brightness", "brightness_2", "target_colour"]
    assert m.weights == {"brightness": 1.0, "brightness_2": 2.0, "target_colour": 1.0}
    assert torch.allclose(out["target_colour"], torch.ones(2))


def test_preview_decoder_shape_and_range():
    d = LatentPreviewDecoder(16, seed=0)
    v = d(torch.randn(2, 16, 3, 4, 4) * 10)
    assert v.shape == (2, 3, 3, 4, 4) and v.abs().max() <= 1


# ------------------------------------------------------------------------------------------ config
def test_defaults_are_mixgrpo():
    g = parse_section(GRPOConfig, {})
    assert (g.steps, g.shift, g.eta, g.window.size, g.group_size, g.clip_range, g.adv_clip_max) == (
        25, 3.0, 0.7, 4, 12, 1e-4, 5.0)


def test_validation_names_fields_and_fixes():
    with pytest.raises(ConfigError) as exc:
        parse_section(GRPOConfig, {"window": {"size": 30, "strategy": "sliding"}, "group_size": 1, "noise_level": "x",
                               "flash": {"enabled": True, "compression": 2.0}, "reward_mix": "sum",
                               "latent_shape": [1, 7, 8]})
    msg = str(exc.value)
    for field in ("grpo.window.size=30", "grpo.window.strategy='sliding'", "grpo.group_size=1", "grpo.noise_level='x'",
                  "grpo.flash.compression=2.0", "grpo.reward_mix='sum'", "grpo.latent_shape"):
        assert field in msg, field
    with pytest.raises(ConfigError, match=r"grpo.window: unknown field\(s\) \['sise'\]"):
        parse_section(GRPOConfig, {"window": {"sise": 4}})
    with pytest.raises(ConfigError, match="grpo.lr: expected a number"):
        parse_section(GRPOConfig, {"lr": "fast"})


def test_from_yaml_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {size: tiny}\ngrpo:\n  steps: 10\n  window: {size: 3}\n  rewards:\n"
                 "    - {name: brightness, weight: 2}\n")
    cfg = load_config(p, ["grpo.window.strategy=fixed", "grpo.lr=1e-3"])
    g = cfg.grpo
    assert g.steps == 10 and g.window.size == 3 and g.window.strategy == "fixed" and g.lr == 1e-3
    assert g.rewards[0].name == "brightness" and g.rewards[0].weight == 2.0
    with pytest.raises(ConfigError, match="grpoo"):
        load_config(p, ["grpoo.steps=3"])
