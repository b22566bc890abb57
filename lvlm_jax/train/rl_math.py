"""The arithmetic of PPO and GRPO on per-token arrays [batch, response tokens]: GAE, clipped
policy and value losses, KL estimates against the reference, group-normalised advantages, and
the log-probabilities of given responses under a model (one forward over prompt + response).

Masks are 1 on response tokens and 0 after a response stops; a masked token is outside the
episode, so nothing is bootstrapped across it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lvlm_jax.models.vlm import instruction_inputs
from lvlm_jax.train import losses
from lvlm_jax.train.lora import model_variables

Array = jax.Array


def masked_mean(x: Array, mask: Array) -> Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_whiten(x: Array, mask: Array, eps: float = 1e-8) -> Array:
    """(x - mean) / std over the masked entries of the whole batch; 0 where mask is 0."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    return (x - mean) * jax.lax.rsqrt(var + eps) * mask.astype(x.dtype)


def gae(rewards: Array, values: Array, mask: Array, gamma: float, lam: float
        ) -> tuple[Array, Array]:
    """Generalised advantage estimation per token -> (advantages, returns), both [b, n].

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where
    V_{t+1} and A_{t+1} count only while the next token is in the episode (mask 1); returns
    are A + V. Masked tokens get 0."""
    mask = mask.astype(jnp.float32)
    rewards, values = rewards * mask, values * mask
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))
    next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    deltas = rewards + gamma * next_values * next_mask - values

    def back(carry, xs):
        delta, keep = xs
        adv = delta + gamma * lam * keep * carry
        return adv, adv

    # Time-major, scanned from the last token back.
    _, adv = jax.lax.scan(back, jnp.zeros(rewards.shape[:1], jnp.float32),
                          (deltas.T, next_mask.T), reverse=True)
    adv = adv.T * mask
    return adv, (adv + values) * mask


def ppo_policy_loss(log_probs: Array, old_log_probs: Array, advantages: Array, mask: Array,
                    clip_eps: float) -> tuple[Array, Array]:
    """The clipped surrogate -> (mean loss, fraction of tokens clipped), over masked tokens.

    loss_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)) with ratio_t =
    exp(log_probs - old_log_probs); a token counts as clipped when the clipped term is the
    larger (the gradient through it is zero)."""
    ratio = jnp.exp(log_probs - old_log_probs)
    plain = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = jnp.maximum(plain, clipped)
    return masked_mean(loss, mask), masked_mean((clipped > plain).astype(jnp.float32), mask)


def ppo_value_loss(values: Array, old_values: Array, returns: Array, mask: Array,
                   clip_eps: float) -> tuple[Array, Array]:
    """The clipped value loss -> (mean loss, fraction of tokens clipped), over masked tokens.

    0.5 * max((V - R)^2, (V_clip - R)^2) with V_clip = old_V + clip(V - old_V, -eps, eps)."""
    clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    plain = jnp.square(values - returns)
    clipped = jnp.square(clipped_values - returns)
    loss = 0.5 * jnp.maximum(plain, clipped)
    return masked_mean(loss, mask), masked_mean((clipped > plain).astype(jnp.float32), mask)


def kl_k1(log_probs: Array, ref_log_probs: Array) -> Array:
    """log p - log p_ref per token: unbiased for KL(p || ref) on samples of p, can be negative."""
    return log_probs - ref_log_probs


def kl_k3(log_probs: Array, ref_log_probs: Array) -> Array:
    """exp(r) - r - 1 with r = log p_ref - log p: unbiased, never negative, lower variance."""
    r = ref_log_probs - log_probs
    return jnp.exp(r) - r - 1.0


def grpo_advantages(rewards: Array, mask: Array, group_size: int, eps: float = 1e-6) -> Array:
    """Sequence rewards [b] -> (r - mean_group) / (std_group + eps) on every response token
    [b, n]. Rows i*G .. i*G+G-1 are one prompt's group; std is the population std (ddof 0)."""
    b = rewards.shape[0]
    if b % group_size:
        raise ValueError(f"{b} rewards do not split into groups of {group_size}")
    groups = rewards.reshape(b // group_size, group_size).astype(jnp.float32)
    mean = jnp.mean(groups, axis=1, keepdims=True)
    std = jnp.std(groups, axis=1, keepdims=True)
    adv = ((groups - mean) / (std + eps)).reshape(b)
    return adv[:, None] * mask.astype(jnp.float32)


def sequence_inputs(prompt_ids: Array, prompt_segments: Array, response: Array,
                    response_mask: Array) -> dict[str, Array]:
    """Left-padded prompts [b, p] + responses [b, n] -> the model's input_ids, segment_ids and
    positions [b, p + n]: positions count from each row's first real token, as in generation."""
    segments = jnp.concatenate([prompt_segments, response_mask.astype(jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    return {"input_ids": jnp.concatenate([prompt_ids, response], axis=1),
            "segment_ids": segments, "positions": positions.astype(jnp.int32)}


def response_log_probs(model: Any, params: Any, batch: Mapping[str, Array], pixels: Array | None,
                       num_response: int, chunk: int = 128, temperature: float = 1.0
                       ) -> tuple[Array, Array]:
    """log p(response token) [b, n] and the hidden states that predict them [b, n, D], from one
    forward over prompt + response (`batch`: input_ids, segment_ids, positions; the last
    `num_response` tokens are the response). p is the policy that samples at `temperature`,
    softmax(logits / temperature), so that PPO's ratios and the KL terms compare the
    distributions the responses were drawn from (0, greedy, scores at 1)."""
    variables = model_variables(params)  # with a LoRA run's adapters, for its dense layers
    # The prompt is a prefix-LM's bidirectional prefix and an instruction-aware resampler's
    # instruction, as `generate_tokens` treats it.
    prompt_len = batch["input_ids"].shape[1] - num_response
    prompt = (batch["segment_ids"] > 0) & (jnp.arange(batch["input_ids"].shape[1]) < prompt_len)
    kw = instruction_inputs(model.cfg, batch["input_ids"], prompt)
    if model.cfg.prefix_lm:
        kw["prefix_mask"] = prompt
    hidden, _ = model.apply(variables, batch["input_ids"], pixels,
                            segment_ids=batch["segment_ids"], positions=batch["positions"],
                            return_hidden=True, **kw)
    # Position p - 1 + j predicts response token j.
    hidden = hidden[:, -num_response - 1:-1]
    targets = batch["input_ids"][:, -num_response:]
    scale = 1.0 / temperature if temperature > 0 else 1.0
    head = lambda h: scale * model.apply(variables, h,  # noqa: E731
                                         method=lambda m, x: m.decoder.logits_from_hidden(x))
    return losses.chunked_token_log_probs(hidden, head, targets, chunk), hidden
