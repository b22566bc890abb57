"""POPE (COCO): the released coco_pope_{random,popular,adversarial}.json lines and val2014/."""

from __future__ import annotations

import os

from lvlm_jax.evals.benchmarks.base import (
    Benchmark,
    Loaded,
    collect_parts,
    first_existing,
    image_file,
    read_jsonl,
    require,
)
from lvlm_jax.evals.benchmarks.vqav2 import SHORT_ANSWER
from lvlm_jax.evals.evaluators import score_pope

NAME = "pope"
SPLITS = ("random", "popular", "adversarial")
IMAGES = "val2014"


def read(task_dir: str, limit: int = 0) -> Loaded:
    """The three splits' questions (ids "<split>-<question_id>": each split numbers its own from
    1), a limit shared evenly among them. RUCAIBox/POPE keeps the files in output/coco/ and
    LLaVA's pope.sh in coco/; either that folder or the task folder itself is accepted."""
    paths = [first_existing(task_dir, (f"coco_pope_{s}.json", f"coco/coco_pope_{s}.json"), NAME)
             for s in SPLITS]
    require(task_dir, IMAGES, task=NAME)

    def maker(split: str):
        def make(e: dict) -> dict:
            label = str(e["label"]).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError("label is neither yes nor no")
            return {"id": f"{split}-{e['question_id']}", "question": str(e["text"]),
                    "image": image_file(task_dir, IMAGES, os.path.basename(str(e["image"]))),
                    "answer": label, "split": split}
        return make

    return collect_parts([(read_jsonl(p), maker(s)) for p, s in zip(paths, SPLITS, strict=True)],
                         limit)


# LLaVA-1.5's llava_pope_test.jsonl questions (the POPE text + the short-answer line), which is
# also lmms-eval's pope default.
BENCHMARK = Benchmark(
    name=NAME, read=read, score=score_pope, prompt=SHORT_ANSWER, max_new_tokens=16,
    description="coco_pope_{random,popular,adversarial}.json (JSON lines), val2014/",
)
