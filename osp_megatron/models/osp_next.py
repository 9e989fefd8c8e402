"""OSPNextDiT: Wan2.1's T2V DiT with Skiparse-2D layouts in the middle blocks.

    tokens  = PatchEmbed(latents)                           [N, b, C]   raster (t h w), patch 1x2x2
    temb    = MLP(sinusoid(timestep));  e = Linear(SiLU(temb)) -> [b, 6, C]
    text    = MLP_gelu_tanh(text_embeddings)                [L, b, C]
    x       = placement.enter(tokens)                       [S, G*b, C] first layout (token if sparse)
    x       = block_i(x, e, text)  for each block            (sparse blocks switch token <-> group)
    out     = Linear(LN(x) * (1 + scale) + shift)            head modulation from temb
    velocity = unpatchify(placement.exit(out))              [b, 16, T, H, W]

With `target=` the loss is computed on the rank's own tokens in the final layout instead (no gather).
`config.padding_free` (model.padding_free): on one device the sparse blocks run on the packed real tokens
(`[N, b, C]`, no H/W padding to P^2 multiples); under context / sequence parallelism on padded shards.
Blocks come from a per-layer spec list (`specs.get_layer_specs`: attention kind, HiF8 or plain linears, Q/K/V
quantizer, kernel). Process groups come only from the injected `ParallelState`; the model calls the
`parallel` package for every collective: token placement and movement (`parallel.plan.TokenPlacement`, one
per latent grid), TP weight slicing/gathering (`parallel.tp_shards`); tensor parallelism of the activations
lives in the megatron linears. Pipeline parallel: the first stage embeds, the last stage has the head, and
stages exchange one tensor that packs `[x; e; temb; text]` along the sequence axis.
"""
from __future__ import annotations

import contextlib

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import sharded_state_dict_default

from osp_megatron.models.adapters.common import StateDictMismatch, our_keys
from osp_megatron.models.attention import SequenceContext
from osp_megatron.models.offload import ActivationOffload
from osp_megatron.models.recompute import selective_recompute
from osp_megatron.models.specs import get_layer_specs
from osp_megatron.parallel import ParallelState, TokenPlacement
from osp_megatron.parallel.tp_shards import tp_gather, tp_slice
from osp_megatron.quant.modules import set_amax_scope
from osp_megatron.skiparse import plan_blocks


