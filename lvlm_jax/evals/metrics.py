"""Evaluation metrics: captioning, VQA, documents and charts, multiple choice, hallucination."""

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
from lvlm_jax.evals.metrics_choice import (
    circular_accuracy,
    circular_rotations,
    mmmu_open_correct,
    mmmu_parse_choice,
    parse_choice,
)
from lvlm_jax.evals.metrics_documents import anls, relaxed_accuracy
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
    "anls",
    "bleu",
    "build_vocabulary",
    "chair",
    "cider",
    "cider_scores",
    "circular_accuracy",
    "circular_rotations",
    "mentioned_objects",
    "mmmu_open_correct",
    "mmmu_parse_choice",
    "multiple_choice_by_letter",
    "multiple_choice_by_likelihood",
    "normalize_vqa_answer",
    "parse_choice",
    "parse_yes_no",
    "pluralize",
    "pope",
    "ptb_tokens",
    "relaxed_accuracy",
    "rouge_l",
    "rouge_l_scores",
    "tokenize",
    "vqa_accuracy",
]
