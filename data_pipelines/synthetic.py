"""The built-in synthetic image-text set: coloured shapes on a grid, generated in code."""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
SPLITS = ("train", "eval")
POPE_SPLITS = ("random", "popular", "adversarial")
QUESTION_KINDS = ("color", "shape", "count", "position", "presence")
DESCRIBE_PROMPT = "describe the image."

COLOR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
}
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (215, 215, 215))

# A skewed object prior makes POPE's "popular" split meaningful: models learn to hallucinate the
# objects they saw most often, so those make the hardest negatives.
_COLOR_WEIGHTS = {"red": 0.35, "green": 0.2, "blue": 0.3, "yellow": 0.15}
_SHAPE_WEIGHTS = {"circle": 0.45, "square": 0.35, "triangle": 0.2}
_ROWS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COLS = {2: ("left", "right"), 3: ("left", "center", "right")}
_MARGIN = 0.15  # of a cell, on each side, so neighbouring shapes never touch
# One scene content in _EVAL_BUCKETS (by a hash of its description) belongs to "eval", the rest to
# "train", so an eval scene is never seen in training even though the scene space is small.
_EVAL_BUCKETS = 8
_POPULAR_TOP_K = 3
# Independent random streams per record kind, so e.g. asking a vqa question never shifts the scene.
_SCENE, _CONVERSATION, _VQA, _PREFERENCE, _POPE, _DESCRIBE, _NOISE = range(7)
# The share of conversations that ask for a free description instead of questions, so an
# instruction-tuned model can describe images (what CHAIR-style hallucination evals score).
DESCRIBE_SHARE = 0.2

Object = tuple[str, str]  # (color, shape)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    cell: str


@dataclass
class Scene:
    objects: list[SceneObject]  # at most one per cell, in canonical (row-major cell) order
    grid: int = 2
    background: tuple[int, int, int] = (255, 255, 255)

    def object_set(self) -> set[Object]:
        return {(o.color, o.shape) for o in self.objects}


def cell_names(grid: int = 2) -> tuple[str, ...]:
    """Row-major cell names: ("top left", "top right", ...) for grid 2, with "center" for grid 3."""
    if grid not in _ROWS:
        raise ValueError(f"grid must be one of {sorted(_ROWS)}, got {grid}")
    names = [f"{row} {col}" for row in _ROWS[grid] for col in _COLS[grid]]
    return tuple("center" if n == "middle center" else n for n in names)


def all_objects() -> list[Object]:
    return [(c, s) for c in COLORS for s in SHAPES]


def object_names() -> list[str]:
    """Every "color shape" phrase of the closed vocabulary, e.g. "red circle"."""
    return [f"{c} {s}" for c, s in all_objects()]


def object_frequencies() -> dict[Object, float]:
    """The prior each object is drawn with (its expected share of the dataset's objects)."""
    weights = {(c, s): _COLOR_WEIGHTS[c] * _SHAPE_WEIGHTS[s] for c, s in all_objects()}
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


_MENTION = re.compile(rf"\b({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})s?\b")


def mentioned_objects(text: str) -> set[Object]:
    """The (color, shape) objects a free-text description mentions, for CHAIR-style scoring."""
    return {(m.group(1), m.group(2)) for m in _MENTION.finditer(text.lower())}


def sample_scene(rng: np.random.Generator, grid: int = 2, max_objects: int = 3) -> Scene:
    """1..max_objects distinct (color, shape) objects, each in its own cell."""
    cells = cell_names(grid)
    if not 1 <= max_objects <= len(cells):
        raise ValueError(
            f"max_objects must be in 1..{len(cells)} for grid {grid}, got {max_objects}"
        )
    kinds = all_objects()
    prior = object_frequencies()
    n = int(rng.integers(1, max_objects + 1))
    picked = rng.choice(len(kinds), size=n, replace=False, p=[prior[k] for k in kinds])
    where = sorted(rng.choice(len(cells), size=n, replace=False))
    objects = [
        SceneObject(shape=kinds[k][1], color=kinds[k][0], cell=cells[c])
        for k, c in zip(picked, where, strict=True)
    ]
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(objects=objects, grid=grid, background=background)


def render(scene: Scene, image_size: int = 64) -> np.ndarray:
    """The scene as a uint8 [image_size, image_size, 3] RGB array."""
    image = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(image)
    cells = cell_names(scene.grid)
    for obj in scene.objects:
        row, col = divmod(cells.index(obj.cell), scene.grid)
        x0, x1 = col * image_size // scene.grid, (col + 1) * image_size // scene.grid
        y0, y1 = row * image_size // scene.grid, (row + 1) * image_size // scene.grid
        m = max(1, round(_MARGIN * (x1 - x0)))
        box = (x0 + m, y0 + m, x1 - 1 - m, y1 - 1 - m)
        fill = COLOR_RGB[obj.color]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            apex = ((box[0] + box[2]) / 2, box[1])
            draw.polygon([apex, (box[0], box[3]), (box[2], box[3])], fill=fill)
    return np.asarray(image, dtype=np.uint8)


