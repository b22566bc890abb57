"""The evaluator registry: vqa, caption, pope, chair and multiple_choice on the synthetic set or
records of our format, the released benchmarks of `evals/benchmarks/` (read from
`evals.data_dir`), and eval_loss (built by the trainer, which owns the stages' losses).

Each evaluator is built from the config (`build_evaluators(cfg, model)`, the names in
`evals.tasks`) and called as `evaluator(model, params, tokenizer)` -> (summary, per-example
results). Generation-based tasks score the greedy answers of `ModelRunner.generate`; the scoring
functions (`score_vqa`, ...) are pure and take the predictions directly. `pope_eval` and
`chair_eval` run POPE and CHAIR on the synthetic set's eval split for a trained model.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lvlm_jax.evals import records as records_lib
from lvlm_jax.evals.metrics_caption import bleu, cider_scores, rouge_l_scores
from lvlm_jax.evals.metrics_hallucination import chair, parse_yes_no, pope
from lvlm_jax.evals.metrics_vqa import (
    multiple_choice_by_letter,
    multiple_choice_by_likelihood,
    vqa_accuracy,
)
from lvlm_jax.evals.model_runner import ModelRunner

TASKS = ("eval_loss", "vqa", "caption", "pope", "chair", "multiple_choice")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

Result = tuple[dict[str, float], list[dict[str, Any]]]

# ---------------------------------------------------------------------------------------------
# Scoring: records + predictions -> (summary, per-example results)
# ---------------------------------------------------------------------------------------------


def score_vqa(records: Sequence[dict], predictions: Sequence[str]) -> Result:
    """VQAv2 accuracy against a record's ten `answers`, exact match (after the same
    normalisation) against a single `answer`; per question kind too when records carry one."""
    examples = []
    for i, (rec, pred) in enumerate(zip(records, predictions, strict=True)):
        refs = rec.get("answers") or [rec["answer"]]
        examples.append({"index": i, "id": rec["id"], "question": rec["question"],
                         "prediction": pred, "reference": refs[0] if len(refs) == 1 else refs,
                         "kind": rec.get("kind"), "accuracy": vqa_accuracy(pred, refs)})
    summary = {"vqa_accuracy": _mean(e["accuracy"] for e in examples)}
    for kind in sorted({e["kind"] for e in examples if e["kind"]}):
        summary[f"vqa_accuracy_{kind}"] = _mean(e["accuracy"] for e in examples
                                                if e["kind"] == kind)
    return summary, examples


def score_caption(records: Sequence[dict], predictions: Sequence[str]) -> Result:
    """CIDEr-D, BLEU-1..4 and ROUGE-L (pycocoevalcap's corpus figures) against each record's
    `captions` (or its one `caption`)."""
    gts = {i: list(r.get("captions") or [r["caption"]]) for i, r in enumerate(records)}
    res = {i: [p] for i, p in enumerate(predictions)}
    if len(res) != len(gts):
        raise ValueError(f"{len(gts)} records but {len(res)} predictions")
    cid, rouge = cider_scores(gts, res), rouge_l_scores(gts, res)
    summary = {"cider": _mean(cid.values()), "rouge_l": _mean(rouge.values())}
    summary.update({f"bleu_{k + 1}": float(v) for k, v in enumerate(bleu(gts, res))})
    examples = [{"index": i, "id": r["id"], "question": r.get("prompt", "(caption)"),
                 "prediction": predictions[i], "reference": gts[i][0], "cider": float(cid[i]),
                 "rouge_l": float(rouge[i])} for i, r in enumerate(records)]
    return summary, examples


def score_pope(records: Sequence[dict], predictions: Sequence[str]) -> Result:
    """POPE accuracy, precision, recall, F1 and yes-ratio, overall and per split."""
    labels = [str(r["answer"]) for r in records]
    splits = [r.get("split", "all") for r in records]
    figures = pope(predictions, labels, splits)
    names = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    summary = {f"pope_{k}": float(figures[k]) for k in names}
    for split, fig in figures["splits"].items():
        if split != "all":
            summary.update({f"pope_{split}_{k}": float(fig[k]) for k in names})
    examples = []
    for i, (rec, pred) in enumerate(zip(records, predictions, strict=True)):
        parsed = parse_yes_no(pred)
        examples.append({"index": i, "id": rec["id"], "question": rec["question"],
                         "prediction": pred, "reference": rec["answer"], "parsed": parsed,
                         "split": splits[i],
                         "correct": parsed == ("no" if labels[i].lower() == "no" else "yes")})
    return summary, examples


def score_chair(records: Sequence[dict], predictions: Sequence[str],
                vocabulary: Mapping[str, Sequence[str]] | None = None) -> Result:
    """CHAIR_i (hallucinated / all object mentions), CHAIR_s (descriptions with a hallucinated
    object) and recall, against each record's `objects` (canonical names of `vocabulary`,
    COCO's 80 by default)."""
    figures = chair(predictions, [r["objects"] for r in records], vocabulary)
    summary = {"chair_i": figures["chair_i"], "chair_s": figures["chair_s"],
               "chair_recall": figures["recall"], "chair_mentions": float(figures["mentions"])}
    examples = [{"index": i, "id": r["id"], "question": r.get("prompt",
                                                                records_lib.DESCRIBE_PROMPT),
                 "prediction": predictions[i], "reference": r.get("caption", ", ".join(
                     r["objects"])), "objects": list(r["objects"]), **figures["per_caption"][i]}
                for i, r in enumerate(records)]
    return summary, examples


def _answer_index(answer: Any, n: int) -> int:
    if isinstance(answer, str) and answer.strip().upper() in _LETTERS[:n]:
        return _LETTERS.index(answer.strip().upper())
    return int(answer)


def score_multiple_choice(records: Sequence[dict], letter_predictions: Sequence[str],
                          option_logprobs: Sequence[tuple[Sequence[float], Sequence[int]]]
                          ) -> Result:
    """Accuracy of the most likely option (summed log-likelihood) and of the letter parsed from
    a free answer; `mc_unparsed` is the share of free answers naming no single option."""
    examples = []
    for i, rec in enumerate(records):
        target = _answer_index(rec["answer"], len(rec["options"]))
        by_letter = multiple_choice_by_letter(letter_predictions[i], rec["options"])
        by_lik = multiple_choice_by_likelihood(option_logprobs[i][0])
        examples.append({"index": i, "id": rec["id"], "question": rec["question"],
                         "options": list(rec["options"]), "prediction": letter_predictions[i],
                         "reference": f"{_LETTERS[target]}. {rec['options'][target]}",
                         "letter_choice": by_letter, "likelihood_choice": by_lik,
                         "option_logprobs": list(option_logprobs[i][0]),
                         "letter_correct": by_letter == target,
                         "likelihood_correct": by_lik == target})
    summary = {"mc_accuracy": _mean(e["likelihood_correct"] for e in examples),
               "mc_letter_accuracy": _mean(e["letter_correct"] for e in examples),
               "mc_unparsed": _mean(e["letter_choice"] is None for e in examples)}
    return summary, examples


def multiple_choice_prompt(question: str, options: Sequence[str]) -> str:
    lines = [question, *(f"{_LETTERS[k]}. {o}" for k, o in enumerate(options))]
    return "\n".join([*lines, records_lib.MC_INSTRUCTION])


def _mean(values) -> float:
    values = [float(v) for v in values]
    return float(np.mean(values)) if values else 0.0


# ---------------------------------------------------------------------------------------------
# Evaluators: records + a runner (anything with ModelRunner's generate / reply_logprobs)
# ---------------------------------------------------------------------------------------------


def _images(records):
    return [r["image"] for r in records]


def run_vqa(runner, records, max_new_tokens: int, **_) -> Result:
    return score_vqa(records, runner.generate(_images(records), [r["question"] for r in records],
                                              max_new_tokens))


def run_caption(runner, records, max_new_tokens: int, **_) -> Result:
    prompts = [r.get("prompt", records_lib.DESCRIBE_PROMPT) for r in records]
    return score_caption(records, runner.generate(_images(records), prompts, max_new_tokens))


def run_pope(runner, records, max_new_tokens: int, **_) -> Result:
    return score_pope(records, runner.generate(_images(records), [r["question"] for r in records],
                                               max_new_tokens))


def run_chair(runner, records, max_new_tokens: int, vocabulary=None, **_) -> Result:
    prompts = [r.get("prompt", records_lib.DESCRIBE_PROMPT) for r in records]
    return score_chair(records, runner.generate(_images(records), prompts, max_new_tokens),
                       vocabulary)


def run_multiple_choice(runner, records, max_new_tokens: int, **_) -> Result:
    images = _images(records)
    letters = runner.generate(images, [multiple_choice_prompt(r["question"], r["options"])
                                       for r in records], max_new_tokens)
    logprobs = runner.reply_logprobs(images, [r["question"] for r in records],
                                     [r["options"] for r in records])
    return score_multiple_choice(records, letters, logprobs)


_RUNS: dict[str, Callable[..., Result]] = {
    "vqa": run_vqa, "caption": run_caption, "pope": run_pope, "chair": run_chair,
    "multiple_choice": run_multiple_choice,
}


@dataclasses.dataclass
class Evaluator:
    """One configured task: its records and how to score a model on them."""

    name: str
    run: Callable[..., Result]
    records: list[dict] = dataclasses.field(default_factory=list)
    max_new_tokens: int = 16
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra run() arguments
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # ModelRunner fields
    # Records the reader dropped, by reason ("missing image", "malformed entry", ...).
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def evaluate(self, runner: Any) -> Result:
        return self.run(runner, self.records, self.max_new_tokens, **self.options)

    def __call__(self, model: Any, params: Any, tokenizer: Any,
                 template: str | None = None) -> Result:
        settings = dict(self.settings)
        if template is not None:
            settings["template"] = template
        return self.evaluate(ModelRunner(model, params, tokenizer, **settings))


def runner_settings(cfg: Any, model_cfg: Any) -> dict[str, Any]:
    """ModelRunner's fields (besides model, params, tokenizer) from a training config."""
    d = cfg.data
    return {"template": d.template, "image_size": int(d.image_size or model_cfg.vision.image_size),
            "image_mean": tuple(d.image_mean), "image_std": tuple(d.image_std),
            "image_mode": d.get("image_mode", "pad"), "batch_size": int(cfg.evals.batch_size)}


def _chair_vocabulary(cfg: Any, synthetic: bool) -> dict[str, list[str]] | None:
    path = cfg.evals.get("chair_vocabulary", "")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                vocab = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"evals.chair_vocabulary={path!r} does not exist") from None
        if not isinstance(vocab, dict):
            raise ValueError(f"evals.chair_vocabulary={path!r} must map names to synonym lists")
        return {str(k): list(v) for k, v in vocab.items()}
    return records_lib.synthetic_vocabulary() if synthetic else None  # None: COCO's 80


