"""Clip filter for `osp-shards`: duration, resolution, fps and aspect-ratio bounds read from YAML.

YAML keys (all optional): min_duration, max_duration (seconds), min_width, min_height (pixels),
min_fps, max_fps, min_aspect, max_aspect (width / height), require_caption (bool).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import yaml


class FilterConfigError(ValueError):
    """A bad filter config; the message names the field and the fix."""


@dataclass
class FilterConfig:
    min_duration: float = 0.0
    max_duration: Optional[float] = None
    min_width: int = 1
    min_height: int = 1
    min_fps: float = 0.0
    max_fps: Optional[float] = None
    min_aspect: Optional[float] = None
    max_aspect: Optional[float] = None
    require_caption: bool = True

    def validate(self, errors: List[str], prefix: str = "filter") -> None:
        def nonneg(name: str) -> None:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0):
                errors.append(f"{prefix}.{name}={v!r}: must be a number >= 0")

        for name in ("min_duration", "max_duration", "min_width", "min_height", "min_fps", "max_fps",
                     "min_aspect", "max_aspect"):
            nonneg(name)
        if not isinstance(self.require_caption, bool):
            errors.append(f"{prefix}.require_caption={self.require_caption!r}: must be true or false")
        for lo, hi in (("min_duration", "max_duration"), ("min_fps", "max_fps"), ("min_aspect", "max_aspect")):
            a, b = getattr(self, lo), getattr(self, hi)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > b:
                errors.append(f"{prefix}.{lo}={a} > {prefix}.{hi}={b}: the range is empty; lower {lo} or raise {hi}")

    def reject_reason(self, probe: Dict[str, Any]) -> Optional[str]:
        """None if the probed clip passes, else a short reason (first word is the category)."""
        dur, fps = probe["duration"], probe["fps"]
        w, h = probe["width"], probe["height"]
        if dur < self.min_duration:
            return f"too_short: {dur:.3f} s < min_duration {self.min_duration} s"
        if self.max_duration is not None and dur > self.max_duration:
            return f"too_long: {dur:.3f} s > max_duration {self.max_duration} s"
        if w < self.min_width or h < self.min_height:
            return f"too_small: {w}x{h} below min {self.min_width}x{self.min_height} (width x height)"
        if fps < self.min_fps or (self.max_fps is not None and fps > self.max_fps):
            return f"fps_out_of_range: {fps:.3f} not in [{self.min_fps}, {self.max_fps}]"
        aspect = w / h
        if (self.min_aspect is not None and aspect < self.min_aspect) or (
            self.max_aspect is not None and aspect > self.max_aspect
        ):
            return f"aspect_out_of_range: width/height {aspect:.3f} not in [{self.min_aspect}, {self.max_aspect}]"
        return None


def load_filter_config(path: Optional[str]) -> FilterConfig:
    """Read a filter YAML (None -> defaults); raises FilterConfigError naming bad or unknown fields."""
    if not path:
        return FilterConfig()
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as exc:
        raise FilterConfigError(f"--config {path}: cannot read ({exc.strerror}); give a readable YAML file") from None
    except yaml.YAMLError as exc:
        raise FilterConfigError(f"--config {path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise FilterConfigError(f"--config {path}: expected a mapping of filter fields, got {type(raw).__name__}")
    raw = raw.get("filter", raw) if isinstance(raw.get("filter"), dict) else raw
    names = {f.name for f in dataclasses.fields(FilterConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise FilterConfigError(f"--config {path}: unknown filter field(s) {unknown}; valid fields are {sorted(names)}")
    cfg = FilterConfig(**raw)
    errors: List[str] = []
    cfg.validate(errors)
    if errors:
        raise FilterConfigError(f"--config {path}: invalid filter config:\n  - " + "\n  - ".join(errors))
    return cfg


__all__ = ["FilterConfig", "FilterConfigError", "load_filter_config"]
