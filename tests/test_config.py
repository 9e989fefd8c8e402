"""The one config tree: strict parsing (unknown keys with the closest valid one, integers, finite numbers,
duplicate YAML keys), one place for model x layout invariants, the generated reference, dry runs."""
import subprocess
import sys
from pathlib import Path

import pytest

from osp_megatron.config import (
    Config,
    ConfigError,
    GRPOConfig,
    ModelConfig,
    ParallelConfig,
    layout_errors,
    load_config,
    parse_section,
)

ROOT = Path(__file__).resolve().parents[1]


def _error(overrides, path=None):
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides).validate()
    return str(exc.value)


def test_misspelt_sections_and_keys_name_the_closest_valid_key(tmp_path):
    msg = _error(["trian.steps=5"])
    assert "unknown field(s) ['trian']" in msg and "did you mean `train`" in msg
    msg = _error(["train.stpes=5", "grpo.window.sise=3"])
    assert "train: unknown field(s) ['stpes']" in msg and "`steps`" in msg
    assert "grpo.window: unknown field(s) ['sise']" in msg and "`size`" in msg
    y = tmp_path / "c.yaml"
    y.write_text("modle:\n  size: wan_14b\n")
    with pytest.raises(ConfigError, match="did you mean `model`"):
        load_config(y)


def test_integers_are_integers_and_numbers_are_finite():
    assert "train.steps: expected an integer, got 2.9" in _error(["train.steps=2.9"])
    assert load_config(None, ["train.steps=3.0", "train.warmup_steps=1e2"]).train.warmup_steps == 100
    for bad in ("train.lr=.nan", "train.clip_grad=.inf", "data.fps=.nan", "train.weight_decay=.nan"):
        assert "must be a finite number" in _error([bad]), bad
    assert "train.adam_eps=-1.0: must be > 0" in _error(["train.adam_eps=-1"])
    assert "model.num_attention_heads=0: must be >= 1" in _error(["model.num_attention_heads=0"])
    msg = _error(["model.size=huge", "train.lr_schedule=cosin"])  # every problem at once
    assert "model.size='huge'" in msg and "did you mean `cosine`" in msg


def test_duplicate_yaml_sections_and_broken_yaml_are_errors(tmp_path):
    y = tmp_path / "dup.yaml"
    y.write_text("train:\n  steps: 300\nmodel:\n  size: tiny\ntrain:\n  lr: 1e-3\n")
    with pytest.raises(ConfigError, match="key `train` appears twice"):
        load_config(y)
    y.write_text("train: [steps: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(y)


def test_layout_invariants_live_in_one_place():
    wan13 = ModelConfig(size="wan_1_3b")
    # 12 heads at CP 8 (SSP 4 x Ulysses 2): full blocks run Ulysses over gcd(12, 8) = 4 ranks, as OSP-Next does
    assert layout_errors(wan13, ParallelConfig(ssp=4, ulysses=2)) == []
    # ... but not with TP sequence parallelism (6 heads per TP rank over CP 4)
    sp = ParallelConfig(tensor_parallel=2, sequence_parallel=True, ssp=4)
    errors = layout_errors(wan13, sp)
    assert len(errors) == 1 and "gcd(6, 4)" in errors[0] and "sequence_parallel" in errors[0], errors
    # heads not divisible by TP x Ulysses are refused for the sparse blocks
    assert any("must divide the 12 attention heads" in e for e in layout_errors(wan13, ParallelConfig(ulysses=8)))
    assert layout_errors(wan13, ParallelConfig(ssp=4)) == []
    assert any("does not divide P^2=4" in e for e in layout_errors(wan13, ParallelConfig(ssp=3)))
    assert any("does not divide model.num_layers=30" in e for e in layout_errors(wan13, ParallelConfig(pipeline_parallel=4)))
    # building a model refuses the same layout, naming the same rule
    from osp_megatron.models.transformer_config import make_osp_config

    with pytest.raises(ConfigError, match=r"gcd\(6, 4\)"):
        make_osp_config(wan13, sp)


def test_building_a_model_does_not_validate_the_data_section():
    import torch

    from osp_megatron.models import build_model
    from osp_megatron.parallel import ParallelState

    cfg = Config()  # data.shards is empty: fine for building a model
    model = build_model(cfg.model, ParallelState.single(), precision=cfg.precision, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) > 0
    with pytest.raises(ConfigError, match="data.shards is empty"):
        cfg.validate()


def test_grpo_is_a_typed_section():
    cfg = load_config(ROOT / "configs" / "grpo_demo_cpu.yaml", ["grpo.window.size=2"])
    assert isinstance(cfg.grpo, GRPOConfig) and cfg.grpo.window.size == 2
    assert parse_section(GRPOConfig, {"steps": 10}).steps == 10
    with pytest.raises(ConfigError, match="grpo.steps=1: must be >= 2"):
        parse_section(GRPOConfig, {"steps": 1})


def test_every_key_is_documented_and_the_reference_is_current():
    from osp_megatron.config.reference import config_reference, undocumented

    assert undocumented() == []
    assert (ROOT / "docs" / "config.md").read_text() == config_reference(), \
        "docs/config.md is stale: python -m osp_megatron.config.reference > docs/config.md"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "osp_megatron.cli.train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


def test_dry_run_names_typos_and_missing_inputs_and_takes_a_world_size(tmp_path):
    r = _cli("configs/demo_cpu.yaml", "trian.steps=5", "--dry-run", "--world-size", "2")
    assert r.returncode == 2 and "trian" in r.stderr, r.stderr
    r = _cli("configs/demo_cpu.yaml", f"data.shards={tmp_path / 'nope'}", "--dry-run", "--world-size", "2")
    assert r.returncode == 2 and "data.shards=" in r.stderr and "does not exist" in r.stderr, r.stderr
    (tmp_path / "shards").mkdir()
    r = _cli("configs/demo_cpu.yaml", f"data.shards={tmp_path / 'shards'}", "--dry-run", "--world-size", "2")
    assert r.returncode == 0 and "world size 2 = TP 1 x CP 2" in r.stdout, r.stderr
    r = _cli("configs/demo_cpu.yaml", f"data.shards={tmp_path / 'shards'}", "--dry-run", "--world-size", "3")
    assert r.returncode == 2 and "world size 3 is not divisible" in r.stderr
    r = _cli("--help-config")
    assert r.returncode == 0 and "| `train.lr` | float |" in r.stdout