def all_tasks() -> tuple[str, ...]:
    """Every task name evals.tasks accepts."""
    from lvlm_jax.evals.benchmarks import BENCHMARKS

    return (*TASKS, *(n for n in BENCHMARKS if n not in TASKS))


def check_tasks(names: Sequence[str]) -> None:
    valid = all_tasks()
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown eval task {unknown[0]!r} in evals.tasks; valid tasks: "
                         f"{', '.join(valid)}")


def task_names(cfg: Any) -> tuple[str, ...]:
    """`evals.tasks` as names ("vqa,pope" is read as two), checked against all_tasks()."""
    tasks = cfg.evals.tasks
    names = tuple(t.strip() for t in tasks.split(",")) if isinstance(tasks, str) else tuple(tasks)
    names = tuple(n for n in names if n)
    check_tasks(names)
    return names


def _is_benchmark(cfg: Any, name: str) -> bool:
    """Whether `name` reads a released benchmark from evals.data_dir. POPE is both: the
    synthetic probes (or evals.paths.pope) without a data_dir, the released splits with one."""
    from lvlm_jax.evals.benchmarks import BENCHMARKS

    if name not in BENCHMARKS:
        return False
    return name not in TASKS or (bool(cfg.evals.get("data_dir", ""))
                                 and not (cfg.evals.get("paths") or {}).get(name, ""))


