"""The run config's sections (model, parallel, precision, train, tracking, encoders); every field documented.

Enumerations are declared once, as `choices` of the field (checked when parsing, listed in docs/config.md).
Checks that involve one section only live in its `check(errors)`; checks across sections (heads vs TP x CP,
world size, paths) live in `osp_megatron.config.validate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from osp_megatron.config.schema import option
from osp_megatron.config.sizes import DIM_FIELDS, SIZES, ModelDims, default_num_full
from osp_megatron.diffusion.presets import SAMPLE_PRESETS
from osp_megatron.skiparse import block_schedule

SCHEDULES = ("full", "dual_end", "uniform")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "te", "math")
SPECS = ("local", "te")
DTYPES = ("auto", "fp32", "bf16")
RECIPES = ("none", "hif8_current", "hif8_delayed", "fp8_delayed", "fp8_current", "fp8_block")
ROUNDINGS = ("ta", "hybrid")
AMAX_SCOPES = ("local", "tp", "tp_cp")  # HiF8 amax scopes (osp_megatron.quant.modules.set_amax_scope)
TRACKERS = ("mlflow", "tensorboard", "wandb", "none")  # osp_megatron.training.tracking's backends
FORMATS = ("auto", "megatron", "diffusers", "wan", "osp-next")  # osp_megatron.weights.FORMATS + auto


@dataclass
class ModelConfig:
    """The DiT. `size` picks a registry entry; any dimension set here overrides it."""

    size: str = option("tiny", "named size: tiny (CPU tests), wan_1_3b, wan_14b (Wan2.1 T2V dims)",
                       choices=tuple(SIZES))
    schedule: str = option("dual_end", "block layout schedule: full (dense Wan2.1), dual_end (OSP-Next: full blocks at "
                           "both ends, Skiparse token/group between), uniform (pairs of full blocks spread out)",
                           choices=SCHEDULES)
    num_full_blocks: Optional[int] = option(None, "full-attention blocks of dual_end/uniform (null: 8 for dual_end as "
                                            "released, about a third of the layers for uniform)", minimum=0)
    sparse_ratio: int = option(2, "Skiparse-2D ratio P along H and W (released: 2)", choices=(2, 4))
    attention_backend: str = option("auto", "dense attention kernel: auto (= sdpa), sdpa (cuDNN/flash on GPU), "
                                    "flash (flash-attn), te (TransformerEngine), math (reference)",
                                    choices=ATTENTION_BACKENDS)
    spec: str = option("local", "block spec: local (megatron TP linears, pure torch, runs on CPU) or te "
                       "(TransformerEngine linears, GPU)", choices=SPECS)
    recompute: str = option("none", "activation recompute: none, selective (the elementwise outputs of every block -- "
                            "norms, modulation, RMSNorm + RoPE, GELU -- are recomputed in backward; no GEMM or "
                            "attention runs twice), full (each block's forward again, +1 forward)",
                            choices=("none", "selective", "full"))
    offload_blocks: int = option(0, "activation offload: the first N blocks of each pipeline stage keep the tensors "
                                 "they save for backward in pinned host memory (copied on a side stream, brought "
                                 "back ahead of their backward; no selective recompute inside them); 0 = off",
                                 minimum=0)
    padding_free: Optional[bool] = option(None, "sparse blocks on the real tokens only (H, W padding to P^2 multiples "
                                          "never enters a per-token op; grids that need padding): null = on one "
                                          "device (context parallelism keeps padded shards), true = also under "
                                          "context parallelism (SSP / Ulysses: uneven exchanges; rejected with "
                                          "sequence_parallel), false = padded everywhere")
    hidden_size: Optional[int] = option(None, "override the size's hidden width", minimum=1)
    ffn_hidden_size: Optional[int] = option(None, "override the size's FFN width", minimum=1)
    num_attention_heads: Optional[int] = option(None, "override the size's attention heads", minimum=1)
    num_layers: Optional[int] = option(None, "override the size's number of blocks", minimum=1)
    in_channels: Optional[int] = option(None, "override the latent channels in (16 for the Wan VAE)", minimum=1)
    out_channels: Optional[int] = option(None, "override the latent channels out", minimum=1)
    text_dim: Optional[int] = option(None, "override the text-embedding width (4096 for umT5-XXL)", minimum=1)
    freq_dim: Optional[int] = option(None, "override the sinusoidal timestep-embedding width", minimum=2)
    patch_size: Optional[List[int]] = option(None, "override the (t, h, w) patch; only [1, 2, 2] (Wan2.1) is supported")
    eps: Optional[float] = option(None, "override the LayerNorm/RMSNorm epsilon")
    rope_theta: Optional[float] = option(None, "override the RoPE base")

    def resolve(self) -> ModelDims:
        """The size's entry with the explicit fields applied (KeyError for an unknown size)."""
        entry = SIZES[self.size]
        values = {k: getattr(entry, k) for k in DIM_FIELDS}
        values.update({k: (list(v) if k == "patch_size" else v) for k in DIM_FIELDS
                       if (v := getattr(self, k)) is not None})
        nf = self.num_full_blocks
        if nf is None:
            nf = default_num_full(self.schedule, entry, values["num_layers"])
        return ModelDims(num_full_blocks=nf, **values)

    def check(self, errors: List[str]) -> None:
        try:
            dims = self.resolve()
        except KeyError:
            return  # an unknown size is reported when parsing
        if min(dims.hidden_size, dims.num_attention_heads, dims.num_layers) < 1:
            return  # reported when parsing (must be >= 1)
        h, heads = dims.hidden_size, dims.num_attention_heads
        if h % heads != 0:
            errors.append(f"model: hidden_size={h} is not divisible by num_attention_heads={heads}")
        elif dims.head_dim % 2 != 0 or dims.head_dim < 6:
            errors.append(f"model: head_dim={dims.head_dim} (hidden_size / heads) must be even and >= 6 for 3D RoPE")
        if list(dims.patch_size) != [1, 2, 2]:
            errors.append(f"model.patch_size={dims.patch_size}: only [1, 2, 2] (Wan2.1) is supported")
        if self.schedule != "full":
            try:
                block_schedule(dims.num_layers, self.schedule, dims.num_full_blocks)
            except ValueError as exc:
                errors.append(f"model.num_full_blocks={dims.num_full_blocks}: {exc}")


