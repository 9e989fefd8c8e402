"""The VideoAlign reward on a tiny random model of transformers' Qwen2-VL classes, saved in VideoReward's checkpoint
layout (model_config.json + checkpoint-<step>/model.pth with the older transformers key names): the loader builds
it, and its scores equal the reward head read off transformers' own forward at the three reward tokens, normalised
with inference_config; "Overall" is their sum."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
)

from osp_megatron.config import RewardSpec  # noqa: E402
from osp_megatron.rl.rewards import VIDEOALIGN_TOKENS, MultiReward, VideoAlign, videoalign_frames, videoalign_size  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>",
           "<|image_pad|>"]
WORDS = ["[UNK]", "user", "assistant", "system", "rate", "the", "video", "a", "cat", "dog", "runs", "quality",
         "motion", "text", ":", "END"]
CHAT = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
        "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATE = '''
DETAILED_PROMPT_WITH_SPECIAL_TOKEN = """rate the video quality : <|VQ_reward|> END
motion : <|MQ_reward|> END
text : {text_prompt} <|TA_reward|> END
"""
'''


def _base(folder):
    vocab = {t: i for i, t in enumerate(WORDS + SPECIAL)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    fast.chat_template = CHAT
    ids = {t: fast.convert_tokens_to_ids(t) for t in SPECIAL}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(vocab) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    Qwen2VLImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return folder


def _video_reward(folder, base):
    """A VideoReward folder: the base with the reward tokens and a random rm_head, as model.pth in old key names."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": list(VIDEOALIGN_TOKENS)})
    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(1)
    model.rm_head = torch.nn.Linear(32, 3, bias=False)
    old = {}
    for k, v in model.state_dict().items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        old[k] = v
    (folder / "checkpoint-7").mkdir(parents=True)
    torch.save(old, folder / "checkpoint-7" / "model.pth")
    config = {"data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": 56 * 56, "min_frame_pixels": 28 * 28,
                              "eval_dim": ["VQ", "MQ", "TA"],
                              "prompt_template_type": "detailed_special", "sample_type": "uniform"},
              "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 3,
                               "use_special_tokens": True, "reward_token": "special"},
              "peft_lora_config": {"lora_enable": False},
              "inference_config": {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -0.25, "MQ_std": 0.5, "TA_mean": 0.1,
                                   "TA_std": 4.0}}
    (folder / "model_config.json").write_text(json.dumps(config))
    return model, tokenizer


def test_frame_sampling_and_resize_rules():
    assert videoalign_frames(81, 16.0, 2.0) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]  # 5.06 s x 2 fps -> 10
    assert videoalign_frames(5, 16.0, 2.0) == [0, 1, 3, 4]  # at least 4 frames
    assert len(videoalign_frames(21, 16.0, nframes=7)) == 8  # rounded to a multiple of 2
    assert videoalign_size(720, 1280, 240 * 320) == (196, 364)
    h, w = videoalign_size(480, 832, 448 * 448)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 448 * 448 and abs(w / h - 832 / 480) < 0.1


def test_videoalign_scores_equal_transformers_forward(tmp_path):
    base = _base(tmp_path / "base")
    reference, tokenizer = _video_reward(tmp_path / "VideoReward", base)
    (tmp_path / "prompt_template.py").write_text(TEMPLATE)
    scorer = MultiReward([RewardSpec("videoalign", kwargs=dict(
        checkpoint=str(tmp_path / "VideoReward"), base_model=str(base), templates=str(tmp_path / "prompt_template.py"),
        device="cpu", dtype="fp32", video_fps=8.0))])
    va = scorer.rewards[0].scorer
    assert isinstance(va, VideoAlign)
    torch.manual_seed(2)
    videos = torch.rand(2, 3, 9, 40, 60) * 2 - 1
    prompts = ["a cat runs", "a dog"]
    out = va.score(videos, prompts)
    batch = va.inputs(videos, prompts)
    assert batch["pixel_values_videos"].shape[0] > 0 and batch["video_grid_thw"][0, 0] == 2  # 9 frames @8 -> 4 -> T 2
    with torch.no_grad():  # transformers' own forward of the saved model, pooled at the reward tokens
        hidden = reference(**batch, output_hidden_states=True).hidden_states[-1]
        logits = reference.rm_head(hidden)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VIDEOALIGN_TOKENS]
    norm = {"VQ": (0.5, 2.0), "MQ": (-0.25, 0.5), "TA": (0.1, 4.0)}
    for b in range(2):
        pos = [int((batch["input_ids"][b] == i).nonzero()) for i in ids]
        for k, d in enumerate(("VQ", "MQ", "TA")):
            want = (float(logits[b, pos[k], k]) - norm[d][0]) / norm[d][1]
            assert abs(float(out[d][b]) - want) < 1e-5, (d, b)
    assert torch.allclose(out["Overall"], out["VQ"] + out["MQ"] + out["TA"])
    assert torch.equal(scorer(videos, prompts)["videoalign"], out["Overall"].float())
    other = va.score(videos, ["a dog", "a cat runs"])  # the text prompt enters the TA score
    assert not torch.allclose(other["TA"], out["TA"])


def test_videoalign_needs_user_supplied_weights(tmp_path):
    with pytest.raises(ValueError, match="must be downloaded by the user"):
        VideoAlign()
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        VideoAlign(checkpoint=str(tmp_path))


def test_patch_layout_equals_qwen2vl_image_processor(tmp_path):
    """Two identical frames make one temporal patch: the same patches Qwen2-VL's image processor makes of the
    frame (it repeats an image over the temporal patch)."""
    base = _base(tmp_path / "base")
    _video_reward(tmp_path / "VideoReward", base)
    (tmp_path / "prompt_template.py").write_text(TEMPLATE)
    va = VideoAlign(checkpoint=str(tmp_path / "VideoReward"), base_model=str(base),
                    templates=str(tmp_path / "prompt_template.py"), device="cpu", dtype="fp32")
    assert va.image_mean == [0.5, 0.4, 0.3]  # read from the base's preprocessor_config.json
    frame = (torch.rand(3, 56, 84) * 255).round()
    ours = va.patches(torch.stack([frame, frame]))
    ip = Qwen2VLImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], do_resize=False)
    theirs = ip(images=[frame.to(torch.uint8).permute(1, 2, 0).numpy()], return_tensors="pt")
    assert theirs["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert torch.allclose(ours, theirs["pixel_values"].float(), atol=1e-5)
