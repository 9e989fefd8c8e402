"""umT5 wrapper: real UMT5EncoderModel, tiny width configurable, zero padding past each prompt like Wan."""
import pytest
import torch

from osp_megatron.encoders import load_text_encoder
from osp_megatron.encoders.tokenizer import ByteTokenizer


def test_byte_tokenizer_is_deterministic_and_truncates():
    tok = ByteTokenizer()
    ids, mask = tok(["ab", "é" * 10], max_length=6)
    assert ids[0].tolist() == [97 + 3, 98 + 3, 1, 0, 0, 0] and mask[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert mask[1].sum() == 6 and ids[1, -1] == 1  # truncated, eos kept


@pytest.mark.parametrize("dim", [32, 64])
def test_tiny_encoder_width_and_zero_padding(dim):
    from transformers import UMT5EncoderModel

    enc = load_text_encoder("tiny", "cpu", torch.float32, text_len=20, text_dim=dim)
    assert isinstance(enc.model, UMT5EncoderModel) and enc.dim == dim
    out, lens = enc.encode(["a red square moving right", "hi"], return_lengths=True)
    assert out.shape == (2, 20, dim)
    assert lens.tolist() == [20, 3]  # truncated to text_len; "hi" + eos
    assert out[1, 3:].abs().sum() == 0 and (out[1, :3].abs().sum(-1) > 0).all()
    again = load_text_encoder("tiny", text_len=20, text_dim=dim).encode(["a red square moving right", "hi"])
    assert torch.equal(out, again)


def test_prompt_padding_does_not_leak_into_tokens():
    enc = load_text_encoder("tiny", text_len=16, text_dim=32)
    a = enc.encode(["cat"])
    b = enc.encode(["cat", "a much longer prompt here"])[:1]
    torch.testing.assert_close(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="text_len"):
        load_text_encoder("tiny", text_len=0)
    with pytest.raises(FileNotFoundError, match="encoders.text_encoder"):
        load_text_encoder("/nonexistent/umt5")
    enc = load_text_encoder("tiny", text_len=8)
    with pytest.raises(TypeError, match="list of prompts"):
        enc.encode("a single string")


def test_load_from_a_local_folder_with_a_real_tokenizer(tmp_path):
    """A saved UMT5 + a fast tokenizer built locally (no downloads) load through the path branch."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny = load_text_encoder("tiny", text_len=12, text_dim=32)
    tiny.model.save_pretrained(tmp_path / "pipe" / "text_encoder")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4, "square": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers.processors import TemplateProcessing

    core.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "pipe" / "tokenizer")
    enc = load_text_encoder(str(tmp_path / "pipe"), text_len=12)
    out, lens = enc.encode(["a red square", "red"], return_lengths=True)
    assert out.shape == (2, 12, 32) and lens.tolist() == [4, 2]
    assert out[1, 2:].abs().sum() == 0
    ids = torch.tensor([[3, 4, 5, 1] + [0] * 8])
    ref = tiny.model(input_ids=ids, attention_mask=(ids > 0).long()).last_hidden_state
    torch.testing.assert_close(out[0, :4], ref[0, :4])
    with pytest.raises(ValueError, match="text_dim=48"):
        load_text_encoder(str(tmp_path / "pipe"), text_len=12, text_dim=48)


def test_tiny_encoder_reads_word_order():
    """The same bytes in another order must give other features: the tokens of the shared word "background" carry
    the colour written before them ("... on a blue background" vs "... on a red background"). With the random
    relative-attention biases the encoder is a bag of bytes and they differ by ~3%."""
    enc = load_text_encoder("tiny", text_len=64, text_dim=32)
    a, b = enc.encode(["a red square moving right on a blue background", "a blue square moving right on a red background"])
    n = int((a.abs().sum(-1) > 0).sum())
    tail_a, tail_b = a[n - 12:n], b[n - 12:n]  # " background" + eos: the same bytes in both prompts
    assert float((tail_a - tail_b).norm() / tail_a.norm()) > 0.15