@dataclass
class ParallelConfig:
    """World = TP x CP x DP x PP (megatron-core order), CP = SSP x Ulysses."""

    tensor_parallel: int = option(1, "tensor-parallel degree (megatron column/row-parallel linears)", minimum=1)
    pipeline_parallel: int = option(1, "pipeline-parallel stages (blocks split evenly)", minimum=1)
    ssp: int = option(1, "Sparse Sequence Parallel degree: ranks that own whole Skiparse classes; divides P^2",
                      minimum=1)
    ulysses: int = option(1, "Ulysses degree inside the context-parallel group (heads split)", minimum=1)
    sequence_parallel: bool = option(False, "megatron TP sequence parallelism (needs tensor_parallel > 1)")
    distributed_optimizer: bool = option(True, "shard optimizer state over data-parallel ranks (megatron)")
    overlap_grad_reduce: bool = option(False, "overlap DDP gradient reduction with backward")
    timeout_minutes: float = option(30.0, "torch.distributed timeout: how long a collective waits for a peer before "
                                    "the job fails", minimum=1.0)

    @property
    def context_parallel(self) -> int:
        return self.ssp * self.ulysses

    def check(self, errors: List[str]) -> None:
        if self.sequence_parallel and self.tensor_parallel == 1:
            errors.append("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1 (set it false)")


