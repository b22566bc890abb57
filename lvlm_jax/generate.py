"""Prefill + decode with the KV cache, the decode loop inside jit (lax.while_loop).

Prompts are left-padded (segment id 0 on padding, positions counted from each row's first real
token), so one batch holds prompts of different lengths. Greedy, temperature, top-k and top-p
sampling; stop tokens; returns tokens and the per-token log-probabilities under the model.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvlm_jax.models import language
from lvlm_jax.models.vlm import instruction_inputs

Array = jax.Array


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> (ids [b, t] left-padded, segment ids: 1 on tokens, 0 on padding)."""
    length = length or max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    seg = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if len(r) > length:
            raise ValueError(f"prompt {i} has {len(r)} tokens, more than {length}")
        if len(r):
            ids[i, length - len(r):] = r
            seg[i, length - len(r):] = 1
    return ids, seg


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Masks all but the top-k tokens and/or the smallest set with probability >= top_p."""
    neg = jnp.finfo(logits.dtype).min
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token when the mass strictly before it is below top_p (the top one always).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1,
                         keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def first_argmax(logits: Array) -> Array:
    """jnp.argmax over the last axis (ties go to the first index), as a max and then the first
    index holding it: XLA:CPU's argmax reduction is ~10x slower (2.4 ms vs 0.23 on [16, 32000])."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    # A NaN row has no element equal to its max; jnp.argmax would return the NaN's index.
    hit = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, iota, logits.shape[-1]), axis=-1)


def sample(logits: Array, rng: Array, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> Array:
    """Greedy (temperature 0: the first index of the maximum) or sampled next tokens."""
    if temperature == 0.0:
        return first_argmax(logits)
    logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _logits_from_hidden(model: Any, hidden: Array) -> Array:
    return model.decoder.logits_from_hidden(hidden)


_STATIC = ("model", "max_new_tokens", "temperature", "top_k", "top_p", "stop_ids", "pad_id",
           "prefix_lm", "fuse_projections")
# XLA:CPU runs dots through YNNPACK fusions by default; on decoding's skinny [batch, d] x [d, n]
# products they take 1.6-2x as long as XLA's Eigen path (a [16, 512] x [512, 32000] LM head:
# 14 ms vs 9 ms), so generation is compiled without them on CPU. Numbers stay fp32.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _compiled_for(platform: str | None) -> Any:
    options = CPU_COMPILER_OPTIONS if platform == "cpu" else None  # None: inside another jit
    return jax.jit(_generate_tokens, static_argnames=_STATIC, compiler_options=options)


def params_platform(params: Any) -> str | None:
    """The platform of the devices `params` live on (where the program will run); None while
    they are being traced inside another jit, whose caller knows its target."""
    for x in jax.tree.leaves(params):
        if isinstance(x, jax.core.Tracer):
            return None
        if isinstance(x, jax.Array):
            return next(iter(x.devices())).platform
    return jax.devices()[0].platform  # host arrays: jit puts them on the default device


def generate_tokens(model: Any, params: Any, input_ids: Array, segment_ids: Array,
                    pixel_values: Array | None, rng: Array, *, max_new_tokens: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    stop_ids: tuple[int, ...] = (), pad_id: int = 0,
                    prefix_lm: bool = False, fuse_projections: bool | None = None
                    ) -> dict[str, Array]:
    """Generates up to `max_new_tokens` after left-padded prompts, under jit.

    Returns tokens [b, n] (pad_id after a row stops), log_probs [b, n] (log p of each token
    under the model at temperature 1; 0 after the row stops) and lengths [b] (tokens generated,
    stop token included).

    `fuse_projections`: decode with fused q/k/v and gate/up weights, faster on CPU (see
    language.fuse_projections) and elsewhere not worth a second copy of those weights in
    accelerator memory. None: True where the params live on CPU devices; inside another jit
    (a PPO rollout) the caller passes its target's choice, None meaning False.
    """
    platform = params_platform(params)
    if isinstance(input_ids, jax.core.Tracer):
        platform = None
    if fuse_projections is None:
        fuse_projections = platform == "cpu"
    # Inside another jit this is inlined there: compiler options belong to the outer jit only.
    return _compiled_for(platform)(
        model, params, input_ids, segment_ids, pixel_values, rng,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_ids=stop_ids, pad_id=pad_id, prefix_lm=prefix_lm,
        fuse_projections=fuse_projections)


def _generate_tokens(model: Any, params: Any, input_ids: Array, segment_ids: Array,
                     pixel_values: Array | None, rng: Array, *, max_new_tokens: int,
                     temperature: float, top_k: int, top_p: float, stop_ids: tuple[int, ...],
                     pad_id: int, prefix_lm: bool, fuse_projections: bool = False
                     ) -> dict[str, Array]:
    b, t = input_ids.shape
    variables = {"params": params}
    # The decode loop's weights; the prefill keeps the separate ones (its [b, t] matmuls gain
    # nothing from fusing, and lose the time of slicing q, k, v apart).
    step_variables = ({"params": language.fuse_projections(nn.meta.unbox(params))}
                      if fuse_projections else variables)
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
    prefix = (segment_ids > 0) if prefix_lm else None
    cache = model.apply(variables, b, t + max_new_tokens, method=model.init_cache)
    # The whole prompt is an instruction-aware resampler's instruction, as in training.
    instruction = instruction_inputs(model.cfg, input_ids, segment_ids > 0)
    hidden, cache = model.apply(variables, input_ids, pixel_values, segment_ids=segment_ids,
                                positions=positions, prefix_mask=prefix, cache=cache,
                                return_hidden=True, **instruction)
    # The LM head on the last prompt position only: the others' logits are never used.
    last = model.apply(variables, hidden[:, -1:], method=_logits_from_hidden)[:, 0]
    last = last.astype(jnp.float32)
    next_pos = positions[:, -1] + 1
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
    media_ids = None
    image_features = None
    if model.cfg.connector.kind == "cross_attention" and pixel_values is not None:
        # Decoded tokens attend to the last image of their prompt.
        image_features = model.apply(variables, pixel_values, method=model.encode_images)
        marks = jnp.sum(input_ids == model.cfg.image_token_id, axis=1) - 1
        media_ids = marks[:, None]

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, last, done, tokens, logps, lengths, rng = carry
        rng, sub = jax.random.split(rng)
        tok = sample(last, sub, temperature, top_k, top_p)
        logp = (jnp.take_along_axis(last, tok[:, None], 1)[:, 0]
                - jax.nn.logsumexp(last, axis=-1))
        tok = jnp.where(done, pad_id, tok)
        tokens = tokens.at[:, i].set(tok)
        logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, stops)
        kw = {}
        if prefix_lm:
            kw["prefix_mask"] = jnp.zeros((b, 1), bool)
        logits, cache = model.apply(step_variables, tok[:, None], segment_ids=jnp.ones((b, 1),
                                    jnp.int32), positions=(next_pos + i)[:, None],
                                    cache=cache, image_features=image_features,
                                    media_ids=media_ids, **kw)
        return i + 1, cache, logits[:, -1].astype(jnp.float32), done, tokens, logps, lengths, rng

    init = (jnp.zeros((), jnp.int32), cache, last, jnp.zeros((b,), bool),
            jnp.full((b, max_new_tokens), pad_id, jnp.int32),
            jnp.zeros((b, max_new_tokens), jnp.float32), jnp.zeros((b,), jnp.int32), rng)
    _, _, _, _, tokens, logps, lengths, _ = jax.lax.while_loop(cond, body, init)
    return {"tokens": tokens, "log_probs": logps, "lengths": lengths}
