"""A deterministic byte-level tokenizer for the tiny text encoder (no downloads).

ids: 0 = pad, 1 = eos, 2 = unk (unused), byte b -> b + 3; vocab 259. Prompts are UTF-8 encoded,
truncated to `max_length - 1` bytes and closed with eos, then padded with 0 (mask 0).
"""
from __future__ import annotations

from typing import List, Tuple

import torch

PAD_ID, EOS_ID, UNK_ID, BYTE_OFFSET = 0, 1, 2, 3
VOCAB_SIZE = 256 + BYTE_OFFSET


class ByteTokenizer:
    pad_token_id = PAD_ID
    eos_token_id = EOS_ID
    vocab_size = VOCAB_SIZE

    def encode(self, text: str, max_length: int) -> List[int]:
        ids = [b + BYTE_OFFSET for b in text.encode("utf-8")][: max_length - 1]
        return ids + [EOS_ID]

    def __call__(self, texts: List[str], max_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (input_ids int64 [b, max_length], attention_mask int64 [b, max_length])."""
        if max_length < 1:
            raise ValueError(f"max_length={max_length}: must be >= 1")
        ids = torch.full((len(texts), max_length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for i, t in enumerate(texts):
            row = self.encode(t, max_length)
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask



def byte_tokenizer_fast():
    """`ByteTokenizer` as a transformers fast tokenizer (same ids, eos, padding and truncation), so the tiny text
    encoder can be saved in a diffusers pipeline folder that `AutoTokenizer` / `WanPipeline` open."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
    vocab.update({char: byte + BYTE_OFFSET for byte, char in bytes_to_unicode().items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per byte
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


__all__ = ["ByteTokenizer", "VOCAB_SIZE", "byte_tokenizer_fast"]
