"""A built-in high-resolution task: one small shape in a large image of varied aspect ratio.

The shape is 16 px wide in a 96-192 px canvas, so squeezing the whole image into one crop of
the vision tower's size blurs it into a coloured dot (its colour survives, its outline does not),
while any-res tiles keep it several pixels wide. The question asks for the shape, so held-out
accuracy separates any-res from the plain resize (bench/anyres_vs_resize.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.synthetic import COLOR_RGB, SHAPES, SPLITS

# (height, width) of the canvases: wide, tall and square, so any-res picks different grids.
SIZES = ((96, 192), (192, 96), (144, 144), (96, 144), (144, 96))
QUESTION = "What shape is the small object?"
BACKGROUND = (240, 240, 240)


class HighResShapes:
    """Records {id, image, conversations} of the task; record i of a split depends only on
    (seed, split, i). `object_size` is the shape's side in pixels of the canvas."""

    def __init__(self, seed: int = 0, split: str = "train", object_size: int = 16,
                 sizes: tuple[tuple[int, int], ...] = SIZES):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if any(min(h, w) < 2 * object_size for h, w in sizes):
            raise ValueError(f"canvases {sizes} are too small for {object_size}-pixel shapes")
        self.seed, self.split, self.object_size, self.sizes = seed, split, object_size, sizes
        self._split_id = SPLITS.index(split)

    def sample(self, index: int) -> tuple[np.ndarray, str, str]:
        """(uint8 image, shape, colour) of record `index`."""
        if index < 0:
            raise IndexError(f"record index must be >= 0, got {index}")
        # A stream apart from SyntheticShapes' (7 streams): the tasks never share draws.
        rng = np.random.default_rng([self.seed, self._split_id, int(index), 101])
        h, w = self.sizes[rng.integers(len(self.sizes))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLOR_RGB)[rng.integers(len(COLOR_RGB))]
        s = self.object_size
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        image = Image.new("RGB", (int(w), int(h)), BACKGROUND)
        draw = ImageDraw.Draw(image)
        box = (x, y, x + s - 1, y + s - 1)
        fill = COLOR_RGB[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])],
                         fill=fill)
        return np.asarray(image, np.uint8), shape, color

    def conversation(self, index: int) -> dict[str, Any]:
        image, shape, _ = self.sample(index)
        return {"id": f"highres-{self.split}-{index}", "image": image,
                "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                  {"from": "gpt", "value": shape}]}

    def vqa(self, index: int) -> dict[str, Any]:
        """The question with its reference answer, for held-out accuracy."""
        image, shape, _ = self.sample(index)
        return {"id": f"highres-{self.split}-{index}", "image": image, "question": QUESTION,
                "answer": shape, "kind": "shape"}


class HighResSource:
    """`n` HighResShapes conversations, random access (data.source="synthetic_highres")."""

    def __init__(self, n: int, seed: int = 0, split: str = "train"):
        self.n, self._task = n, HighResShapes(seed=seed, split=split)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"record {index} out of range for {self.n} records")
        return self._task.conversation(index)

    def __repr__(self) -> str:
        return f"HighResSource(n={self.n}, split={self._task.split!r})"