def run_benchmark(runner, records, max_new_tokens: int, benchmark=None, template: str = "",
                  **_) -> Result:
    """A released benchmark: its prompts, the model's replies, its scorer. Records whose image
    does not decode are left out (the summary row counts them)."""
    prompts = [benchmark.render_prompt(r, template) for r in records]
    replies = runner.generate(_images(records), prompts, max_new_tokens,
                              **({"skip_unreadable": True, "desc": benchmark.name}
                                 if isinstance(runner, ModelRunner) else {}))
    kept = [i for i, reply in enumerate(replies) if reply is not None]
    summary, examples = benchmark.score([records[i] for i in kept], [replies[i] for i in kept])
    for ex in examples:  # the index of the record in the evaluator's list (for rendering)
        ex["index"] = kept[ex["index"]] if "index" in ex else None
    return summary, examples


def _benchmark_evaluator(cfg: Any, name: str, settings: dict[str, Any]) -> Evaluator:
    from lvlm_jax.evals.benchmarks import MissingFiles, get

    benchmark = get(name)
    data_dir = cfg.evals.get("data_dir", "")
    if not data_dir:
        raise ValueError(f"eval task {name!r} reads the benchmark's released files: set "
                         f"evals.data_dir=DIR (lvlm eval --data_dir=DIR) with them in DIR/{name}/")
    task_dir = os.path.join(data_dir, name)
    if not os.path.isdir(task_dir):
        raise MissingFiles(f"{name}: {task_dir!r} does not exist (expected: "
                           f"{benchmark.description or 'the released files'})")
    loaded = benchmark.read(task_dir, int(cfg.evals.num_examples))
    if not loaded.records:
        reasons = ", ".join(f"{k}: {v}" for k, v in loaded.skipped.items()) or "no entries"
        raise ValueError(f"{name}: no usable records in {task_dir!r} ({reasons})")
    max_new = int(cfg.evals.get("benchmark_max_new_tokens", 0)) or benchmark.max_new_tokens
    template = (cfg.evals.get("prompts") or {}).get(name, "")
    return Evaluator(name, run_benchmark, loaded.records, max_new,
                     {"benchmark": benchmark, "template": template}, settings, loaded.skipped)


