"""MMMU (validation): the Hugging Face release's per-subject parquet files; MMMU's own scoring."""

from __future__ import annotations

import ast
import glob
import os
from collections.abc import Sequence
from typing import Any

from lvlm_jax.evals.benchmarks.base import (
    LETTER_INSTRUCTION,
    LETTERS,
    MALFORMED_FILE,
    Benchmark,
    Loaded,
    MissingFiles,
    Result,
    Skip,
    collect,
    example,
    lettered,
    mean,
)
from lvlm_jax.evals.metrics_choice import mmmu_open_correct, mmmu_parse_choice

NAME = "mmmu"
PATTERN = "*/validation-*.parquet"  # <Subject>/validation-00000-of-00001.parquet
MULTIPLE_CHOICE = "multiple-choice"
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."


def _literal(text: Any) -> Any:
    # The release stores options (and some open answers) as Python list literals in strings.
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        raise ValueError("not a Python literal") from None


def _parquet_rows(path: str) -> list[dict] | None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("the mmmu task reads the release's parquet files with pyarrow: "
                          "pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception:  # pyarrow's errors (ArrowInvalid, OSError, ...): a file that is no parquet
        return None


def _make(subject: str, row: dict) -> dict:
    images = [row.get(f"image_{k}") for k in range(1, 8)]
    images = [im.get("bytes") if isinstance(im, dict) else None for im in images]
    if not images[0]:
        raise Skip("missing image")
    kind = row["question_type"]
    options = _literal(row["options"]) if row.get("options") else []
    if not isinstance(options, list):
        raise ValueError("options are not a list")
    record = {"id": str(row["id"]), "image": images[0], "question": str(row["question"]),
              "options": [str(o) for o in options], "question_type": kind, "subject": subject,
              "subfield": row.get("subfield"), "num_images": sum(bool(im) for im in images)}
    answer = str(row["answer"]).strip()
    if kind == MULTIPLE_CHOICE:
        if len(answer) != 1 or answer not in LETTERS[:len(options)]:
            raise ValueError("the answer is not an option's letter")
        record["answer"] = LETTERS.index(answer)
    elif kind == "open":
        # Some open answers list several accepted forms: "['24/7', '3.429']".
        answers = _literal(answer) if answer.startswith("[") else answer
        record["answers"] = [str(a) for a in answers] if isinstance(answers, list) else answer
    else:
        raise ValueError(f"unknown question_type {kind!r}")
    return record


def read(task_dir: str, limit: int = 0) -> Loaded:
    """Every subject's validation questions (subjects in name order). The model sees one image:
    image_1, as MMMU's run_llava.py gives LLaVA-1.5; `num_images` says how many the question
    has, and its "<image k>" placeholders stay in the text, as both MMMU's and lmms-eval's
    single-image prompts leave them."""
    paths = sorted(glob.glob(os.path.join(glob.escape(task_dir), PATTERN)))
    if not paths:
        raise MissingFiles(f"{NAME}: {task_dir!r} lacks <Subject>/validation-00000-of-00001"
                           ".parquet (the Hugging Face MMMU/MMMU release is expected there)")
    items, bad_files = [], 0
    for path in paths:
        rows = _parquet_rows(path)
        bad_files += rows is None
        subject = os.path.basename(os.path.dirname(path))
        items += [(subject, row) for row in rows or []]
    loaded = collect(items, lambda item: _make(*item), limit)
    if bad_files:
        loaded.skipped[MALFORMED_FILE] += bad_files
    return loaded


def fields(record: dict) -> dict[str, str]:
    if record["question_type"] == MULTIPLE_CHOICE:
        choices = lettered(record["options"], "({letter}) {option}") + "\n\n"
        return {"question": record["question"], "choices": choices,
                "instruction": LETTER_INSTRUCTION}
    return {"question": record["question"], "choices": "", "instruction": OPEN_INSTRUCTION}


def score(records: Sequence[dict], predictions: Sequence[str]) -> Result:
    """MMMU's answer parsing: the option a reply picks (a random one, seeded by the id, when it
    names none), or an open answer's match; accuracy overall and per question type."""
    examples = []
    for i, (rec, pred) in enumerate(zip(records, predictions, strict=True)):
        if rec["question_type"] == MULTIPLE_CHOICE:
            choice = mmmu_parse_choice(pred, rec["options"], seed=rec["id"])
            answer = rec["answer"]
            examples.append(example(i, rec, pred, f"{LETTERS[answer]}. {rec['options'][answer]}",
                                    choice=choice, correct=choice == answer,
                                    question_type=MULTIPLE_CHOICE))
        else:
            examples.append(example(i, rec, pred, rec["answers"], question_type="open",
                                    correct=mmmu_open_correct(pred, rec["answers"])))
    summary = {f"{NAME}_accuracy": mean(e["correct"] for e in examples)}
    for kind, suffix in ((MULTIPLE_CHOICE, "multiple_choice"), ("open", "open")):
        summary[f"{NAME}_{suffix}_accuracy"] = mean(e["correct"] for e in examples
                                                    if e["question_type"] == kind)
    return summary, examples


# MMMU's configs/llava1.5.yaml (as YAML reads it): "{question}\n(A) x\n(B) y\n\nAnswer with the
# option's letter ..." and "{question}\nAnswer the question using a single word or phrase."
BENCHMARK = Benchmark(
    name=NAME, read=read, score=score, fields=fields, max_new_tokens=128,
    prompt="{question}\n{choices}{instruction}",
    description="<Subject>/validation-00000-of-00001.parquet (Hugging Face MMMU/MMMU)",
)