def describe(scene: Scene) -> str:
    """The canonical caption: objects in row-major cell order."""
    phrases = [f"a {o.color} {o.shape} at {o.cell}" for o in scene.objects]
    if not phrases:
        return "an empty image."
    head = ", ".join(phrases[:-1])
    return (f"{head} and {phrases[-1]}" if head else phrases[-1]) + "."


def questions(scene: Scene) -> dict[str, list[tuple[str, str]]]:
    """Every unambiguous (question, answer) pair about the scene, grouped by kind."""
    cells = cell_names(scene.grid)
    by_cell = {o.cell: o for o in scene.objects}
    shape_counts = Counter(o.shape for o in scene.objects)
    color_counts = Counter(o.color for o in scene.objects)
    present = scene.object_set()
    qa: dict[str, list[tuple[str, str]]] = {kind: [] for kind in QUESTION_KINDS}
    for o in scene.objects:
        if shape_counts[o.shape] == 1:
            qa["color"].append((f"what color is the {o.shape}?", o.color))
        qa["color"].append((f"what color is the shape at {o.cell}?", o.color))
        qa["position"].append((f"where is the {o.color} {o.shape}?", o.cell))
    for cell in cells:
        obj = by_cell.get(cell)
        qa["shape"].append((f"what shape is at {cell}?", obj.shape if obj else "nothing"))
    qa["count"].append(("how many shapes are there?", str(len(scene.objects))))
    qa["count"] += [(f"how many {c} shapes are there?", str(color_counts[c])) for c in COLORS]
    qa["count"] += [(f"how many {s}s are there?", str(shape_counts[s])) for s in SHAPES]
    # POPE's wording, so its probes ask what instruction tuning taught.
    qa["presence"] = [
        (f"is there a {c} {s} in the image?", "yes" if (c, s) in present else "no")
        for c, s in all_objects()
    ]
    return qa


def _ask(
    qa: dict[str, list[tuple[str, str]]],
    rng: np.random.Generator,
    asked: Collection[str] = (),
    kind: str | None = None,
) -> tuple[str, str, str]:
    # Kind, then answer, then question: balancing answers within a kind (yes/no 50/50, counts
    # spread out) keeps a blind language prior from solving the set, as in VQA v2.
    open_qa = {k: [(q, a) for q, a in v if q not in asked] for k, v in qa.items()}
    kinds = [kind] if kind else [k for k in QUESTION_KINDS if open_qa[k]]
    kind = kinds[int(rng.integers(len(kinds)))]
    answers = sorted({a for _, a in open_qa[kind]})
    answer = answers[int(rng.integers(len(answers)))]
    options = [q for q, a in open_qa[kind] if a == answer]
    return options[int(rng.integers(len(options)))], answer, kind


def _choose(rng: np.random.Generator, items: list[Object]) -> Object:
    return items[int(rng.integers(len(items)))]


