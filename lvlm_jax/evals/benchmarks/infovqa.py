"""InfographicVQA (val): the released annotation JSON and image folder, scored by ANLS."""

from __future__ import annotations

import os

from lvlm_jax.evals.benchmarks.base import Benchmark, Loaded, first_existing, image_file
from lvlm_jax.evals.benchmarks.docvqa import anls_scorer, read_rrc
from lvlm_jax.evals.benchmarks.vqav2 import SHORT_ANSWER

NAME = "infovqa"
# The RRC site's val file is infographicVQA_val_v1.0.json; the one with question types that
# InternVL and others point to is infographicsVQA_val_v1.0_withQT.json.
_FILES = ("infographicsVQA_val_v1.0_withQT.json", "infographicVQA_val_v1.0_withQT.json",
          "infographicsVQA_val_v1.0.json", "infographicVQA_val_v1.0.json")
ANNOTATIONS = (*_FILES, *(f"val/{f}" for f in _FILES))
IMAGE_DIRS = ("infographicsvqa_images", "infographicVQA_val_v1.0_images",
              "val/infographicVQA_val_v1.0_images", "images")


def read(task_dir: str, limit: int = 0) -> Loaded:
    first_existing(task_dir, ANNOTATIONS, NAME)  # the annotation's absence reported first
    images = first_existing(task_dir, IMAGE_DIRS, NAME)
    return read_rrc(NAME, ANNOTATIONS,
                    lambda e: image_file(images, os.path.basename(str(e["image_local_name"]))),
                    task_dir, limit)


# lmms-eval's infovqa_val (default pre/post prompt).
BENCHMARK = Benchmark(
    name=NAME, read=read, score=anls_scorer(NAME), prompt=SHORT_ANSWER, max_new_tokens=32,
    description=f"{_FILES[0]} (or {', '.join(_FILES[1:])}) and {' or '.join(IMAGE_DIRS)}/",
)
