"""Every checkpoint format once: find (`latest`), detect, read the model config, read the weights, load them
into a (TP/PP-sharded) model, write them.

    ckpt = open_checkpoint("Wan2.1-T2V-1.3B-Diffusers")      # Checkpoint(format="diffusers", model=ModelConfig...)
    model = build_model(ckpt.model, parallel)
    load_into(model, ckpt)                                    # or load_into(model, path, ema=True, ...)
    write_weights(read_weights(ckpt), ckpt.model, "out", "osp-next")

Formats: megatron (torch_dist), diffusers (incl. pipeline folders), wan (original Wan2.1), osp-next (OSP-Next's
OSPNextModel folders and training checkpoints); see `formats`. Parts: `paths` (the `latest` pointer and
checkpoint-dir resolution), `files` (safetensors incl. sharded indexes, .pt/.pth with weights_only), `megatron`
(torch_dist read/write), `lora` (osp-grpo adapters), `check` (compare two conversions on one input).
"""
from osp_megatron.weights.files import StateDict, read_state_dict, save_safetensors_dir
from osp_megatron.weights.formats import (
    EMA_FORMATS,
    FORMATS,
    LAYOUT_KEY,
    Checkpoint,
    detect_format,
    layout_fields,
    load_into,
    open_checkpoint,
    read_weights,
    write_weights,
)
from osp_megatron.weights.paths import LATEST, WeightsError, find_checkpoint_dir, read_latest

__all__ = [
    "Checkpoint", "EMA_FORMATS", "FORMATS", "LATEST", "LAYOUT_KEY", "StateDict", "WeightsError", "detect_format",
    "find_checkpoint_dir", "layout_fields", "load_into", "open_checkpoint", "read_latest", "read_state_dict",
    "read_weights", "save_safetensors_dir", "write_weights",
]