@dataclass
class PrecisionConfig:
    """Parameter dtype and the quantized-training recipe."""

    dtype: str = option("auto", "parameter/compute dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16", choices=DTYPES)
    recipe: str = option("none", "quantized training: none, hif8_current (OSP-Next), hif8_delayed (TE DelayedScaling "
                         "semantics), fp8_current / fp8_delayed (native FP8 GEMMs via torch._scaled_mm with "
                         "model.spec=local, TransformerEngine's with model.spec=te), fp8_block (TransformerEngine, "
                         "model.spec=te)", choices=RECIPES)
    scale_max_fwd: float = option(15.0, "HiF8 forward scale target: scale = scale_max_fwd / amax (x and W)")
    scale_max_bwd: float = option(224.0, "HiF8 backward scale target: scale = scale_max_bwd / amax (output grad)")
    amax_history_len: int = option(16, "delayed scaling: amax history length", minimum=1)
    amax_compute_algo: str = option("max", "delayed scaling: scale from the max of the history or the most recent amax",
                                    choices=("max", "most_recent"))
    margin: int = option(0, "delayed (and native FP8) scaling: scale = target / amax / 2^margin", minimum=0)
    interval: int = option(1, "delayed scaling: recompute the scale every N steps", minimum=1)
    backward_rounding: str = option("ta", "HiF8 rounding of gradients: ta (ties away) or hybrid (the paper's "
                                    "stochastic rule)", choices=ROUNDINGS)
    fp8_format: str = option("hybrid", "native FP8 recipes: hybrid (E4M3 forward, E5M2 gradients) or e4m3 (both)",
                             choices=("hybrid", "e4m3"))
    quantize_attention: bool = option(False, "HiF8 on the Q/K/V (and dQ/dK/dV) of self- and cross-attention, as "
                                      "the kernel sees them (after the Ulysses all-to-all)")
    amax_scope: str = option("local", "ranks a HiF8 amax is reduced over: local (each rank's own tensor, OSP-Next), "
                             "tp (TP shards: output independent of the TP degree), tp_cp (TP x context parallel: "
                             "every activation scaled by the whole tensor's amax)", choices=AMAX_SCOPES)
    bf16_first_blocks: int = option(0, "keep the first N blocks out of quantization", minimum=0)
    bf16_last_blocks: int = option(0, "keep the last N blocks out of quantization", minimum=0)

    def check(self, errors: List[str], model: ModelConfig) -> None:
        if self.recipe == "fp8_block" and model.spec != "te":
            errors.append("precision.recipe=fp8_block is a TransformerEngine FP8 recipe: set model.spec=te (needs TE "
                          "on a GPU) or use fp8_current / fp8_delayed (native FP8) or hif8_current / hif8_delayed")
        if self.recipe.startswith("hif8") and model.spec == "te":
            errors.append(f"precision.recipe={self.recipe} with model.spec=te: the HiF8 linears are built by the local "
                          "spec; set model.spec=local (or use an fp8_* recipe with TE)")
        if self.scale_max_fwd <= 0 or self.scale_max_bwd <= 0:
            errors.append("precision.scale_max_fwd/scale_max_bwd must be > 0")


