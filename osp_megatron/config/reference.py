"""The config reference, generated from the typed tree: `osp-train --help-config` and docs/config.md.

    python -m osp_megatron.config.reference > docs/config.md
"""
from __future__ import annotations

import json
import typing
from typing import List

from osp_megatron.config import Config
from osp_megatron.config.schema import fields_reference


def _default(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{json.dumps(value)}`"


def config_reference() -> str:
    """Markdown: one table per top-level section, one row per key (type, default, allowed values, meaning)."""
    hints = typing.get_type_hints(Config)
    lines: List[str] = [
        "# Configuration reference",
        "",
        "Generated from the typed config (`python -m osp_megatron.config.reference > docs/config.md`). Set keys in a",
        "YAML file (one mapping per section) or as `section.key=value` overrides on the command line",
        "(`osp-train configs/demo_cpu.yaml train.lr=1e-4`). Unknown keys, non-integer values for integer keys,",
        "NaN/inf numbers and duplicate YAML keys are errors.",
    ]
    for name, section in hints.items():
        doc = (section.__doc__ or "").strip().splitlines()[0] if section.__doc__ else ""
        lines += ["", f"## `{name}`", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in fields_reference(section, name):
            meaning = f.help.replace("|", "\\|")
            if f.choices:
                meaning += (" (one or more of, comma-separated: " if f.several else " (one of: ") + ", ".join(
                    f"`{c}`" for c in f.choices) + ")"
            lines.append(f"| `{f.key}` | {f.type} | {_default(f.default)} | {meaning} |")
    return "\n".join(lines) + "\n"


def undocumented() -> List[str]:
    """Keys without a description (a test keeps this empty)."""
    return [f.key for f in fields_reference(Config) if not f.help.strip()]


if __name__ == "__main__":
    print(config_reference(), end="")
