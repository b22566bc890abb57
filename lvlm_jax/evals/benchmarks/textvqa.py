"""TextVQA (v0.5.1 val): the released annotation JSON and train_images/, scored by VQA accuracy."""

from __future__ import annotations

from lvlm_jax.evals.benchmarks.base import (
    Benchmark,
    Loaded,
    collect_json,
    image_file,
    require,
)
from lvlm_jax.evals.benchmarks.vqav2 import SHORT_ANSWER, vqa_scorer

NAME = "textvqa"
ANNOTATIONS = "TextVQA_0.5.1_val.json"
IMAGES = "train_images"  # the release keeps the val images with the train ones


def read(task_dir: str, limit: int = 0) -> Loaded:
    annotations_path, _ = require(task_dir, ANNOTATIONS, IMAGES, task=NAME)

    def make(e: dict) -> dict:
        answers = [str(a) for a in e["answers"]]
        if not answers:
            raise ValueError("no answers")
        return {"id": str(e["question_id"]), "image": image_file(task_dir, IMAGES,
                                                                 f"{e['image_id']}.jpg"),
                "question": str(e["question"]), "answers": answers,
                "image_id": str(e["image_id"])}

    return collect_json(annotations_path, "data", make, limit)


# LLaVA-1.5's textvqa.sh question file without its "Reference OCR token" line, which is
# lmms-eval's textvqa default (ocr: false).
BENCHMARK = Benchmark(
    name=NAME, read=read, score=vqa_scorer(NAME),
    prompt=SHORT_ANSWER, max_new_tokens=16,
    description=f"{ANNOTATIONS}, {IMAGES}/<image_id>.jpg",
)