@dataclass
class TrainConfig:
    """The training loop: optimizer, LR schedule, flow matching, EMA, checkpoints, sample videos."""

    run_dir: str = option("runs/default", "run directory: checkpoints, metrics.jsonl, the MLflow store, samples")
    steps: int = option(100, "optimizer steps to train (a resumed run continues to this count)", minimum=1)
    global_batch_size: int = option(0, "samples per optimizer step (0: micro_batch_size x DP, no accumulation)",
                                    minimum=0)
    lr: float = option(1e-4, "peak learning rate (AdamW)")
    min_lr: float = option(0.0, "final learning rate of the cosine decay", minimum=0)
    lr_schedule: str = option("cosine", "learning-rate decay after warm-up", choices=("cosine", "constant"))
    warmup_steps: int = option(0, "linear warm-up steps (0: none)", minimum=0)
    weight_decay: float = option(0.0, "AdamW weight decay", minimum=0)
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    clip_grad: float = option(1.0, "clip the global gradient norm to this (0: off); adaptive: the initial bound",
                              minimum=0)
    clip_mode: str = option("norm", "gradient clipping: norm (fixed clip_grad) or adaptive (OSP-Next: EMA of accepted "
                            "norms + 3 sigma, starting at min(clip_grad, 3 x first norm))", choices=("norm", "adaptive"))
    clip_ema_decay: float = option(0.99, "adaptive clipping: EMA decay of the norm mean and variance")
    ema_decay: float = option(0.0, "EMA of the weights (0: off; e.g. 0.999)")
    ema_interval: int = option(1, "update the EMA every N optimizer steps", minimum=1)
    ema_device: str = option("auto", "where the fp32 EMA twin lives: auto (next to the model) or cpu (host memory)",
                             choices=("auto", "cpu"))
    timestep_sampling: str = option("logit_normal", "flow-matching t distribution", choices=("uniform", "logit_normal"))
    logit_mean: float = option(0.0, "logit-normal mean")
    logit_std: float = option(1.0, "logit-normal standard deviation")
    shift: float = option(1.0, "static sigma shift of the training timesteps (1: none)")
    dynamic_shift: bool = option(False, "resolution-dependent shift (overrides `shift`)")
    shift_rule: str = option("per_sample", "dynamic shift token count: per_sample (T*h*w/4) or per_frame (h*w/4 of "
                             "one latent frame, OSP-Next's rule with base 256 -> 0.5, max 4096 -> 1.15)",
                             choices=("per_sample", "per_frame"))
    base_shift: float = option(0.5, "dynamic shift: log-shift at base_seq_len tokens")
    max_shift: float = option(1.15, "dynamic shift: log-shift at max_seq_len tokens")
    base_seq_len: int = option(256, "dynamic shift: token count of base_shift", minimum=1)
    max_seq_len: int = option(4096, "dynamic shift: token count of max_shift", minimum=1)
    seed: int = option(1234, "the run's seed (weights init, noise, timesteps are derived from it)", minimum=0)
    log_interval: int = option(1, "log metrics every N steps", minimum=1)
    save_interval: int = option(0, "checkpoint every N steps (0: only at the end and on a stop signal)", minimum=0)
    save_checkpoints: bool = option(True, "false: never write checkpoints (benchmark/smoke runs; a signal just stops)")
    keep_last: int = option(3, "checkpoints kept (older ones are deleted after a new one is complete)", minimum=1)
    async_save: bool = option(True, "asynchronous checkpoint writes (GPU; CPU saves synchronously)")
    resume: bool = option(True, "resume from run_dir/checkpoints/latest when present")
    resume_from: str = option("", "resume from this checkpoint instead of `latest` (a step_* name under "
                              "run_dir/checkpoints, or a path)")
    checkpoint_checksums: bool = option(True, "CRC32 of every checkpoint file, verified on load (off for huge models)")
    init_from: str = option("", "initialise weights from this checkpoint (sparse fine-tune of dense Wan2.1, ...)")
    init_format: str = option("auto", "format of init_from (auto: detect; osp_megatron.weights)", choices=FORMATS)
    sample_interval: int = option(0, "write sample videos every N steps (0: never)", minimum=0)
    sample_prompts: List[str] = option(help="prompts of the sample videos",
                                       factory=lambda: ["a red square moving right"])
    sample_steps: int = option(10, "denoising steps of the sample videos", minimum=1)
    sample_guidance: float = option(5.0, "classifier-free guidance of the sample videos (1: off)", minimum=1.0)
    sample_shift: float = option(5.0, "sigma shift of the sample videos")
    sample_solver: str = option("unipc", "ODE solver of the sample videos", choices=("euler", "unipc"))
    sample_seed: int = option(42, "fixed noise seed, so samples are comparable across steps")
    sample_preset: str = option("", "named sampling settings for the sample videos, replacing sample_solver/steps/"
                                "shift/guidance/seed (osp-next: OSP-Next's released inference; empty: none)",
                                choices=("",) + tuple(SAMPLE_PRESETS))
    max_nonfinite_steps: int = option(5, "stop (exit 4) after this many non-finite steps in a row", minimum=1)
    exit_after_steps: int = option(0, "stop with a checkpoint (exit 3) after N steps in this process (0: never)",
                                   minimum=0)
    debug_nonfinite_steps: List[int] = option(help="fault injection: NaN loss at these steps", factory=list)

    def check(self, errors: List[str]) -> None:
        if self.lr <= 0:
            errors.append(f"train.lr={self.lr}: must be > 0")
        if self.min_lr > self.lr:
            errors.append(f"train.min_lr={self.min_lr}: must be in [0, train.lr={self.lr}]")
        if self.warmup_steps and self.warmup_steps >= self.steps:
            errors.append(f"train.warmup_steps={self.warmup_steps}: must be in [0, train.steps={self.steps}) (lower it)")
        if not 0.0 <= self.ema_decay < 1.0:
            errors.append(f"train.ema_decay={self.ema_decay}: must be in [0, 1)")
        if self.shift <= 0:
            errors.append(f"train.shift={self.shift}: must be > 0")
        if self.clip_mode == "adaptive" and self.clip_grad <= 0:
            errors.append("train.clip_mode=adaptive needs train.clip_grad > 0 (its initial bound; OSP-Next: 1.0)")
        if not 0.0 < self.clip_ema_decay < 1.0:
            errors.append(f"train.clip_ema_decay={self.clip_ema_decay}: must be in (0, 1) (OSP-Next: 0.99)")
        if self.sample_shift <= 0:
            errors.append(f"train.sample_shift={self.sample_shift}: must be > 0")
        if self.logit_std <= 0:
            errors.append(f"train.logit_std={self.logit_std}: must be > 0")
        if self.dynamic_shift and self.max_seq_len <= self.base_seq_len:
            errors.append(f"train.max_seq_len={self.max_seq_len} must be > train.base_seq_len={self.base_seq_len} "
                          "for dynamic_shift")
        if not 0.0 <= self.adam_beta1 < 1.0 or not 0.0 <= self.adam_beta2 < 1.0:
            errors.append(f"train.adam_beta1/adam_beta2 ({self.adam_beta1}, {self.adam_beta2}): must be in [0, 1)")
        if self.adam_eps <= 0:
            errors.append(f"train.adam_eps={self.adam_eps}: must be > 0")
        if self.sample_interval and not self.sample_prompts:
            errors.append("train.sample_prompts is empty while train.sample_interval > 0: give prompts or set it to 0")
        if not self.run_dir.strip():
            errors.append("train.run_dir is empty: give a directory for checkpoints and logs")


