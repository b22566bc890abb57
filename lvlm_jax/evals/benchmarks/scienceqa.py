"""ScienceQA-IMG (test): problems.json, pid_splits.json and the test images; letter accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lvlm_jax.evals.benchmarks.base import (
    LETTER_INSTRUCTION,
    Benchmark,
    Loaded,
    Result,
    choice_examples,
    collect,
    figures_by,
    first_existing,
    image_file,
    lettered,
    malformed_file,
    read_json,
    require,
)

NAME = "scienceqa"
# lupantech/ScienceQA's tools/download.sh unzips to images/test/<pid>/; LLaVA's sqa.sh points
# its --image-folder at that test/ folder, which is accepted as the task folder's test/ too.
IMAGE_DIRS = ("images/test", "test")


def read(task_dir: str, limit: int = 0) -> Loaded:
    """The test split's problems that have an image (the IMG subset: the others are dropped
    uncounted), in pid_splits.json's order."""
    problems_path, splits_path = require(task_dir, "problems.json", "pid_splits.json", task=NAME)
    images = first_existing(task_dir, IMAGE_DIRS, NAME)
    problems = read_json(problems_path, kind=dict)
    test = read_json(splits_path, "test")
    if problems is None or test is None:
        return malformed_file()

    def make(pid: Any) -> dict | None:
        p = problems[str(pid)]
        if p.get("image") is None:
            return None
        options = [str(c) for c in p["choices"]]
        answer = p["answer"]
        if not isinstance(answer, int) or not 0 <= answer < len(options):
            raise ValueError("answer is not an option's index")
        return {"id": str(pid), "image": image_file(images, str(pid), str(p["image"])),
                "question": str(p["question"]), "hint": str(p.get("hint") or ""),
                "options": options, "answer": answer, "subject": str(p.get("subject", ""))}

    return collect(test, make, limit)


def fields(record: dict) -> dict[str, str]:
    hint = record["hint"]
    return {"question": record["question"], "options": lettered(record["options"]),
            "context": f"Context: {hint}\n" if hint else ""}


def score(records: Sequence[dict], predictions: Sequence[str]) -> Result:
    """Accuracy of the option the reply names, overall and per subject."""
    examples = choice_examples(records, predictions, keep=("subject",))
    return figures_by(examples, "correct", f"{NAME}_accuracy", "subject"), examples


# lmms-eval's scienceqa_img (default format), which builds LLaVA-1.5's llava_test_CQM-A.json
# question with --single-pred-prompt.
BENCHMARK = Benchmark(
    name=NAME, read=read, score=score, fields=fields, max_new_tokens=16,
    prompt="{context}{question}\n{options}\n" + LETTER_INSTRUCTION,
    description="problems.json, pid_splits.json, images/test/<pid>/image.png",
)
