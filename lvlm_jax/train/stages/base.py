"""What a training stage contributes to the one loop: a loss, the batch fields it reads, and the
parameters it freezes by default. The loop never forks for a stage."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lvlm_jax.train import losses

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossContext:
    """What a loss needs besides params and batch: the model and a few config values."""

    model: Any
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    loss_chunk: int = 128

    def pixels(self, batch: Mapping[str, Array]) -> Array | None:
        """uint8 images shipped by the loader -> normalised floats, on the device."""
        if "pixel_values" not in batch:
            return None
        return normalize_pixels(batch["pixel_values"], self.image_mean, self.image_std)


# loss(ctx, params, batch, rng) -> (sum of per-token losses, their total weight, metric sums)
LossFn = Callable[[LossContext, Any, Mapping[str, Array], Array],
                  tuple[Array, Array, dict[str, Array]]]


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    loss: LossFn
    fields: tuple[str, ...]
    default_freeze: tuple[str, ...] = ()
    description: str = ""


def normalize_pixels(pixels: Array, mean, std) -> Array:
    x = pixels.astype(jnp.float32)
    if pixels.dtype == jnp.uint8:
        x = x / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def model_inputs(ctx: LossContext, batch: Mapping[str, Array]) -> dict[str, Any]:
    kw: dict[str, Any] = {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}
    if "prefix_mask" in batch:
        kw["prefix_mask"] = batch["prefix_mask"]
    pixels = ctx.pixels(batch)
    return {"input_ids": batch["input_ids"], "pixel_values": pixels, **kw}


def next_token_loss(ctx: LossContext, params: Any, batch: Mapping[str, Array], rng: Array):
    """Cross-entropy on the supervised tokens (`loss_mask`), summed, with its token count."""
    del rng
    model = ctx.model
    variables = {"params": params}
    hidden, _ = model.apply(variables, **model_inputs(ctx, batch), return_hidden=True)
    head = lambda h: model.apply(variables, h,  # noqa: E731
                                 method=lambda m, x: m.decoder.logits_from_hidden(x))
    weights = batch["loss_mask"].astype(jnp.float32)
    total = losses.chunked_cross_entropy_sum(hidden, head, batch["targets"], weights,
                                             ctx.loss_chunk)
    return total, jnp.sum(weights), {}


LM_FIELDS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "pixel_values")
