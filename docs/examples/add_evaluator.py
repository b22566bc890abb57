"""docs/add_evaluator.md's worked example: an evaluator that asks colour questions about the
synthetic images and scores whether the answer names a colour, and the right one; run on a tiny
random model beside the configured tasks, its results written where `lvlm eval` writes them.

    python docs/examples/add_evaluator.py      # prints the figures and where the results went

tests/test_docs.py runs it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

from data_pipelines.synthetic import COLORS, SyntheticShapes
from lvlm_jax.config import ConfigDict, base_config
from lvlm_jax.evals.evaluators import Evaluator, Result, runner_settings
from lvlm_jax.evals.run import EvalSuite
from lvlm_jax.models import build_model, dummy_inputs
from lvlm_jax.train.input_pipeline import load_tokenizer, resolve_model_config

NAME = "color_named"


def score_color_named(records: Sequence[dict], predictions: Sequence[str]) -> Result:
    """Pure scoring: (summary figures, one result dict per example). `index` ties a result to
    its record, so the first `evals.num_rendered` of them are drawn into TensorBoard."""
    examples = []
    for i, (rec, pred) in enumerate(zip(records, predictions, strict=True)):
        named = [c for c in COLORS if re.search(rf"\b{c}\b", pred.lower())]
        examples.append({"index": i, "id": rec["id"], "question": rec["question"],
                         "prediction": pred, "reference": rec["answer"], "named": named,
                         "correct": named == [rec["answer"]]})
    n = max(len(examples), 1)
    return ({"color_named": sum(bool(e["named"]) for e in examples) / n,
             "color_correct": sum(e["correct"] for e in examples) / n}, examples)


def run_color_named(runner: Any, records: Sequence[dict], max_new_tokens: int, **_) -> Result:
    """The evaluator's run: greedy answers from the runner (a ModelRunner: the run's chat
    template and image preprocessing), then the pure scoring."""
    answers = runner.generate([r["image"] for r in records], [r["question"] for r in records],
                              max_new_tokens)
    return score_color_named(records, answers)


def color_records(n: int, image_size: int, seed: int = 0) -> list[dict]:
    """The first `n` colour questions of the synthetic set's eval split."""
    shapes = SyntheticShapes(seed=seed, image_size=image_size, split="eval")
    return [shapes.vqa(i, kind="color") for i in range(n)]


def color_evaluator(cfg: ConfigDict, model: Any) -> Evaluator:
    """Configured like the built-in tasks: `evals.num_examples`, `evals.max_new_tokens`, and the
    run's template and image settings."""
    settings = runner_settings(cfg, model.cfg)
    records = color_records(int(cfg.evals.num_examples), settings["image_size"], int(cfg.seed))
    return Evaluator(NAME, run_color_named, records, int(cfg.evals.max_new_tokens),
                     settings=settings)


def tiny_config() -> ConfigDict:
    c = base_config()
    c.model.vision = {"preset": "tiny"}
    # The demo tokenizer's 384 pieces: a random model must not sample ids it cannot decode.
    c.model.language = {"preset": "tiny", "vocab_size": 384, "num_layers": 1}
    c.evals.tasks = ("vqa",)  # the built-in tasks run beside ours
    c.evals.num_examples = 4
    c.evals.batch_size = 4
    c.evals.max_new_tokens = 4
    return c


def evaluate(cfg: ConfigDict, workdir: str, step: int = 0) -> tuple[dict[str, float], Any]:
    """Random params of the config's model, evaluated on `evals.tasks` plus ours; the per-example
    results go to WORKDIR/eval/step_N/<task>.jsonl. Returns (figures, params)."""
    tokenizer = load_tokenizer(cfg.data)
    model = build_model(resolve_model_config(cfg, tokenizer))
    params = model.init(jax.random.PRNGKey(0), **dummy_inputs(model.cfg))["params"]
    suite = EvalSuite(cfg, model, tokenizer)
    suite.evaluators.append(color_evaluator(cfg, model))
    return suite(step, params, workdir), params


if __name__ == "__main__":
    import tempfile

    workdir = tempfile.mkdtemp()
    figures, _ = evaluate(tiny_config(), workdir)
    print(figures)
    print(f"per-example results in {workdir}/eval/step_0/")