class SyntheticShapes:
    """Records of the synthetic set; record i of a split depends only on (seed, split, i).

    `split` ("train" or "eval") picks disjoint scene contents, so eval measures generalization to
    unseen combinations. Images are uint8 arrays rather than encoded bytes.
    `description_noise` is the share of conversations' free descriptions that name one absent
    object too, as machine-written instruction data sometimes does: the source of the
    hallucinations that preference tuning then removes. `describe_share` is the share of
    conversations that are one free description (the rest: 1-3 questions).
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        grid: int = 2,
        max_objects: int = 3,
        split: str = "train",
        description_noise: float = 0.0,
        describe_share: float = DESCRIBE_SHARE,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0.0 <= description_noise <= 1.0:
            raise ValueError(f"description_noise must be in [0, 1], got {description_noise}")
        self.description_noise = description_noise
        if not 0.0 <= describe_share <= 1.0:
            raise ValueError(f"describe_share must be in [0, 1], got {describe_share}")
        self.describe_share = describe_share
        if image_size < 8 * grid:
            raise ValueError(f"image_size {image_size} is too small for a {grid}x{grid} grid")
        self.seed, self.image_size, self.split = seed, image_size, split
        self.grid, self.max_objects = grid, max_objects
        self._split_id = SPLITS.index(split)
        sample_scene(np.random.default_rng(0), grid, max_objects)  # validates grid and max_objects

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"record index must be >= 0, got {index}")
        return np.random.default_rng([self.seed, self._split_id, int(index), stream])

    def _id(self, index: int) -> str:
        return f"shapes-{self.split}-{index}"

    def scene(self, index: int) -> Scene:
        rng = self._rng(index, _SCENE)
        while True:
            scene = sample_scene(rng, self.grid, self.max_objects)
            held_out = zlib.crc32(describe(scene).encode()) % _EVAL_BUCKETS == 0
            if held_out == (self.split == "eval"):
                return scene

    def image(self, index: int) -> np.ndarray:
        return render(self.scene(index), self.image_size)

    def objects(self, index: int) -> set[Object]:
        """The (color, shape) objects present in image `index` (ground truth for CHAIR)."""
        return self.scene(index).object_set()

    def caption(self, index: int) -> dict:
        scene = self.scene(index)
        return {
            "id": self._id(index),
            "image": render(scene, self.image_size),
            "caption": describe(scene),
        }

    def conversation(self, index: int) -> dict:
        scene = self.scene(index)
        if self._rng(index, _DESCRIBE).random() < self.describe_share:
            noise = self._rng(index, _NOISE)
            told = self._with_absent_object(scene, noise) if (
                noise.random() < self.description_noise) else scene
            return {
                "id": self._id(index),
                "images": [render(scene, self.image_size)],
                "conversations": [
                    {"from": "human", "value": f"<image>\n{DESCRIBE_PROMPT}"},
                    {"from": "gpt", "value": describe(told)},
                ],
            }
        rng = self._rng(index, _CONVERSATION)
        qa, asked, turns = questions(scene), set(), []
        for turn in range(int(rng.integers(1, 4))):
            question, answer, _ = _ask(qa, rng, asked)
            asked.add(question)
            turns.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
            turns.append({"from": "gpt", "value": answer})
        return {
            "id": self._id(index),
            "images": [render(scene, self.image_size)],
            "conversations": turns,
        }

    def vqa(self, index: int, kind: str | None = None) -> dict:
        """One question; `kind` (one of QUESTION_KINDS) fixes its kind, e.g. for per-kind eval."""
        if kind is not None and kind not in QUESTION_KINDS:
            raise ValueError(f"kind must be one of {QUESTION_KINDS}, got {kind!r}")
        scene = self.scene(index)
        question, answer, kind = _ask(questions(scene), self._rng(index, _VQA), kind=kind)
        return {
            "id": self._id(index),
            "image": render(scene, self.image_size),
            "question": question,
            "answer": answer,
            "kind": kind,
        }

    def _with_absent_object(self, scene: Scene, rng: np.random.Generator) -> Scene:
        """The scene plus one absent object (drawn by the prior) in a free cell."""
        present = scene.object_set()
        prior = object_frequencies()
        absent = [o for o in all_objects() if o not in present]
        weights = np.array([prior[o] for o in absent])
        color, shape = absent[int(rng.choice(len(absent), p=weights / weights.sum()))]
        cells = cell_names(self.grid)
        used = {o.cell for o in scene.objects}
        free = [c for c in cells if c not in used] or list(cells)
        fake = SceneObject(shape=shape, color=color, cell=free[int(rng.integers(len(free)))])
        # A full grid puts the fake on an occupied cell; the stable sort keeps the real one first.
        return Scene(
            sorted([*scene.objects, fake], key=lambda o: cells.index(o.cell)),
            self.grid,
            scene.background,
        )

    def preference(self, index: int) -> dict:
        """chosen: the faithful description; rejected: the same plus one absent object."""
        scene = self.scene(index)
        hallucinated = self._with_absent_object(scene, self._rng(index, _PREFERENCE))
        return {
            "id": self._id(index),
            "images": [render(scene, self.image_size)],
            "prompt": f"<image>\n{DESCRIBE_PROMPT}",
            "chosen": describe(scene),
            "rejected": describe(hallucinated),
        }

    def pope(self, index: int, split: str = "random") -> dict:
        """A POPE probe; even indices ask about a present object, odd ones about an absent one.

        Negatives follow the POPE paper: "random" is any absent object, "popular" one of the most
        frequent absent objects, "adversarial" an absent object sharing a color or shape with a
        present one (our analogue of co-occurrence).
        """
        if split not in POPE_SPLITS:
            raise ValueError(f"POPE split must be one of {POPE_SPLITS}, got {split!r}")
        scene = self.scene(index)
        # One stream for all three POPE splits, so they differ only in how negatives are chosen.
        rng = self._rng(index, _POPE)
        present = [o for o in all_objects() if o in scene.object_set()]
        absent = [o for o in all_objects() if o not in scene.object_set()]
        if index % 2 == 0:
            answer, (color, shape) = "yes", _choose(rng, present)
        else:
            if split == "popular":
                prior = object_frequencies()
                absent = sorted(absent, key=lambda o: -prior[o])[:_POPULAR_TOP_K]
            elif split == "adversarial":
                absent = [
                    a for a in absent if any(a[0] == p[0] or a[1] == p[1] for p in present)
                ] or absent
            answer, (color, shape) = "no", _choose(rng, absent)
        return {
            "id": f"{self._id(index)}-pope-{split}",
            "image": render(scene, self.image_size),
            "question": f"is there a {color} {shape} in the image?",
            "answer": answer,
            "split": split,
        }

    def corpus(self, n: int) -> list[str]:
        """Text lines for training a tokenizer: the closed vocabulary, then n records' texts."""
        lines = [*object_names(), *cell_names(self.grid), "yes", "no", "nothing", DESCRIBE_PROMPT]
        lines += [" ".join(str(d) for d in range(10))]
        lines += [" ".join(f"how many {s}s are there?" for s in SHAPES)]
        for i in range(n):
            lines.append(self.caption(i)["caption"])
            turns = self.conversation(i)["conversations"]
            lines += [t["value"].replace("<image>\n", "") for t in turns]
            lines.append(self.preference(i)["rejected"])
            lines.append(self.pope(i, POPE_SPLITS[i % len(POPE_SPLITS)])["question"])
        return lines
