"""VQAv2 (val2014): the official question and annotation JSONs, scored by VQA accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lvlm_jax.evals.benchmarks.base import (
    Benchmark,
    Loaded,
    Result,
    collect,
    image_file,
    malformed_file,
    read_json,
    renaming,
    require,
)
from lvlm_jax.evals.evaluators import score_vqa

NAME = "vqav2"
QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS = "v2_mscoco_val2014_annotations.json"
IMAGES = "val2014"
# LLaVA-1.5's llava_vqav2_mscoco_test-dev2015.jsonl and lmms-eval's vqav2 post_prompt.
SHORT_ANSWER = "{question}\nAnswer the question using a single word or phrase."


def read(task_dir: str, limit: int = 0) -> Loaded:
    questions_path, annotations_path, _ = require(task_dir, QUESTIONS, ANNOTATIONS, IMAGES,
                                                  task=NAME)
    questions = read_json(questions_path, "questions")
    annotations = read_json(annotations_path, "annotations")
    if questions is None or annotations is None:
        return malformed_file()
    by_id = {a["question_id"]: a for a in annotations
             if isinstance(a, dict) and isinstance(a.get("question_id"), int | str)}

    def make(q: dict) -> dict:
        ann = by_id[q["question_id"]]
        answers = [str(a["answer"]) for a in ann["answers"]]
        if not answers:
            raise ValueError("no answers")
        image = image_file(task_dir, IMAGES, f"COCO_val2014_{int(q['image_id']):012d}.jpg")
        return {"id": str(q["question_id"]), "image": image, "question": str(q["question"]),
                "answers": answers, "kind": str(ann.get("answer_type", "")),
                "question_type": ann.get("question_type"), "image_id": int(q["image_id"])}

    return collect(questions, make, limit)


def vqa_scorer(task: str) -> Callable[[Sequence[dict], Sequence[str]], Result]:
    """evaluators.score_vqa with its figures named `<task>_accuracy[_<answer type>]`."""
    return renaming(score_vqa, task, "vqa")


BENCHMARK = Benchmark(
    name=NAME, read=read, score=vqa_scorer(NAME),
    prompt=SHORT_ANSWER, max_new_tokens=16,
    description=f"{QUESTIONS}, {ANNOTATIONS}, {IMAGES}/COCO_val2014_<image_id:012d>.jpg",
)
