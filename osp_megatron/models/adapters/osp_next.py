"""OSP-Next's released format (`OSPNextModel.save_pretrained` folders) <-> ours.

What OSP-Next (github.com/PKU-YuanGroup/OSP-Next, package `ospnext/`) writes and reads, as used here:

* Folder. `convert_to_diffusers_weights.py` builds `OSPNextModel(**config)`, loads an original Wan-layout state
  dict into it and calls diffusers' `save_pretrained`: `config.json` + `diffusion_pytorch_model.safetensors`
  (shards + `diffusion_pytorch_model.safetensors.index.json` when large). `infer/infer_osp.py` and
  `train/train_osp.py` read it back with `OSPNextModel.from_pretrained(model_config.pretrained_model_dir_or_checkpoint)`.
* config.json: the `@register_to_config` arguments of `OSPNextModel.__init__` (`ospnext/modules/osp_next.py`):
  `_class_name: "OSPNextModel"`, `model_type` ("t2v"), `text_len` (512), `in_dim`, `dim`, `ffn_dim`, `freq_dim`,
  `out_dim`, `num_heads`, `num_layers`, `eps`, `skiparse_model_type` ("full" | "dual_end"), `sparse_ratio` (P),
  `num_full_blocks`, `quant` (null | "hif8"), `quant_attn` (null | "hif8"), `scale_max_forward` (15.0),
  `scale_max_backward` (224.0). Not stored (`ignore_for_config`): `patch_size` (1, 2, 2), `text_dim` (4096),
  `qk_norm`, `cross_attn_norm` (both True), `window_size`; diffusers' loader drops them even when present, so we
  write `text_dim` only when it differs from 4096 (tiny test models) and read it when present.
* Schedule (`OSPNextModel.__init__`): `full` forces sparse_ratio 1 and all blocks dense; `dual_end` asserts
  num_layers even, num_full_blocks even, <= num_layers / 2 and (when > 0) divisible by 4, with full blocks
  [0, nf/2) and [L - nf/2, L), sparse blocks token-wise at even and group-wise at odd indices. Any other value
  raises there (TorchDiff's `uniform` and Skiparse-1D are not in the released code): we refuse them too.
* Weights: Wan2.1's original parameter names (`ospnext/modules/osp_next.py` OSPNextAttentionBlock /
  OSPNextSelfAttention, `ospnext/modules/want2v.py` Head): `patch_embedding.{weight [dim, in_dim, 1, 2, 2],
  bias}` (Conv3d), `text_embedding.{0,2}.*`, `time_embedding.{0,2}.*`, `time_projection.1.*`,
  `blocks.N.{self_attn,cross_attn}.{q,k,v,o}.{weight,bias}`, `blocks.N.{self_attn,cross_attn}.norm_{q,k}.weight`,
  `blocks.N.norm3.{weight,bias}`, `blocks.N.ffn.{0,2}.{weight,bias}`, `blocks.N.modulation [1, 6, dim]`,
  `head.head.{weight,bias}`, `head.modulation [1, 2, dim]` (norm1/norm2/head.norm have no affine weights).
  `HIF8Linear` (`ospnext/modules/hif8_linear.py`) subclasses nn.Linear without extra state, so HiF8 checkpoints
  have the same keys. The key map is therefore `adapters.wan`'s.
* Training checkpoints (`ospnext/distributed/checkpoint.py`): `<output_dir>/iter_XXXXXXXXX/model_state_dict.pt`
  and `ema_model_state_dict.pt` (full state dicts in the same names, `torch.save`, read with
  `weights_only=True`), newest = largest iteration; `train/train_osp.py` dumps the run config to
  `<output_dir>/config.yaml`, whose `model_config:` section holds the same fields as config.json (the released
  `configs/{train,infer}/{gpu,npu}/osp_*.yaml` show them; `configs/*/npu/osp_hif8_*.yaml` add the quant fields).

HiF8 (`precision_from_osp_next`): `quant: hif8` -> `precision.recipe=hif8_current` (OSP-Next scales every call
by `scale_max / amax`: current scaling), `quant_attn: hif8` -> `precision.quantize_attention=true`,
`scale_max_forward` / `scale_max_backward` -> `precision.scale_max_fwd` / `scale_max_bwd`; on export both HiF8
recipes (current, delayed) write `quant: hif8`. OSP-Next quantizes every block; `precision.bf16_first_blocks/bf16_last_blocks` have no OSP-Next field and are not exported.
"""
from __future__ import annotations

from typing import Any, Dict

from osp_megatron.config import updated
from osp_megatron.models.adapters import wan
from osp_megatron.models.adapters.common import StateDict, export_state_dict, import_state_dict

CLASS_NAME = "OSPNextModel"
SCHEDULES = ("full", "dual_end")  # skiparse_model_type values of the released code
DEFAULT_TEXT_DIM = 4096
HIF8_RECIPES = ("hif8_current", "hif8_delayed")


def is_osp_next_config(config: Dict[str, Any]) -> bool:
    return config.get("_class_name") == CLASS_NAME or "skiparse_model_type" in config


