"""Eval runners: greedy or sampled answers to VQA-style records, and
the exact-match reward of sampled answers on a fixed prompt set (the RL stages' held-out
figure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from data_pipelines.images import prepare_image
from data_pipelines.templates import end_of_turn_ids, render
from lvlm_jax.evals.answers import exact_match
from lvlm_jax.generate import generate_tokens, left_pad
from lvlm_jax.models.vlm import normalize_pixels


def answer_questions(model: Any, params: Any, tokenizer: Any, template: str,
                     images: Sequence[np.ndarray], questions: Sequence[str], *,
                     image_size: int, image_mean, image_std, max_new_tokens: int = 8,
                     batch_size: int = 32, temperature: float = 0.0, seed: int = 0
                     ) -> list[str]:
    """Answers to one-image questions, the prompt rendered by the chat template: greedy, or
    sampled at `temperature` with a key that depends only on (seed, batch index), so two
    models answer the same prompts with the same random numbers."""
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
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), start // batch_size)
        out = generate_tokens(model, params, ids, seg, pixels, rng, temperature=temperature,
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


def sampled_reward(model: Any, params: Any, tokenizer: Any, template: str,
                   records: Sequence[dict], *, samples: int, temperature: float, seed: int = 0,
                   **kw: Any) -> float:
    """The RL stages' rule reward on a fixed prompt set: the mean exact match of `samples`
    answers per record sampled at `temperature`. With the same `seed` a policy before and
    after training draws the same random numbers, which takes most of the sampling noise out
    of the difference."""
    repeated = [r for r in records for _ in range(samples)]
    preds = answer_questions(model, params, tokenizer, template, [r["image"] for r in repeated],
                             [r["question"] for r in repeated], temperature=temperature,
                             seed=seed, **kw)
    return float(np.mean([exact_match(p, r["answer"]) for r, p in zip(repeated, preds,
                                                                       strict=True)]))
