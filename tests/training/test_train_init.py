"""Sparse fine-tune initialisation: dense Wan2.1 weights (diffusers folder, diffusers pipeline folder or original
layout) and OSP-Next's own format load into a dual_end OSP-Next through `train.init_from`, and a megatron run
directory works as a source too."""
import json
import math

import pytest

import torch
import yaml
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from osp_megatron.config import ModelConfig
from osp_megatron.models.adapters.diffusers import diffusers_config, from_diffusers
from osp_megatron.models.adapters.wan import to_wan
import osp_next_files
from train_launch import metrics, run_world

CFG = {
    "model": {"size": "tiny", "schedule": "dual_end", "num_full_blocks": 4},
    "data": {"kind": "synthetic", "synthetic_latent_shape": [16, 2, 8, 8], "text_len": 8, "micro_batch_size": 1,
             "num_workers": 0},
    "train": {"steps": 1, "lr": 1e-4, "log_interval": 1},
    "tracking": {"backend": "none"},
}


@pytest.mark.slow
def test_init_from_diffusers_wan_and_megatron(tmp_path):
    mc = ModelConfig(size="tiny", schedule="full")
    torch.manual_seed(3)
    dense = WanTransformer3DModel(**{k: v for k, v in diffusers_config(mc).items() if k != "_class_name"})
    dense.save_pretrained(tmp_path / "diffusers")
    ours = from_diffusers(dense.state_dict(), mc)
    (tmp_path / "wan").mkdir()
    save_file({k: v.contiguous() for k, v in to_wan(ours, mc).items()}, str(tmp_path / "wan" / "model.safetensors"))
    # a diffusers pipeline folder (model_index.json + transformer/) and an OSP-Next folder of the same weights
    dense.save_pretrained(tmp_path / "pipeline" / "transformer")
    (tmp_path / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    osp_next_files.write_folder(tmp_path / "osp-next", to_wan(ours, mc))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))

    losses = {}
    for name, extra in {
        "diffusers": [f"train.init_from={tmp_path / 'diffusers'}"],
        "wan": [f"train.init_from={tmp_path / 'wan'}"],  # auto: no diffusers config.json -> original Wan layout
        "pipeline": [f"train.init_from={tmp_path / 'pipeline'}"],
        "osp-next": [f"train.init_from={tmp_path / 'osp-next'}"],
        "scratch": [],
    }.items():
        run = tmp_path / f"run_{name}"
        logs = tmp_path / f"logs_{name}"
        assert run_world(1, str(cfg), [f"train.run_dir={run}", *extra], logs) == [0], \
            (logs / "rank0.0.log").read_text()[-3000:]
        if extra:
            fmt = "diffusers" if name == "pipeline" else name
            assert f"initialised weights from {tmp_path / name} ({fmt})" in (logs / "rank0.0.log").read_text()
        losses[name] = metrics(run)[0]["loss"]
    assert losses["diffusers"] == losses["wan"]  # same weights through both adapters
    assert losses["pipeline"] == losses["diffusers"] and losses["osp-next"] == losses["wan"]
    assert losses["diffusers"] != losses["scratch"]

    # a megatron run directory (its `latest` checkpoint) as the init source of a new run
    logs = tmp_path / "logs_megatron"
    run = tmp_path / "run_megatron"
    assert run_world(1, str(cfg), [f"train.run_dir={run}", f"train.init_from={tmp_path / 'run_diffusers'}"],
                     logs) == [0]
    assert "(megatron)" in (logs / "rank0.0.log").read_text()
    assert math.isfinite(metrics(run)[0]["loss"])
