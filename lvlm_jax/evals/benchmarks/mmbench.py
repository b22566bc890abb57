"""MMBench (dev, English): VLMEvalKit's released TSV with base64 images, CircularEval."""

from __future__ import annotations

import base64
import collections
import contextlib
import csv
import sys
from collections.abc import Iterator, Sequence

from lvlm_jax.evals.benchmarks.base import (
    LETTER_INSTRUCTION,
    LETTERS,
    Benchmark,
    Loaded,
    Result,
    Skip,
    choice_examples,
    collect,
    first_existing,
    lettered,
    malformed_file,
    mean,
    slug,
)
from lvlm_jax.evals.metrics_choice import circular_accuracy, circular_rotations

NAME = "mmbench"
FILES = ("MMBench_DEV_EN.tsv", "MMBench_DEV_EN_V11.tsv")
COPY = 1_000_000  # VLMEvalKit: a circular copy's index is the original's + k * 1e6
# The strings pandas reads as NaN (VLMEvalKit and LLaVA read the TSV with pandas).
_NA = {"", "nan", "NaN", "None", "NA", "N/A", "n/a", "null", "NULL", "<NA>", "#N/A"}


@contextlib.contextmanager
def _long_fields() -> Iterator[None]:
    # A base64 image is far longer than csv's default 128 KiB field limit.
    old = csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _rows(path: str) -> list[dict] | None:
    try:
        with _long_fields(), open(path, encoding="utf-8", errors="replace", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    except (OSError, csv.Error):
        return None


def _value(row: dict, column: str) -> str:
    value = row.get(column)
    return "" if value is None or value.strip() in _NA else value


def _index(row: dict) -> int | None:
    try:
        return int(str(row.get("index")).strip())
    except ValueError:
        return None


def read(task_dir: str, limit: int = 0) -> Loaded:
    """One record per row, or, for a file without circular copies, per rotation of each row
    (made with circular_rotations; ids numbered as VLMEvalKit numbers its copies). Records keep
    `group` (the original's index) and `rotation`; `limit` counts groups, whole."""
    rows = _rows(first_existing(task_dir, FILES, NAME))
    if rows is None:
        return malformed_file()
    # VLMEvalKit (ImageBaseDataset): an image field of 64 characters or fewer is the index of
    # the row whose image it shares.
    images = {str(r.get("index")).strip(): r.get("image") or "" for r in rows}
    indices = [_index(r) for r in rows]
    if limit:
        groups = list(dict.fromkeys(i % COPY for i in indices if i is not None))[:limit]
        keep = set(groups)
        rows = [r for r, i in zip(rows, indices, strict=True) if i is None or i % COPY in keep]

    def make(row: dict) -> dict:
        index = _index(row)
        options = [_value(row, c) for c in LETTERS if _value(row, c)]
        letter = _value(row, "answer").strip()
        if index is None or len(options) < 2 or len(letter) != 1 or letter not in LETTERS[
                :len(options)]:
            raise ValueError("no index, or the answer is not an option")
        image = (row.get("image") or "").strip()
        if len(image) <= 64:
            image = images.get(image, "").strip()
            if len(image) <= 64:
                raise Skip("missing image")
        try:
            data = base64.b64decode(image, validate=True)
        except ValueError:
            raise Skip("undecodable image") from None
        return {"id": str(index), "group": index % COPY, "rotation": index // COPY,
                "image": data, "question": _value(row, "question"), "hint": _value(row, "hint"),
                "options": options, "answer": LETTERS.index(letter),
                "category": _value(row, "category"),
                "l2_category": _value(row, "l2-category") or _value(row, "L2-category")}

    loaded = collect(rows, make, 0)
    if not any(i is not None and i >= COPY for i in indices):
        loaded.records = [rot for rec in loaded.records for rot in _rotations(rec)]
    return loaded


def _rotations(record: dict) -> list[dict]:
    return [{**record, "id": str(record["group"] + k * COPY), "rotation": k, "options": options,
             "answer": answer}
            for k, (options, answer) in enumerate(circular_rotations(record["options"],
                                                                     record["answer"]))]


def fields(record: dict) -> dict[str, str]:
    hint = record["hint"]
    return {"question": record["question"], "options": lettered(record["options"]),
            "context": f"{hint}\n" if hint else ""}


def score(records: Sequence[dict], predictions: Sequence[str]) -> Result:
    """CircularEval (a question counts when every rotation of its options is answered right),
    overall and per category; mmbench_accuracy: the original rows (rotation 0) alone."""
    examples = choice_examples(records, predictions, keep=("group", "rotation", "category"))
    summary = {f"{NAME}_circular_accuracy": _circular(examples),
               f"{NAME}_accuracy": mean(e["correct"] for e in examples if e["rotation"] == 0)}
    for category in sorted({e["category"] for e in examples if e["category"]}):
        summary[f"{NAME}_circular_accuracy_{slug(category)}"] = _circular(
            [e for e in examples if e["category"] == category])
    return summary, examples


def _circular(examples: Sequence[dict]) -> float:
    by_group: dict[int, list[bool]] = collections.defaultdict(list)
    for e in examples:
        by_group[e["group"]].append(e["correct"])
    return circular_accuracy(by_group) if by_group else 0.0


# LLaVA-1.5's model_vqa_mmbench.py --single-pred-prompt: hint, question, "A. ..." lines.
BENCHMARK = Benchmark(
    name=NAME, read=read, score=score, fields=fields, max_new_tokens=16,
    prompt="{context}{question}\n{options}\n" + LETTER_INSTRUCTION,
    description=f"{FILES[0]} (or {FILES[1]}): VLMEvalKit's TSV, images base64",
)