def build_evaluators(cfg: Any, model: Any, skip: Sequence[str] = (),
                     extra: Sequence[Evaluator] = ()) -> list[Evaluator]:
    """The evaluators named by `cfg.evals.tasks` (but not in `skip`), records loaded, in that
    order. `extra`: evaluators built by the caller, used for their names (eval_loss, which
    needs the trainer's stage losses)."""
    names = task_names(cfg)
    names = tuple(n for n in names if n not in skip)
    given = {e.name: e for e in extra}
    settings = runner_settings(cfg, model.cfg)
    n = int(cfg.evals.num_examples)
    paths = cfg.evals.get("paths") or {}
    evaluators = []
    for name in names:
        if name in given:
            evaluators.append(given[name])
            continue
        if name == "eval_loss":
            raise ValueError("eval task 'eval_loss' is the stage's held-out loss: the trainer "
                             "computes it (train.periodic_evals.eval_loss_evaluator)")
        if _is_benchmark(cfg, name):
            evaluators.append(_benchmark_evaluator(cfg, name, settings))
            continue
        path = paths.get(name, "")
        if path:
            records = records_lib.load_records(name, path, n)
        elif cfg.data.source == "synthetic":
            records = records_lib.synthetic_records(name, n, seed=int(cfg.seed),
                                                    image_size=settings["image_size"])
        else:
            raise ValueError(f"eval task {name!r} needs evals.paths.{name}=FILE (JSONL or "
                             f"ArrayRecord records) when data.source is {cfg.data.source!r}")
        options = {"vocabulary": _chair_vocabulary(cfg, not path)} if name == "chair" else {}
        evaluators.append(Evaluator(name, _RUNS[name], records, int(cfg.evals.max_new_tokens),
                                    options, settings))
    return evaluators


# ---------------------------------------------------------------------------------------------
# For the demo: POPE and CHAIR of a trained model on the synthetic set's eval split
# ---------------------------------------------------------------------------------------------


def _synthetic_runner(model, params, tokenizer, template, image_size, **kw) -> ModelRunner:
    return ModelRunner(model, params, tokenizer, template,
                       image_size=image_size or model.cfg.vision.image_size, **kw)


def pope_eval(model: Any, params: Any, tokenizer: Any, template: str, *,
              num_examples: int = 300, seed: int = 0, image_size: int = 0,
              max_new_tokens: int = 8, **runner_kw: Any) -> dict[str, float]:
    """POPE on `num_examples` synthetic probes (a third per random/popular/adversarial split):
    pope_accuracy, pope_precision, pope_recall, pope_f1, pope_yes_ratio, and per split.
    `runner_kw`: image_mean, image_std, image_mode, batch_size (as the model was trained)."""
    runner = _synthetic_runner(model, params, tokenizer, template, image_size, **runner_kw)
    records = records_lib.synthetic_records("pope", num_examples, seed=seed,
                                            image_size=runner.image_size)
    return run_pope(runner, records, max_new_tokens)[0]


def chair_eval(model: Any, params: Any, tokenizer: Any, template: str, *,
               num_examples: int = 100, seed: int = 0, image_size: int = 0,
               max_new_tokens: int = 48, **runner_kw: Any) -> dict[str, float]:
    """CHAIR of free descriptions ("describe the image.") of synthetic images: chair_i (the
    share of mentioned objects that are hallucinated), chair_s (the share of descriptions with a
    hallucinated object), chair_recall, chair_mentions."""
    runner = _synthetic_runner(model, params, tokenizer, template, image_size, **runner_kw)
    records = records_lib.synthetic_records("chair", num_examples, seed=seed,
                                            image_size=runner.image_size)
    return run_chair(runner, records, max_new_tokens, records_lib.synthetic_vocabulary())[0]
