"""Metric-curve PNGs drawn from metrics.jsonl records (`loss_curve.png` of the trainer, refreshed at each save).

Drawn with matplotlib when it is installed (it comes with mlflow), else with Pillow as a plain line plot with axes
and min/max labels; written atomically (temp file + os.replace).
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

RENDERERS = ("auto", "matplotlib", "pillow")


def curve_points(records: Sequence[Dict[str, float]], key: str) -> List[Tuple[int, float]]:
    """(step, value) of every record holding a finite `key`, in step order (a step logged twice keeps the last)."""
    points: Dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if value is not None and math.isfinite(float(value)):
            points[int(record["step"])] = float(value)
    return sorted(points.items())


def write_curve_png(path: str | Path, points: Sequence[Tuple[int, float]], key: str, title: str = "",
                    renderer: str = "auto") -> Optional[Path]:
    """Line plot of `points` [(step, value), ...] -> PNG at `path` (tmp + rename). None when there is no point or
    no drawing library (neither matplotlib nor Pillow)."""
    if not points:
        return None
    if renderer not in RENDERERS:
        raise ValueError(f"renderer={renderer!r}: use one of {', '.join(RENDERERS)}")
    png = None
    if renderer in ("auto", "matplotlib"):
        png = _matplotlib_png(points, key, title)
        if png is None and renderer == "matplotlib":
            raise RuntimeError("matplotlib is not installed: pip install matplotlib (or renderer='pillow')")
    if png is None:
        png = _pillow_png(points, key, title)
    if png is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    tmp.write_bytes(png)
    os.replace(tmp, path)
    return path


def _matplotlib_png(points, key: str, title: str) -> Optional[bytes]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(6.4, 3.6), dpi=100)  # no pyplot: no global state, no GUI backend
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps, values = zip(*points)
    ax.plot(steps, values, linewidth=1.2, marker="." if len(points) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title or f"{key} vs step")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _pillow_png(points, key: str, title: str, size: Tuple[int, int] = (640, 360)) -> Optional[bytes]:
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    s0, s1 = min(steps), max(steps)
    v0, v1 = min(values), max(values)
    if s1 == s0:
        s0, s1 = s0 - 1, s1 + 1
    if v1 == v0:
        pad = abs(v0) * 0.05 or 1.0
        v0, v1 = v0 - pad, v1 + pad

    def xy(step: float, value: float) -> Tuple[float, float]:
        x = left + (step - s0) / (s1 - s0) * (w - left - right)
        y = h - bottom - (value - v0) / (v1 - v0) * (h - top - bottom)
        return x, y

    draw.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black", width=1)  # axes
    for value in (v0, v1):
        _, y = xy(s0, value)
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((4, y - 6), f"{value:.4g}", fill="black")
    for step in (s0, s1):
        x, _ = xy(step, v0)
        draw.line([(x, h - bottom), (x, h - bottom + 4)], fill="black")
        draw.text((x - 10, h - bottom + 8), str(int(step)), fill="black")
    draw.text((w // 2 - 15, h - 16), "step", fill="black")
    draw.text((left, 8), title or f"{key} vs step", fill="black")
    line = [xy(s, v) for s, v in points]
    if len(line) > 1:
        draw.line(line, fill=(31, 119, 180), width=2)
    for x, y in line if len(line) < 50 else ():
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(31, 119, 180))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["RENDERERS", "curve_points", "write_curve_png"]
