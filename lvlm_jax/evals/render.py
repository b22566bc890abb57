"""Renders an eval example for TensorBoard: the image, and below it the question, the model's
answer and the reference, drawn with PIL."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines.images import to_rgb_uint8

WIDTH = 256
_LINE_HEIGHT = 12
_CHARS_PER_LINE = 40  # PIL's default bitmap font is about 6 px a character
_MAX_LINES_PER_FIELD = 4


def _lines(label: str, text: Any) -> list[str]:
    text = " ".join(str(text).split()) or "(empty)"
    wrapped = textwrap.wrap(f"{label}: {text}", _CHARS_PER_LINE) or [f"{label}:"]
    if len(wrapped) > _MAX_LINES_PER_FIELD:
        wrapped = wrapped[:_MAX_LINES_PER_FIELD]
        wrapped[-1] = wrapped[-1][:_CHARS_PER_LINE - 3] + "..."
    return wrapped


def render_example(image: Any, fields: Sequence[tuple[str, Any]], width: int = WIDTH
                   ) -> np.ndarray:
    """uint8 [H, width, 3]: the image scaled to `width` (nearest, so small synthetic images stay
    sharp) above one wrapped text block per (label, text) field."""
    rgb = Image.fromarray(to_rgb_uint8(image))
    height = max(1, round(rgb.height * width / rgb.width))
    rgb = rgb.resize((width, height), Image.Resampling.NEAREST)
    lines = [line for label, text in fields for line in _lines(label, text)]
    canvas = Image.new("RGB", (width, height + 4 + _LINE_HEIGHT * len(lines)), (255, 255, 255))
    canvas.paste(rgb, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, line in enumerate(lines):
        draw.text((3, height + 2 + k * _LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def render_result(record: dict, example: dict) -> np.ndarray:
    """One per-example eval result (question/prediction/reference) over its record's image."""
    return render_example(record["image"], [("Q", example.get("question", "")),
                                            ("model", example.get("prediction", "")),
                                            ("ref", example.get("reference", ""))])
