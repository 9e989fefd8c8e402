"""umT5 text encoder (transformers `UMT5EncoderModel`): prompts -> [b, text_len, D], zeros past each prompt.

`spec` is a local path (a UMT5 encoder folder, or a Wan diffusers pipeline folder with `text_encoder/` and
`tokenizer/`) or `"tiny"`: a random-initialised small UMT5 (fixed seed, width `text_dim`) with the byte-level
tokenizer of `tokenizer.py`. Like Wan, each prompt's hidden states are cut at its token count (eos included)
and the rest of the `text_len` rows are zeros. Prompts are cleaned first (`clean_prompt`: ftfy if installed,
HTML unescape, whitespace), as Wan's and OSP-Next's pipelines do.
"""
from __future__ import annotations

import html
import os
import re
from typing import List, Optional, Tuple

import torch

TINY_SEED = 20241


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning before the tokenizer (as OSP-Next's pipeline and Wan2.1 do): ftfy's `fix_text` when
    ftfy is installed, HTML entities unescaped twice, whitespace runs collapsed to one space, ends stripped."""
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    def __init__(self, model, tokenizer, spec: str, device: torch.device, dtype: torch.dtype, text_len: int):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.device, self.dtype, self.text_len = device, dtype, text_len
        self.dim = int(model.config.d_model)

    def tokenize(self, texts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (ids [b, text_len], mask [b, text_len])."""
        from osp_megatron.encoders.tokenizer import ByteTokenizer

        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer(texts, self.text_len)
        out = self.tokenizer(texts, padding="max_length", max_length=self.text_len, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]

    @torch.no_grad()
    def encode(self, texts: List[str], return_lengths: bool = False):
        """list of b prompts -> [b, text_len, D] in the encoder dtype (and lengths int64 [b] if asked)."""
        if isinstance(texts, str):
            raise TypeError("TextEncoder.encode expects a list of prompts, got a single string")
        ids, mask = self.tokenize([clean_prompt(t) for t in texts])
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = mask.sum(dim=1)
        keep = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
        hidden = hidden * keep[..., None]
        return (hidden, lengths.cpu()) if return_lengths else hidden


def tiny_text_model(text_dim: int = 32):
    """A small UMT5EncoderModel (2 layers, width `text_dim`), weights from a fixed seed, relative-attention biases
    set to local windows (`_local_relative_bias`) so that the output depends on word order."""
    from transformers import UMT5Config, UMT5EncoderModel

    from osp_megatron.encoders.tokenizer import VOCAB_SIZE

    if text_dim < 4:
        raise ValueError(f"text_dim={text_dim}: the tiny text encoder needs >= 4")
    heads = 4 if text_dim % 4 == 0 else 1
    config = UMT5Config(vocab_size=VOCAB_SIZE, d_model=text_dim, d_kv=text_dim // heads, d_ff=2 * text_dim,
                        num_layers=2, num_heads=heads, dropout_rate=0.0, relative_attention_num_buckets=32,
                        relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                        is_encoder_decoder=False, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = UMT5EncoderModel(config)
    _local_relative_bias(model)
    return model


# relative offsets (key - query) each head of the tiny umT5 attends to: previous byte, next byte, next 2..8, previous 2..8
LOCAL_HEAD_OFFSETS = (range(-1, 0), range(1, 2), range(2, 9), range(-8, -1))
LOCAL_BIAS = 4.0


@torch.no_grad()
def _local_relative_bias(model, strength: float = LOCAL_BIAS) -> None:
    """Give the random umT5 word order: its random relative-attention biases (std d^-0.5) leave every layer's
    attention almost uniform, so the output is a bag of byte embeddings (swapping two words moves it ~2%) and no
    cross-attention can tell `a red square on a blue background` from `a blue square on a red background`. Each
    head gets `strength` on the relative-position buckets of one local window (LOCAL_HEAD_OFFSETS), 0 elsewhere."""
    rel = torch.arange(-64, 65)
    for blk in model.encoder.block:
        att = blk.layer[0].SelfAttention
        if getattr(att, "relative_attention_bias", None) is None:
            continue
        w = att.relative_attention_bias.weight
        buckets = att._relative_position_bucket(rel)
        new = torch.zeros_like(w)
        for h in range(w.shape[1]):
            window = set(LOCAL_HEAD_OFFSETS[h % len(LOCAL_HEAD_OFFSETS)])
            for b in buckets.unique().tolist():
                if all(d in window for d in rel[buckets == b].tolist()):
                    new[b, h] = strength
        w.copy_(new)


def load_text_encoder(spec: str, device="cpu", dtype: torch.dtype = torch.float32, text_len: int = 512,
                      text_dim: Optional[int] = None, tokenizer: Optional[str] = None) -> TextEncoder:
    """`"tiny"` (width `text_dim`, default 32) or a local path -> TextEncoder in eval mode."""
    if text_len < 1:
        raise ValueError(f"text_len={text_len}: must be >= 1 (Wan uses 512)")
    device = torch.device(device)
    if spec == "tiny":
        from osp_megatron.encoders.tokenizer import ByteTokenizer

        model, tok = tiny_text_model(text_dim or 32), ByteTokenizer()
    else:
        try:
            from transformers import AutoTokenizer, UMT5EncoderModel
        except ImportError as exc:
            raise RuntimeError("umT5 needs transformers: pip install 'osp-megatron[encoders]'") from exc
        if not os.path.isdir(spec):
            raise FileNotFoundError(f"encoders.text_encoder={spec!r}: not a folder; give a local UMT5 encoder "
                                    "folder (or a Wan diffusers pipeline folder with text_encoder/) or 'tiny'")
        path = spec
        if not os.path.isfile(os.path.join(spec, "config.json")) and os.path.isdir(os.path.join(spec, "text_encoder")):
            path = os.path.join(spec, "text_encoder")
        tok_path = tokenizer or next((p for p in (os.path.join(spec, "tokenizer"), path, spec)
                                      if os.path.isfile(os.path.join(p, "tokenizer_config.json"))
                                      or os.path.isfile(os.path.join(p, "spiece.model"))), spec)
        model = UMT5EncoderModel.from_pretrained(path, torch_dtype=dtype)
        tok = AutoTokenizer.from_pretrained(tok_path)
        if text_dim is not None and int(model.config.d_model) != text_dim:
            raise ValueError(f"text_dim={text_dim} but {path} has d_model={model.config.d_model}; "
                             "set model.text_dim to the encoder width")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return TextEncoder(model, tok, spec, device, dtype, text_len)


__all__ = ["TextEncoder", "clean_prompt", "load_text_encoder", "tiny_text_model"]
