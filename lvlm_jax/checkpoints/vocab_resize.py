"""New vocabulary rows for a checkpoint whose embedding and LM head are smaller than the model's
(its tokenizer gained `<image>`/`<video>`), started as transformers' resize_token_embeddings
starts them by default (transformers 5: `mean_resizing=True`)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

NEW_ROWS = ("the mean of the checkpoint's rows plus N(0, 1e-9 x their covariance), as "
            "transformers' resize_token_embeddings (mean_resizing=True, its default)")
# '/'-joined parameter paths whose axis `int` is the vocabulary.
VOCAB_AXES = ((re.compile(r"(.*/)?decoder/embed_tokens/embedding"), 0),
              (re.compile(r"(.*/)?decoder/lm_head/kernel"), 1))
# transformers scales the rows' covariance by this: new rows are the mean, barely perturbed,
# so that a new token's logit starts near the average one (Hewitt, "Initializing new word
# embeddings for pretrained language models", 2021).
EPSILON = 1e-9


def vocab_axis(path: str) -> int | None:
    """The vocabulary axis of the parameter at `path`, or None for any other parameter."""
    return next((axis for pattern, axis in VOCAB_AXES if pattern.fullmatch(path)), None)


def new_rows(old: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` rows drawn from N(mean, EPSILON * covariance) of `old`'s rows [n, d] (biased
    covariance, as transformers computes it); the mean itself when that covariance is not
    positive definite. Seeded, so every process of a multi-host run draws the same rows."""
    rows = np.asarray(old, np.float32)
    mean = rows.mean(axis=0)
    centered = rows - mean
    covariance = (centered.T @ centered).astype(np.float64) / rows.shape[0]
    try:
        chol = np.linalg.cholesky(EPSILON * covariance)
    except np.linalg.LinAlgError:
        return np.broadcast_to(mean, (count, rows.shape[1])).copy()
    noise = np.random.default_rng(seed).standard_normal((count, rows.shape[1]))
    return (mean + noise @ chol.T).astype(np.float32)


def grow_vocab(path: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The checkpoint's `value` for parameter `path`, grown along its vocabulary axis to the
    model's `shape`. Any other mismatch fails naming the parameter and both shapes."""
    old = _host(value)
    axis = vocab_axis(path)
    others = lambda s: (*s[:axis], *s[axis + 1:])  # noqa: E731
    grows = (axis is not None and old.ndim == len(shape) and old.shape[axis] < shape[axis]
             and others(old.shape) == others(shape))
    if not grows:
        hint = (" (a vocabulary smaller than the checkpoint's: set model.language.vocab_size "
                "to at least the checkpoint's)" if axis is not None else "")
        raise ValueError(f"parameter {path}: checkpoint has shape {tuple(old.shape)}, "
                         f"the model expects {tuple(shape)}{hint}")
    rows = np.moveaxis(old, axis, 0)
    grown = np.concatenate([rows, new_rows(rows, shape[axis] - rows.shape[0]).astype(old.dtype)])
    return np.moveaxis(grown, 0, axis)


def _host(value: Any) -> np.ndarray:
    """A numpy copy of a checkpoint array; a replicated jax.Array spanning several processes is
    read from this process's own copy."""
    import jax

    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        if not value.sharding.is_fully_replicated:
            raise ValueError("a checkpoint array to grow must be replicated on every process")
        return np.asarray(value.addressable_data(0))  # this process's copy is whole
    return np.asarray(value)
