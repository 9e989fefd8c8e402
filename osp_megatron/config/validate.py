"""Checks across sections, in one place for every entry point (osp-train, osp-grpo, osp-sample, osp-convert).

`layout_errors(model, parallel, world_size=None)` holds the model x parallel-layout invariants: heads vs
TP x Ulysses (sparse blocks), full blocks at Ulysses gcd(heads / TP, CP) when the heads do not divide over CP
(not with sequence parallelism), SSP | P^2, PP | layers, TP | hidden/FFN widths, and the world size. `path_errors(cfg)` checks that the inputs a run reads exist (used by `--dry-run`).
Nothing here touches torch.distributed, so a bad plan fails before any collective starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from osp_megatron.config.sections import ModelConfig, ParallelConfig


CONFIG_NAMES = {"tensor_parallel": "parallel.tensor_parallel", "pipeline_parallel": "parallel.pipeline_parallel",
                "ssp": "parallel.ssp", "ulysses": "parallel.ulysses"}
FLAG_NAMES = {"tensor_parallel": "--tp", "pipeline_parallel": "--pp", "ssp": "--ssp", "ulysses": "--ulysses"}


def layout_errors(model: ModelConfig, parallel: ParallelConfig, world_size: Optional[int] = None,
                  names: Dict[str, str] = CONFIG_NAMES) -> List[str]:
    """Why this parallel layout cannot run this model (empty list if it can). `names`: how the degrees are called
    where the user sets them (config keys, or command-line flags: FLAG_NAMES)."""
    errors: List[str] = []
    p = parallel
    try:
        dims = model.resolve()
    except KeyError:
        return errors  # an unknown size is reported when parsing
    if min(p.tensor_parallel, p.pipeline_parallel, p.ssp, p.ulysses, dims.num_attention_heads, dims.num_layers) < 1:
        return errors  # reported when parsing (must be >= 1)
    tp_n, pp_n, ssp_n, ul_n = (names[k] for k in ("tensor_parallel", "pipeline_parallel", "ssp", "ulysses"))
    ratio = model.sparse_ratio
    if p.ssp > 1:
        if model.schedule == "full":
            errors.append(f"{ssp_n}={p.ssp} with model.schedule=full: SSP needs sparse blocks; use {ul_n} instead")
        if (ratio * ratio) % p.ssp != 0:
            divisors = [d for d in range(1, ratio * ratio + 1) if (ratio * ratio) % d == 0]
            errors.append(f"{ssp_n}={p.ssp} does not divide P^2={ratio * ratio} (model.sparse_ratio={ratio}): the SSP "
                          f"degree must divide P^2; use one of {divisors} and put the rest of the context parallelism "
                          f"in {ul_n}")
    heads = dims.num_attention_heads
    tp, cp = p.tensor_parallel, p.context_parallel
    if model.padding_free and p.sequence_parallel:
        errors.append("model.padding_free=true with parallel.sequence_parallel: TP sequence-parallel chunks split "
                      "padded shards evenly; set model.padding_free=null (padded there) or false, or disable "
                      "sequence_parallel")
    if heads % (tp * p.ulysses) != 0:
        errors.append(f"{tp_n}={tp} x {ul_n}={p.ulysses} = {tp * p.ulysses} must divide the {heads} attention heads "
                      f"(sparse blocks split heads over TP x Ulysses); choose degrees among the divisors of {heads}")
    elif heads % (tp * cp) != 0 and p.sequence_parallel:
        errors.append(f"{heads} attention heads over {tp_n}={tp} x context parallel {p.ssp} x {p.ulysses} = {tp * cp}: "
                      f"full blocks then run Ulysses over gcd({heads // tp}, {cp}) ranks, which does not combine with "
                      "parallel.sequence_parallel; disable it or choose degrees among the divisors of the heads")
    if dims.ffn_hidden_size % tp != 0 or dims.hidden_size % tp != 0:
        errors.append(f"{tp_n}={tp} does not divide hidden_size={dims.hidden_size} / "
                      f"ffn_hidden_size={dims.ffn_hidden_size}")
    per_stage = dims.num_layers // p.pipeline_parallel
    offload = getattr(model, "offload_blocks", 0) or 0
    if offload > per_stage:
        errors.append(f"model.offload_blocks={offload} exceeds the {per_stage} blocks of a pipeline stage "
                      f"(model.num_layers={dims.num_layers} / {pp_n}={p.pipeline_parallel}): lower it")
    if dims.num_layers % p.pipeline_parallel != 0:
        errors.append(f"{pp_n}={p.pipeline_parallel} does not divide model.num_layers={dims.num_layers}: choose a "
                      "divisor of the layer count")
    if world_size is not None:
        mp = tp * p.pipeline_parallel * cp
        if world_size % mp != 0:
            errors.append(f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {p.pipeline_parallel} x "
                          f"{cp} = {mp}; launch a multiple of that many processes or change parallel.*")
    return errors


def _exists(path: str) -> bool:
    if any(ch in path for ch in "{*?["):  # a brace/glob shard pattern: its folder must exist
        parent = Path(path.split("{")[0]).parent
        return parent.is_dir()
    return Path(path).exists()


def path_errors(cfg, sections=("data", "train", "encoders", "grpo")) -> List[str]:
    """Inputs the run reads that do not exist (data shards, init weights, encoders, prompts)."""
    errors: List[str] = []
    if "data" in sections and cfg.data.kind != "synthetic" and cfg.data.shards and not _exists(cfg.data.shards):
        errors.append(f"data.shards={cfg.data.shards!r} does not exist: make shards with osp-shards / osp-cache or "
                      "fix the path")
    if cfg.train.init_from and not Path(cfg.train.init_from).exists():
        errors.append(f"train.init_from={cfg.train.init_from!r} does not exist: give a checkpoint folder or file")
    for key in ("vae", "text_encoder", "tokenizer"):
        value = getattr(cfg.encoders, key)
        builtin = ("tiny", "patch") if key == "vae" else ("tiny",)
        if value and value not in builtin and not Path(value).exists():
            errors.append(f"encoders.{key}={value!r} does not exist: give a local folder (or "
                          + " / ".join(f"`{b}`" for b in builtin) + " for the built-in stand-ins)")
    if "grpo" in sections and cfg.grpo.prompts_file and not Path(cfg.grpo.prompts_file).is_file():
        errors.append(f"grpo.prompts_file={cfg.grpo.prompts_file!r} does not exist: give a text file, one prompt a line")
    return errors


__all__ = ["CONFIG_NAMES", "FLAG_NAMES", "layout_errors", "path_errors"]
