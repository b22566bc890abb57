"""ChartQA (test): the released test_human/test_augmented JSONs and png/, relaxed accuracy."""

from __future__ import annotations

import os
from collections.abc import Sequence

from lvlm_jax.evals.benchmarks.base import (
    Benchmark,
    Loaded,
    Result,
    collect_parts,
    example,
    first_existing,
    image_file,
    mean,
    read_json,
    require,
)
from lvlm_jax.evals.metrics_documents import relaxed_accuracy

NAME = "chartqa"
SPLITS = ("human", "augmented")
# The GitHub repository keeps the release under "ChartQA Dataset/".
ROOTS = ("test", "ChartQA Dataset/test")


def read(task_dir: str, limit: int = 0) -> Loaded:
    """Both splits in file order (ids "human-<k>", "augmented-<k>": the release has no ids);
    a limit is shared evenly between them."""
    human = first_existing(task_dir, [f"{r}/test_human.json" for r in ROOTS], NAME)
    root = os.path.dirname(human)
    require(root, "test_augmented.json", "png", task=NAME)

    def maker(split: str):
        def make(item: tuple[int, dict]) -> dict:
            k, e = item
            return {"id": f"{split}-{k}", "image": image_file(root, "png", str(e["imgname"])),
                    "question": str(e["query"]), "answer": str(e["label"]), "split": split}
        return make

    parts = []
    for split in SPLITS:
        entries = read_json(os.path.join(root, f"test_{split}.json"))
        parts.append((None if entries is None else list(enumerate(entries)), maker(split)))
    return collect_parts(parts, limit)


def score(records: Sequence[dict], predictions: Sequence[str]) -> Result:
    """Relaxed accuracy (numbers within 5%, other answers exact), overall and per split."""
    examples = [example(i, rec, pred, rec["answer"], split=rec["split"],
                        relaxed_accuracy=relaxed_accuracy(pred, rec["answer"]))
                for i, (rec, pred) in enumerate(zip(records, predictions, strict=True))]
    summary = {f"{NAME}_relaxed_accuracy": mean(e["relaxed_accuracy"] for e in examples)}
    for split in SPLITS:
        summary[f"{NAME}_{split}_relaxed_accuracy"] = mean(
            e["relaxed_accuracy"] for e in examples if e["split"] == split)
    return summary, examples


# lmms-eval's chartqa (default post_prompt); LLaVA-1.5 has no ChartQA script.
BENCHMARK = Benchmark(
    name=NAME, read=read, score=score,
    prompt="{question}\nAnswer the question with a single word.", max_new_tokens=16,
    description="test/test_human.json, test/test_augmented.json, test/png/<imgname>",
)