def config_from_osp_next(config: Dict[str, Any]):
    """OSP-Next config.json (or a yaml `model_config:` section) -> ModelConfig with its layout schedule.
    Raises ValueError naming the field for what the released code does not build."""
    if config.get("model_type", "t2v") != "t2v":
        raise ValueError(f"OSP-Next model_type={config.get('model_type')!r}: only t2v checkpoints are supported")
    if config.get("skiparse_1d") or config.get("skiparse_2d") is False:
        raise ValueError("OSP-Next skiparse_1d=true: Skiparse-1D is not supported (only the released Skiparse-2D)")
    if config.get("num_register_tokens"):
        raise ValueError(f"OSP-Next num_register_tokens={config['num_register_tokens']}: register tokens are not "
                         "supported (the released model has none)")
    kind = config.get("skiparse_model_type", "full")
    if kind not in SCHEDULES:
        raise ValueError(f"OSP-Next skiparse_model_type={kind!r}: the released OSPNextModel builds only "
                         f"{' / '.join(SCHEDULES)}")
    dense = wan.config_from_wan({
        "num_heads": config["num_heads"], "dim": config["dim"], "ffn_dim": config["ffn_dim"],
        "num_layers": config["num_layers"], "in_dim": config.get("in_dim", 16), "out_dim": config.get("out_dim", 16),
        "text_dim": config.get("text_dim", DEFAULT_TEXT_DIM), "freq_dim": config.get("freq_dim", 256),
        "patch_size": list(config.get("patch_size", [1, 2, 2])), "eps": config.get("eps", 1e-6),
    })
    if kind == "full":
        return dense
    return updated(dense, {"schedule": kind, "sparse_ratio": int(config.get("sparse_ratio", 1)),
                           "num_full_blocks": int(config.get("num_full_blocks", 0))}, "model")


def precision_from_osp_next(config: Dict[str, Any]) -> Dict[str, Any]:
    """The PrecisionConfig fields an OSP-Next config implies ({} for an unquantized model)."""
    quant, attn = config.get("quant"), config.get("quant_attn")
    for name, value in (("quant", quant), ("quant_attn", attn)):
        if value not in (None, "hif8"):
            raise ValueError(f"OSP-Next {name}={value!r}: the released code knows null and 'hif8' only")
    if quant is None and attn is None:
        return {}
    if quant is None:
        raise ValueError("OSP-Next quant_attn='hif8' with quant=null (HiF8 attention, unquantized linears) has no "
                         "counterpart here: precision.quantize_attention applies together with a HiF8 recipe")
    return {"recipe": "hif8_current", "quantize_attention": attn == "hif8",
            "scale_max_fwd": float(config.get("scale_max_forward", 15.0)),
            "scale_max_bwd": float(config.get("scale_max_backward", 224.0))}


def osp_next_config(model_config, precision=None) -> Dict[str, Any]:
    """ModelConfig (+ PrecisionConfig) -> the config.json OSP-Next's `OSPNextModel.from_pretrained` accepts.
    Raises ValueError for a schedule or setting OSP-Next's constructor refuses (never written silently dense)."""
    d = model_config.resolve()
    L, nf = d.num_layers, d.num_full_blocks
    if model_config.schedule not in SCHEDULES:
        raise ValueError(f"model.schedule={model_config.schedule!r}: OSP-Next's released OSPNextModel builds only "
                         f"{' / '.join(SCHEDULES)}; export to diffusers/wan (the schedule travels in _osp_model) or "
                         "megatron instead")
    if model_config.schedule == "dual_end":
        problems = [text for bad, text in (
            (L % 2, f"num_layers={L} must be even"),
            (nf % 2 or nf > L // 2, f"num_full_blocks={nf} must be even and <= num_layers / 2"),
            (nf and nf % 4, f"num_full_blocks={nf} must be divisible by 4"),
            (nf and not nf // 2 < L - nf // 2 - 1, f"num_full_blocks={nf} leaves no sparse block"),
        ) if bad]
        if problems:
            raise ValueError("OSP-Next's OSPNextModel refuses this dual_end layout: " + "; ".join(problems))
    if d.rope_theta != 10000.0 or list(d.patch_size) != [1, 2, 2]:
        raise ValueError("OSP-Next fixes rope_theta=10000 and patch_size=[1, 2, 2]; this model differs")
    out: Dict[str, Any] = {
        "_class_name": CLASS_NAME, "model_type": "t2v", "text_len": 512, "in_dim": d.in_channels,
        "dim": d.hidden_size, "ffn_dim": d.ffn_hidden_size, "freq_dim": d.freq_dim, "out_dim": d.out_channels,
        "num_heads": d.num_attention_heads, "num_layers": L, "eps": d.eps,
        "skiparse_model_type": model_config.schedule,
        "sparse_ratio": model_config.sparse_ratio if model_config.schedule != "full" else 1,
        "num_full_blocks": nf if model_config.schedule != "full" else 0,
        "quant": None, "quant_attn": None, "scale_max_forward": 15.0, "scale_max_backward": 224.0,
    }
    if precision is not None and precision.recipe in HIF8_RECIPES:
        out.update(quant="hif8", quant_attn="hif8" if precision.quantize_attention else None,
                   scale_max_forward=float(precision.scale_max_fwd), scale_max_backward=float(precision.scale_max_bwd))
    if d.text_dim != DEFAULT_TEXT_DIM:
        out["text_dim"] = d.text_dim  # not read by OSP-Next's loader (ignore_for_config); read by ours
    return out


def from_osp_next(state_dict: StateDict, model_config) -> StateDict:
    """OSP-Next (= Wan2.1 original) keys -> our full keys. Raises StateDictMismatch naming missing/unexpected keys."""
    return import_state_dict(state_dict, wan.TO_OURS, model_config, "from_osp_next")


def to_osp_next(state_dict: StateDict, model_config) -> StateDict:
    """Our full keys -> OSP-Next keys (patch weight back to Conv3d [dim, in_dim, 1, 2, 2])."""
    return export_state_dict(state_dict, wan.TO_WAN, model_config, "to_osp_next")

