"""Eval runners: held-out loss of a stage, and greedy-decoded answers to VQA-style records."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

from data_pipelines.images import prepare_image
from data_pipelines.templates import end_of_turn_ids, render
from lvlm_jax.evals.answers import exact_match
from lvlm_jax.generate import generate_tokens, left_pad
from lvlm_jax.train.stages.base import LossContext, Stage, normalize_pixels


def eval_loss(ctx: LossContext, stage: Stage, params: Any, batches: Iterable[dict]) -> float:
    """Token-weighted mean loss of `stage` over host-local batches (one device is enough for
    the small eval sets this is used on)."""
    fn = jax.jit(lambda p, b: stage.loss(ctx, p, b, jax.random.PRNGKey(0))[:2])
    total = weight = 0.0
    for batch in batches:
        t, w = fn(params, {f: batch[f] for f in stage.fields})
        total, weight = total + float(t), weight + float(w)
    return total / max(weight, 1.0)


def answer_questions(model: Any, params: Any, tokenizer: Any, template: str,
                     images: Sequence[np.ndarray], questions: Sequence[str], *,
                     image_size: int, image_mean, image_std, max_new_tokens: int = 8,
                     batch_size: int = 32) -> list[str]:
    """Greedy answers to one-image questions, the prompt rendered by the chat template."""
    stop = tuple(end_of_turn_ids(template, tokenizer)) + (tokenizer.eos_id,)
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        qs = questions[start:start + batch_size]
        ims = images[start:start + batch_size]
        rows = []
        for q in qs:
            conv = [{"from": "human", "value": "<image>\n" + q}]
            ids, _ = render(template, conv, tokenizer, model.cfg.image_tokens,
                            add_generation_prompt=True)
            rows.append(ids.tolist())
        n = len(rows)
        while len(rows) < batch_size:  # a fixed batch shape: one compilation
            rows.append(rows[0])
            ims = list(ims) + [ims[0]]
        ids, seg = left_pad(rows)
        pixels = np.stack([prepare_image(im, image_size) for im in ims])[:, None]
        pixels = normalize_pixels(pixels, image_mean, image_std)
        out = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(0),
                              max_new_tokens=max_new_tokens, stop_ids=stop,
                              pad_id=tokenizer.pad_id, prefix_lm=model.cfg.prefix_lm)
        tokens = np.asarray(out["tokens"])
        for row in tokens[:n]:
            kept = [int(t) for t in row if int(t) not in stop and int(t) != tokenizer.pad_id]
            answers.append(tokenizer.decode(kept).strip())
    return answers


def vqa_exact_match(model: Any, params: Any, tokenizer: Any, template: str,
                    records: Sequence[dict], **kw: Any) -> tuple[float, list[dict]]:
    """Accuracy of greedy answers on {image, question, answer} records, and the per-example
    results."""
    preds = answer_questions(model, params, tokenizer, template, [r["image"] for r in records],
                             [r["question"] for r in records], **kw)
    results = [{"id": r["id"], "question": r["question"], "answer": r["answer"],
                "prediction": p, "correct": exact_match(p, r["answer"])}
               for r, p in zip(records, preds, strict=True)]
    return float(np.mean([r["correct"] for r in results])), results
