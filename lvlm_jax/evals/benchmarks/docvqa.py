"""DocVQA (val): the released val_v1.0(_withQT).json and documents/, scored by ANLS."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from lvlm_jax.evals.benchmarks.base import (
    Benchmark,
    Loaded,
    Result,
    collect_json,
    example,
    figures_by,
    first_existing,
    image_file,
)
from lvlm_jax.evals.benchmarks.vqav2 import SHORT_ANSWER
from lvlm_jax.evals.metrics_documents import anls

NAME = "docvqa"
# The RRC download unpacks to val/; either the folder itself or its parent is accepted.
ANNOTATIONS = ("val_v1.0_withQT.json", "val_v1.0.json", "val/val_v1.0_withQT.json",
               "val/val_v1.0.json")


def read_rrc(task: str, annotations: Sequence[str], image: Callable[[dict], str],
             task_dir: str, limit: int) -> Loaded:
    """The DocVQA challenge's annotation format ({"data": [{questionId, question, answers,
    ...}]}, shared by InfographicVQA); `image(entry)` is the image's path or Skip."""

    def make(e: dict) -> dict:
        answers = e["answers"]
        if isinstance(answers, str) or not answers:
            raise ValueError("answers must be a non-empty list")
        return {"id": str(e["questionId"]), "image": image(e), "question": str(e["question"]),
                "answers": [str(a) for a in answers]}

    return collect_json(first_existing(task_dir, annotations, task), "data", make, limit)


def read(task_dir: str, limit: int = 0) -> Loaded:
    root = os.path.dirname(first_existing(task_dir, ANNOTATIONS, NAME))
    # The entry's "image" ("documents/xxx.png") is relative to the annotation file's folder.
    return read_rrc(NAME, ANNOTATIONS, lambda e: image_file(root, str(e["image"])), task_dir,
                    limit)


def anls_scorer(task: str) -> Callable[[Sequence[dict], Sequence[str]], Result]:
    """Mean ANLS (threshold 0.5, the challenge's) over each record's answers: `<task>_anls`."""

    def score(records: Sequence[dict], predictions: Sequence[str]) -> Result:
        examples = [example(i, rec, pred, rec["answers"], anls=anls(pred, rec["answers"]))
                    for i, (rec, pred) in enumerate(zip(records, predictions, strict=True))]
        return figures_by(examples, "anls", f"{task}_anls"), examples

    return score


# lmms-eval's docvqa_val (default pre/post prompt), as LLaVA-NeXT evaluates it.
BENCHMARK = Benchmark(
    name=NAME, read=read, score=anls_scorer(NAME), prompt=SHORT_ANSWER, max_new_tokens=32,
    description=f"{' or '.join(ANNOTATIONS[:2])} (or under val/) and its documents/*.png",
)
