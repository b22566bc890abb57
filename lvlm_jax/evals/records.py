"""Eval records of each task: from the synthetic set's eval split, or from a JSONL/ArrayRecord path.

Record shapes (images as uint8 arrays, encoded bytes or file paths):
    vqa              {id, image, question, answer | answers: [...], [kind]}
    caption          {id, image, caption | captions: [...], [prompt]}
    pope             {id, image, question, answer: "yes"|"no", [split]}
    chair            {id, image, objects: [canonical names], [prompt]}
    multiple_choice  {id, image, question, options: [...], answer: index | letter}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from data_pipelines import synthetic
from data_pipelines.synthetic import SyntheticShapes

DESCRIBE_PROMPT = synthetic.DESCRIBE_PROMPT
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."

# The closed answer set of each synthetic question kind: the options of a multiple-choice item.
_SYNTHETIC_OPTIONS = {
    "color": list(synthetic.COLORS),
    "shape": [*synthetic.SHAPES, "nothing"],
    "position": list(synthetic.CELLS),
    "presence": ["yes", "no"],
}


def synthetic_vocabulary() -> dict[str, list[str]]:
    """CHAIR's vocabulary for the synthetic set: every "color shape" name, no synonyms."""
    return {name: [] for name in synthetic.object_names()}


def synthetic_pope(shapes: SyntheticShapes, n: int) -> list[dict]:
    """`n` probes split evenly over random/popular/adversarial (at least one each)."""
    per_split = max(1, -(-n // len(synthetic.POPE_SPLITS)))
    return [shapes.pope(i, split) for split in synthetic.POPE_SPLITS for i in range(per_split)]


def synthetic_chair(shapes: SyntheticShapes, n: int) -> list[dict]:
    records = []
    for i in range(n):
        rec = shapes.caption(i)
        names = sorted(f"{c} {s}" for c, s in shapes.objects(i))
        records.append({"id": rec["id"], "image": rec["image"], "objects": names,
                        "caption": rec["caption"]})
    return records


def synthetic_multiple_choice(shapes: SyntheticShapes, n: int) -> list[dict]:
    """VQA questions with the closed answer set of their kind as options."""
    records = []
    for i in range(n):
        rec = shapes.vqa(i)
        if rec["kind"] == "count":
            options = [str(k) for k in range(shapes.max_objects + 1)]
        else:
            options = _SYNTHETIC_OPTIONS[rec["kind"]]
        records.append({**rec, "options": options, "answer": options.index(rec["answer"])})
    return records


def synthetic_records(task: str, n: int, *, seed: int, image_size: int) -> list[dict]:
    """The first `n` records of `task` from the synthetic set's eval split."""
    shapes = SyntheticShapes(seed=seed, image_size=image_size, split="eval")
    if task == "vqa":
        return [shapes.vqa(i) for i in range(n)]
    if task == "caption":
        return [shapes.caption(i) for i in range(n)]
    if task == "pope":
        return synthetic_pope(shapes, n)
    if task == "chair":
        return synthetic_chair(shapes, n)
    if task == "multiple_choice":
        return synthetic_multiple_choice(shapes, n)
    raise ValueError(f"no synthetic records for eval task {task!r}")


def _image_of(record: dict, base_dir: str) -> Any:
    image = record.get("image")
    if image is None and record.get("images"):
        image = record["images"][0]
    if image is None:
        raise ValueError(f"eval record {record.get('id')!r} has no image")
    if isinstance(image, str) and not os.path.isabs(image):
        image = os.path.join(base_dir, image)  # JSONL image paths are relative to the file
    return image


def _check_fields(task: str, record: dict, required: Sequence[Sequence[str]]) -> None:
    for alternatives in required:
        if not any(k in record for k in alternatives):
            raise ValueError(f"eval task {task!r}: record {record.get('id')!r} lacks "
                             f"{' or '.join(repr(k) for k in alternatives)}")


_REQUIRED = {
    "vqa": [("question",), ("answer", "answers")],
    "caption": [("caption", "captions")],
    "pope": [("question",), ("answer", "label")],
    "chair": [("objects",)],
    "multiple_choice": [("question",), ("options",), ("answer",)],
}


def load_records(task: str, path: str, n: int) -> list[dict]:
    """The first `n` records of a JSONL file or an ArrayRecord folder/shard (`lvlm data
    convert`'s record format), each with its image and the fields `task` needs."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"eval records for {task!r}: {path!r} does not exist")
    raw: list[dict] = []
    if os.path.isfile(path) and path.endswith((".jsonl", ".json")):
        base = os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if len(raw) >= n:
                    break
                if line.strip():
                    try:
                        raw.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
    else:
        from data_pipelines.arrayrecord_source import ArrayRecordSource

        base = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
        source = ArrayRecordSource(path)
        raw = [source[i] for i in range(min(n, len(source)))]
    records = []
    for i, rec in enumerate(raw):
        rec = {"id": str(rec.get("id", i)), **rec}
        _check_fields(task, rec, _REQUIRED[task])
        rec["image"] = _image_of(rec, base)
        if task == "pope" and "answer" not in rec:
            rec["answer"] = rec["label"]
        records.append(rec)
    if not records:
        raise ValueError(f"eval records for {task!r}: {path!r} holds no records")
    return records
