"""`grpo.recipe`: the values resolved from a recipe equal the tables in docs/grpo.md (read from the file), config
keys win over the recipe, and the shipped OSP-Next config resolves to OSP-Next's recipe."""
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from osp_megatron.config import ConfigError, GRPOConfig, load_config, parse_section
from osp_megatron.config.grpo_recipes import RECIPE_VALUES, WAN_NEGATIVE_PROMPT

ROOT = Path(__file__).resolve().parents[2]


def doc_table(recipe: str):
    """`{key: value text}` of the recipe's table in docs/grpo.md."""
    text = (ROOT / "docs" / "grpo.md").read_text()
    section = text.split(f"### `grpo.recipe: {recipe}`", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `grpo\.([\w.]+)` \| `(.*?)` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2).replace("\\|", "|")
        elif line.startswith("| `"):
            raise AssertionError(f"unparsed table row {line!r}")
    return rows


def resolved(g, key):
    node = g
    for part in key.split("."):
        node = getattr(node, part)
    return node


def as_doc_text(value):
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return repr(value)


@pytest.mark.parametrize("recipe", ["osp-next", "mixgrpo"])
def test_resolved_recipe_equals_the_documented_table(recipe):
    table = doc_table(recipe)
    assert len(table) == len(RECIPE_VALUES[recipe]) > 20
    g = parse_section(GRPOConfig, {"recipe": recipe})
    for key, text in table.items():
        value = resolved(g, key)
        assert as_doc_text(value) == text, (key, value, text)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert value == ast.literal_eval(text), key


def test_osp_next_values_that_differ_from_the_defaults():
    g, d = parse_section(GRPOConfig, {"recipe": "osp-next"}), GRPOConfig()
    assert (g.shift, g.adam_eps, g.weight_decay, g.ema_decay, g.lora.init) == (1.0, 1e-15, 0.0, 0.9999, "gaussian")
    assert (d.shift, d.adam_eps, d.weight_decay, d.ema_decay, d.lora.init) == (3.0, 1e-8, 1e-4, 0.0, "kaiming")
    assert g.negative_prompt == WAN_NEGATIVE_PROMPT and g.negative_prompt.startswith("色调艳丽")
    assert g.cfg_train_uncond == "detached" and g.zero_adv_filter and g.updates_per_iteration == 0
    assert (g.window.strategy, g.window.start, g.window.size) == ("fixed", 0, 10)


def test_config_keys_win_over_the_recipe_and_bad_recipes_are_named():
    g = parse_section(GRPOConfig, {"recipe": "osp-next", "lr": 1e-4, "window": {"size": 6}})
    assert g.lr == 1e-4 and g.window.size == 6 and g.window.strategy == "fixed" and g.adam_eps == 1e-15
    with pytest.raises(ConfigError, match=r"grpo.recipe='osp_next'.*did you mean `osp-next`"):
        parse_section(GRPOConfig, {"recipe": "osp_next"})
    # the recipe's values are the resolved config: a round trip through asdict keeps them
    again = parse_section(GRPOConfig, dataclasses.asdict(g))
    assert again == g


def test_shipped_osp_14b_config_resolves_to_the_recipe():
    cfg = load_config(ROOT / "configs" / "grpo_osp_14b.yaml")
    ref = parse_section(GRPOConfig, {"recipe": "osp-next"})
    for entry in RECIPE_VALUES["osp-next"]:
        assert resolved(cfg.grpo, entry.key) == resolved(ref, entry.key), entry.key
    # an override on the command line wins too
    cfg = load_config(ROOT / "configs" / "grpo_osp_14b.yaml", ["grpo.shift=5.0"])
    assert cfg.grpo.shift == 5.0 and cfg.grpo.recipe == "osp-next"
