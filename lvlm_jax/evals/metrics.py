"""Evaluation metrics: captioning, VQA, multiple choice and object hallucination (POPE, CHAIR)."""

from lvlm_jax.evals.metrics_caption import (
    PUNCTUATIONS,
    bleu,
    cider,
    cider_scores,
    ptb_tokens,
    rouge_l,
    rouge_l_scores,
    tokenize,
)
from lvlm_jax.evals.metrics_hallucination import (
    COCO_SYNONYMS,
    build_vocabulary,
    chair,
    mentioned_objects,
    parse_yes_no,
    pluralize,
    pope,
)
from lvlm_jax.evals.metrics_vqa import (
    multiple_choice_by_letter,
    multiple_choice_by_likelihood,
    normalize_vqa_answer,
    vqa_accuracy,
)

__all__ = [
    "COCO_SYNONYMS",
    "PUNCTUATIONS",
    "bleu",
    "build_vocabulary",
    "chair",
    "cider",
    "cider_scores",
    "mentioned_objects",
    "multiple_choice_by_letter",
    "multiple_choice_by_likelihood",
    "normalize_vqa_answer",
    "parse_yes_no",
    "pluralize",
    "pope",
    "ptb_tokens",
    "rouge_l",
    "rouge_l_scores",
    "tokenize",
    "vqa_accuracy",
]
