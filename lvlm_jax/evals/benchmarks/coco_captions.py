"""COCO captions (Karpathy test split): dataset_coco.json and the COCO image folders; CIDEr etc."""

from __future__ import annotations

from lvlm_jax.evals.benchmarks.base import (
    Benchmark,
    Loaded,
    collect_json,
    image_file,
    renaming,
    require,
)
from lvlm_jax.evals.evaluators import score_caption

NAME = "coco_captions"
ANNOTATIONS = "dataset_coco.json"
# lmms-eval's coco_karpathy_test (its Karpathy-split task; its coco2014_cap tasks on the
# official val split ask "Provide a one-sentence caption for the provided image." instead).
PROMPT = "Describe the image briefly."


def read(task_dir: str, limit: int = 0) -> Loaded:
    """The 5,000 "test" images of Karpathy's split (other splits dropped uncounted), each with
    its (normally five) raw reference sentences; images at <filepath>/<filename>."""
    (path,) = require(task_dir, ANNOTATIONS, task=NAME)

    def make(e: dict) -> dict | None:
        if e["split"] != "test":
            return None
        captions = [str(s["raw"]).strip() for s in e["sentences"]]
        if not captions:
            raise ValueError("no captions")
        return {"id": str(e["cocoid"]), "image": image_file(task_dir, str(e["filepath"]),
                                                            str(e["filename"])),
                "question": PROMPT, "prompt": PROMPT, "captions": captions}

    return collect_json(path, "images", make, limit)


BENCHMARK = Benchmark(
    name=NAME, read=read,
    score=renaming(score_caption, NAME),  # cider -> coco_captions_cider, ...
    prompt=PROMPT, max_new_tokens=64,
    description=f"{ANNOTATIONS} (Karpathy split), <filepath>/<filename> images (val2014/)",
)