def timestep_sinusoid(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[b] -> [b, dim]: [cos | sin] of t * exp(-ln(max_period) * k / (dim/2)) (diffusers Timesteps, flip_sin_to_cos)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    ang = timestep.float()[:, None] * exponent.exp()[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


class _TwoLayerMLP(torch.nn.Module):
    def __init__(self, in_dim, dim, act, dtype):
        super().__init__()
        self.linear_1 = torch.nn.Linear(in_dim, dim, dtype=dtype)
        self.linear_2 = torch.nn.Linear(dim, dim, dtype=dtype)
        self.act = act

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class Head(torch.nn.Module):
    """LN -> modulation (shift, scale from temb) -> Linear to out_channels * prod(patch)."""

    def __init__(self, hidden, out_dim, eps, dtype):
        super().__init__()
        self.eps = eps
        self.modulation = torch.nn.Parameter(torch.randn(1, 2, hidden, dtype=dtype) / hidden**0.5)
        self.linear = torch.nn.Linear(hidden, out_dim, dtype=dtype)

    def forward(self, x, temb, classes):
        shift, scale = (self.modulation.float() + temb.float()[:, None, :]).repeat(classes, 1, 1).unbind(1)
        n = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1 + scale[None]) + shift[None]
        return self.linear(n.type_as(x))


class OSPNextDiT(MegatronModule):
    """The DiT. `model(latents[b,16,T,H,W], timestep[b], text[b,L,text_dim]) -> velocity[b,16,T,H,W]`."""

    def __init__(self, config, parallel: ParallelState, pre_process: bool = True, post_process: bool = True,
                 layer_specs: Optional[List[ModuleSpec]] = None):
        super().__init__(config)
        if parallel is None:
            raise ValueError("OSPNextDiT needs parallel=ParallelState (ParallelState.single() for one process)")
        self.parallel = parallel
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings_and_output_weights = False
        self.input_tensor = None
        c = config.hidden_size
        dtype = config.params_dtype
        self.patch = list(config.patch_size)
        self.layer_specs = layer_specs if layer_specs is not None else get_layer_specs(config)
        if len(self.layer_specs) != config.num_layers:
            raise ValueError(f"{len(self.layer_specs)} layer specs for num_layers={config.num_layers}")
        self.schedule = [spec.params["kind"] for spec in self.layer_specs]
        _, steps, _ = plan_blocks(self.schedule, parallel.splits_sequence)
        per_stage = config.num_layers // parallel.pp
        self.layer_offset = parallel.pp_rank * per_stage
        if pre_process:
            patch_dim = config.in_channels * math.prod(self.patch)
            self.patch_embedding = torch.nn.Linear(patch_dim, c, dtype=dtype)
            self.time_embedding = _TwoLayerMLP(config.freq_dim, c, torch.nn.SiLU(), dtype)
            self.time_projection = torch.nn.Linear(c, 6 * c, dtype=dtype)
            self.text_embedding = _TwoLayerMLP(config.text_dim, c, torch.nn.GELU(approximate="tanh"), dtype)
            for m in (self.time_embedding, self.time_projection):  # used by sequence-parallel chunks downstream
                for p in m.parameters():
                    p.sequence_parallel = config.sequence_parallel
        self.blocks = torch.nn.ModuleList(
            build_module(self.layer_specs[gi], config=config, layer_number=gi, parallel=parallel, step=steps[gi])
            for gi in range(self.layer_offset, self.layer_offset + per_stage)
        )
        # model.offload_blocks: the saved activations of this stage's first blocks wait in pinned host memory
        self.activation_offload = (ActivationOffload(config.offload_blocks, per_stage)
                                   if config.offload_blocks else None)
        if post_process:
            self.head = Head(c, config.out_channels * math.prod(self.patch), config.layernorm_epsilon, dtype)
            for p in self.head.parameters():
                p.sequence_parallel = config.sequence_parallel
        self._sequences: Dict[Tuple, SequenceContext] = {}
        set_amax_scope(self, parallel, config.amax_scope)

    # ------------------------------------------------------------------ helpers
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def sequence_for(self, grid, device) -> SequenceContext:
        """The token placement (+ RoPE tables) of latent grid (T, H, W) after patchify, cached per grid."""
        key = (tuple(grid), str(device))
        if key not in self._sequences:
            placement = TokenPlacement(grid, self.config.sparse_ratio, self.schedule, self.parallel, device,
                                       full_ulysses=self.parallel.full_ulysses(self.config.num_attention_heads),
                                       padding_free=self.config.padding_free)
            self._sequences[key] = SequenceContext(placement, self.config.head_dim, self.config.rope_theta)
        return self._sequences[key]

    def _patchify_in(self, latents):
        """[b, c, T, H, W] -> [N, b, c*pt*ph*pw] in raster order, channel-major patch vectors (Conv3d weight order)."""
        b, c, t, h, w = latents.shape
        pt, ph, pw = self.patch
        v = latents.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
        v = v.permute(2, 4, 6, 0, 1, 3, 5, 7)
        return v.reshape((t // pt) * (h // ph) * (w // pw), b, c * pt * ph * pw)

    def _patchify_out(self, x, shape):
        """[b, c, T, H, W] -> [N, b, pt*ph*pw*c] in the head's (pt, ph, pw, c) order."""
        b, c, t, h, w = shape
        pt, ph, pw = self.patch
        v = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
        v = v.permute(2, 4, 6, 0, 3, 5, 7, 1)
        return v.reshape((t // pt) * (h // ph) * (w // pw), b, pt * ph * pw * c)

    def _unpatchify(self, tokens, shape):
        b, c, t, h, w = shape
        pt, ph, pw = self.patch
        v = tokens.reshape(t // pt, h // ph, w // pw, b, pt, ph, pw, c)
        v = v.permute(3, 7, 0, 4, 1, 5, 2, 6)
        return v.reshape(b, c, t, h, w)

    # ------------------------------------------------------------------ forward
    def embed(self, latents, timestep, text, placement):
        """First stage: -> x [S, G*b, C] (SP chunk if sequence parallel), e [b, 6, C], temb [b, C], text [L, b, C]."""
        tokens = self.patch_embedding(self._patchify_in(latents).to(self.patch_embedding.weight.dtype))
        x = placement.enter(tokens)
        dtype = self.time_embedding.linear_1.weight.dtype
        temb = self.time_embedding(timestep_sinusoid(timestep, self.config.freq_dim).to(dtype))
        e = self.time_projection(F.silu(temb)).unflatten(1, (6, -1))
        txt = self.text_embedding(text.to(dtype)).transpose(0, 1).contiguous()
        return x, e, temb, txt

    def forward(self, hidden_states, timestep, encoder_hidden_states, target=None):
        """latents [b, c, T, H, W], timestep [b] (0..1000), text [b, L, text_dim].

        Returns velocity [b, c_out, T, H, W]; with `target` (same shape) this rank's share of the MSE loss:
        sum of squared errors over its own valid tokens / all valid elements of the micro-batch, so the sum
        over the context-parallel group is the MSE (megatron's schedules multiply a loss by the CP size
        before backward, matching DDP's averaging of gradients over DP x CP); on a pipeline stage that is
        not the last, the packed activation for the next stage.
        """
        shape = tuple(hidden_states.shape)
        b = shape[0]
        pt, ph, pw = self.patch
        grid = (shape[2] // pt, shape[3] // ph, shape[4] // pw)
        seq = self.sequence_for(grid, hidden_states.device)
        placement = seq.placement
        if self.pre_process:
            x, e, temb, txt = self.embed(hidden_states, timestep, encoder_hidden_states, placement)
        else:
            x, e, temb, txt = self._unpack(self.input_tensor, b, encoder_hidden_states.shape[1])
        granularity = self.config.recompute_granularity if self.training else None
        offload = None
        if self.activation_offload is not None and self.training and torch.is_grad_enabled():
            offload = self.activation_offload.start_pass(self.parameters())
        for i, blk in enumerate(self.blocks):
            offloaded = offload is not None and i < self.activation_offload.num_blocks
            if granularity == "full":
                with offload.block() if offloaded else contextlib.nullcontext():
                    x = tensor_parallel.checkpoint(lambda x_, e_, t_, blk=blk: blk(x_, e_, t_, seq), False, x, e, txt)
            else:  # an offloaded block saves plain tensors (see models/offload.py)
                with offload.block() if offloaded else selective_recompute(granularity == "selective"):
                    x = blk(x, e, txt, seq)
            if offload is not None and i == self.activation_offload.prefetch_block:
                x = offload.prefetch_point(x)
        if not self.post_process:
            return self._pack(x, e, temb, txt)
        g = placement.classes_per_rank(placement.final_layout)
        out = self.head(x, temb, g)  # [S_loc(/TP), G*b, pt*ph*pw*c]
        if target is None:
            out_shape = (b, self.config.out_channels) + shape[2:]
            return self._unpatchify(placement.exit(out), out_shape)
        return self._loss(out, target, placement, b)

    def _loss(self, out, target, placement, b):
        tgt = placement.shard_target(self._patchify_out(target, tuple(target.shape)))
        valid = placement.target_valid()  # [S_loc(/TP), G]
        g = valid.shape[1]
        se = (out.float() - tgt.float()).pow(2).sum(-1).view(out.shape[0], g, b)
        se = (se * valid[:, :, None]).sum()
        count = b * placement.num_tokens * out.shape[-1]
        loss = se / count  # this rank's share: summed over the CP group it is the micro-batch MSE
        return placement.reduce_loss(loss)  # SP: the whole sequence's share on every TP rank

    # ------------------------------------------------------------------ pipeline packing
    def _pack(self, x, e, temb, txt):
        gb = x.shape[1]
        b = e.shape[0]
        rep = gb // b
        parts = [x, e.transpose(0, 1).repeat(1, rep, 1), temb[None].repeat(1, rep, 1), txt.repeat(1, rep, 1)]
        return torch.cat([p.to(x.dtype) for p in parts], dim=0)

    def _unpack(self, carrier, b, text_len):
        if carrier is None:
            raise RuntimeError("pipeline stage > 0 needs set_input_tensor() before forward")
        n_x = carrier.shape[0] - 7 - text_len
        x = carrier[:n_x]
        e = carrier[n_x : n_x + 6, :b].transpose(0, 1)
        temb = carrier[n_x + 6, :b]
        txt = carrier[n_x + 7 :, :b]
        return x, e, temb, txt

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron dist-checkpointing view: TP shards from the linears/norms, blocks under their *global*
        index (so checkpoints load under any PP split), everything else replicated over TP/DP/CP."""
        metadata = dict(metadata or {})
        metadata.setdefault("dp_cp_group", self.parallel.dp_cp_group)
        tp_group = self.parallel.tp_group
        out = {}
        for name, module in self.named_children():
            if name == "blocks":
                for i, blk in enumerate(module):
                    out.update(sharded_state_dict_default(
                        blk, f"{prefix}blocks.{self.layer_offset + i}.", sharded_offsets, metadata, tp_group=tp_group))
            else:
                out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group))
        return out

    # ------------------------------------------------------------------ full (unsharded) weights
    def global_name(self, local_name: str) -> str:
        """Local parameter name (blocks indexed per stage) -> the global name used by adapters/converters."""
        if local_name.startswith("blocks."):
            i, rest = local_name[len("blocks."):].split(".", 1)
            return f"blocks.{self.layer_offset + int(i)}.{rest}"
        return local_name

    def load_full_state_dict(self, state_dict, strict: bool = True) -> None:
        """Load an unsharded state dict (our global names, e.g. from `adapters.diffusers.from_diffusers`)
        into this TP/PP-sharded model: each rank slices its TP shard and takes its stage's blocks."""
        params = self.state_dict(keep_vars=True)
        local, missing = {}, []
        for name, param in params.items():
            if name.endswith("_extra_state"):
                continue
            g = self.global_name(name)
            if g not in state_dict:
                missing.append(g)
                continue
            t = tp_slice(state_dict[g], param, self.parallel)
            if tuple(t.shape) != tuple(param.shape):
                raise StateDictMismatch(f"{g}: shape {tuple(t.shape)} does not fit the model's {tuple(param.shape)}")
            local[name] = t
        unexpected = sorted(set(state_dict) - set(our_keys(self.config.num_layers))) if strict else []
        if missing or unexpected:
            raise StateDictMismatch(
                f"load_full_state_dict: missing {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
                f"unexpected {unexpected[:20]}; check model size / num_layers and the checkpoint format"
            )
        self.load_state_dict(local, strict=False)

    def full_state_dict(self):
        """This stage's parameters with TP shards gathered, under global names (call on every TP rank)."""
        out = {}
        for name, param in self.state_dict(keep_vars=True).items():
            if name.endswith("_extra_state"):
                continue
            out[self.global_name(name)] = tp_gather(param.detach(), param, self.parallel).clone()
        return out