@dataclass
class TrackingConfig:
    """Experiment tracking."""

    backend: str = option("mlflow", "trackers, several at once allowed (`mlflow,tensorboard`): mlflow (sqlite store "
                          "under run_dir by default), tensorboard (event files in run_dir/tensorboard), wandb (an "
                          "offline run in run_dir/wandb; upload with `wandb sync`), none (only run_dir/metrics.jsonl)",
                          choices=TRACKERS, several=True)
    uri: str = option("", "tracking server/store URI (empty: sqlite under run_dir); credentials in it are redacted "
                      "everywhere they would be written")
    experiment: str = option("osp-megatron", "experiment name")
    run_name: str = option("", "run name (empty: the run directory's name)")
    peak_tflops: float = option(989.0, "per-device peak TFLOP/s used for MFU (H100 SXM bf16 dense: 989)")

    def check(self, errors: List[str]) -> None:
        if self.peak_tflops <= 0:
            errors.append(f"tracking.peak_tflops={self.peak_tflops}: must be > 0")
        names = [n.strip() for n in str(self.backend).split(",")]
        if "none" in names and len(set(names)) > 1:
            errors.append(f"tracking.backend={self.backend!r}: `none` cannot be combined with other trackers; drop it "
                          "(metrics.jsonl is always written)")


@dataclass
class EncoderConfig:
    """VAE and text encoder: local folders, or `tiny` stand-ins (random-initialised real classes)."""

    vae: str = option("tiny", "Wan VAE: a diffusers AutoencoderKLWan folder (or a pipeline folder), tiny (random "
                      "weights), or patch (a fixed pixel-patch code with a readable decode; the CPU demo)")
    text_encoder: str = option("tiny", "umT5 text encoder: a transformers UMT5EncoderModel folder, or tiny (fixed "
                               "random weights with local relative-attention windows, so word order counts)")
    tokenizer: str = option("", "tokenizer folder (empty: next to the text encoder)")


__all__ = [
    "AMAX_SCOPES", "ATTENTION_BACKENDS", "DTYPES", "EncoderConfig", "FORMATS", "ModelConfig", "ParallelConfig",
    "PrecisionConfig", "RECIPES", "ROUNDINGS", "SCHEDULES", "SPECS", "TRACKERS", "TrackingConfig",
    "TrainConfig",
]
