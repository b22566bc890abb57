"""What a training stage contributes to the one loop: a loss, the batch fields it reads, the
parameters it freezes by default, and optionally extra parameters (a scalar head) and a frozen
reference model. The loop never forks for a stage.

Reference model (DPO, PPO, GRPO). A stage with `uses_reference=True` gets a frozen copy of the
policy's starting parameters: `TrainState.reference`, set by `loop.materialize` (and again after
`checkpoint.init_from` has loaded another run's params), with the same tree and the same
NamedShardings as `TrainState.params`, no optimizer state, never updated. The step hands it to the
loss as `ctx.reference` (use `reference_params(ctx)`), so every stage keeps the one loss signature
and wrappers around a loss (eval's `bind_reference`) pass it through. It is checkpointed with
the state rather than rebuilt from `init_from` on resume: the run it came from may since have
trained on, moved or been deleted, and only the saved copy makes a resume bitwise identical.
Stages without a reference carry `reference=None` (their checkpoints are unchanged). Under LoRA
the reference is the policy's own frozen base without adapters: LoRA's stage wrapper
(`lora.adapted_stage`) builds `ctx.reference` from the params, and the state keeps only the
starting values of base weights that train in full (`lora.trainable`), or None.

Models run on `model_variables(params)`: the params, plus a LoRA run's adapters as the second
variable collection the dense layers read (lvlm_jax/train/lora.py).

Extra parameters (a reward or value head). `Stage.extra_params(rng, model_cfg)` returns a dict of
new top-level subtrees (e.g. {"reward_head": {"kernel", "bias"}}) merged into the params tree
beside "vision"/"connector"/"decoder" at init: they train, shard (plain arrays are replicated; a
flax `nn.Partitioned` box shards by its logical names), checkpoint and export with the model, and
the model's own `apply` ignores them. `init_from` a run without them reports them as missing and
keeps their fresh values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lvlm_jax.models.media_layout import MediaLayout
from lvlm_jax.models.vlm import instruction_inputs, normalize_pixels  # noqa: F401 (re-export)
from lvlm_jax.train import losses
from lvlm_jax.train.lora import model_variables

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossContext:
    """What a loss needs besides params and batch: the model and a few config values."""

    model: Any
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    loss_chunk: int = 128
    # The run's config, for stage options (e.g. `config.dpo.beta`); None: the stage's defaults.
    config: Any = dataclasses.field(default=None, compare=False)
    # The frozen reference params, set by the train step for stages with uses_reference.
    reference: Any = dataclasses.field(default=None, compare=False)
    # The batches' rows are one right-padded sample each (`plain_causal_rows`): the decoder's
    # fused attention ("jax", "cudnn") then uses its kernel's causal mask, no dense one.
    plain_causal: bool = False

    def pixels(self, batch: Mapping[str, Array]) -> Array | MediaLayout | None:
        """uint8 images shipped by the loader -> normalised floats, on the device; a flat
        batch's (data.media="flat": `image_slots`, `image_weights` beside its [groups, crops]
        pixels) as the MediaLayout the model takes in pixel_values' place."""
        if "pixel_values" not in batch:
            return None
        pixels = normalize_pixels(batch["pixel_values"], self.image_mean, self.image_std)
        if "image_slots" in batch:
            return MediaLayout(pixels, batch["image_slots"], batch["image_weights"])
        return pixels


# loss(ctx, params, batch, rng) -> (sum of per-token losses, their total weight, metric sums)
LossFn = Callable[[LossContext, Any, Mapping[str, Array], Array],
                  tuple[Array, Array, dict[str, Array]]]


# extra_params(rng, model_cfg) -> {top-level key: subtree of new parameters}
ExtraParamsFn = Callable[[Array, Any], dict[str, Any]]
_EXTRA_SALT = 0x4EAD


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    loss: LossFn
    fields: tuple[str, ...]
    default_freeze: tuple[str, ...] = ()
    description: str = ""
    uses_reference: bool = False  # the loss reads reference_params(ctx)
    extra_params: ExtraParamsFn | None = None

    def option(self, ctx: LossContext, key: str, default: Any) -> Any:
        """`ctx.config.<stage name>.<key>`, or `default` without a config or such a key."""
        section = None if ctx.config is None else ctx.config.get(self.name)
        return default if section is None or section.get(key) is None else section.get(key)


def with_extra_params(init_fn: Callable[[Array], Any], stage: Stage, model_cfg: Any
                      ) -> Callable[[Array], Any]:
    """rng -> `init_fn(rng)` plus the stage's extra top-level subtrees; the model's own params
    are unchanged for the same rng (the head draws from its own stream)."""
    if stage.extra_params is None:
        return init_fn

    def init(rng):
        params = init_fn(rng)
        extra = stage.extra_params(jax.random.fold_in(rng, _EXTRA_SALT), model_cfg)
        clash = sorted(set(extra) & set(params))
        if clash:
            raise ValueError(f"stage {stage.name!r} adds parameters under {clash[0]!r}, which "
                             "the model already has")
        return {**params, **extra}

    return init


def extra_param_keys(stage: Stage, model_cfg: Any) -> set[str]:
    """The top-level keys `stage.extra_params` adds (none for most stages)."""
    if stage.extra_params is None:
        return set()
    # model_cfg is a static dataclass, not an array: closed over, not traced.
    return set(jax.eval_shape(lambda rng: stage.extra_params(rng, model_cfg),
                              jax.random.PRNGKey(0)))


def reference_params(ctx: LossContext) -> Any:
    """The frozen reference params (under LoRA: the policy's base, without adapters)."""
    if ctx.reference is None:
        raise ValueError("this loss needs the frozen reference model, but none was given: the "
                         "stage must declare uses_reference=True, and its state must come from "
                         "loop.plan/materialize (TrainState.reference)")
    return jax.lax.stop_gradient(ctx.reference)


def with_reference(ctx: LossContext, reference: Any) -> LossContext:
    return ctx if reference is None else dataclasses.replace(ctx, reference=reference)


def bind_reference(stage: Stage) -> Stage:
    """`stage` whose loss takes `(params, reference)` in the params slot, for callers that only
    pass params (evaluation): both stay jit arguments rather than baked-in constants."""
    loss = stage.loss

    def bound(ctx, pair, batch, rng):
        params, reference = pair
        return loss(with_reference(ctx, reference), params, batch, rng)

    return dataclasses.replace(stage, loss=bound)


def plain_causal_rows(cfg: Any) -> bool:
    """Whether the loader's training rows hold one sample each, right-padded, with positions
    0, 1, ... (data_pipelines/encoders.py): unless packed (data.packing) or rollout prompts
    (data.kind="prompt", left-padded). A static fact of the config, known when the step is
    traced; the losses pass it to the model through `LossContext.plain_causal`."""
    return cfg.data.packing == "none" and cfg.data.kind != "prompt"


def model_inputs(ctx: LossContext, batch: Mapping[str, Array]) -> dict[str, Any]:
    kw: dict[str, Any] = {"segment_ids": batch["segment_ids"], "positions": batch["positions"],
                          "plain_causal": ctx.plain_causal}
    if "prefix_mask" in batch:
        kw["prefix_mask"] = batch["prefix_mask"]
    elif "loss_mask" in batch:
        kw.update(prompt_inputs(getattr(ctx.model, "cfg", None), batch))
    pixels = ctx.pixels(batch)
    return {"input_ids": batch["input_ids"], "pixel_values": pixels, **kw}


def prompt_inputs(model_cfg: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    """The prompt, for models that read it: everything before a row's first supervised token.

    A prefix-LM (PaliGemma) attends to it bidirectionally: without this the model would default
    to an all-prefix row and see the targets. An instruction-aware resampler (InstructBLIP) gets
    its text tokens (no image placeholders), left-aligned and cut to max_instruction_len."""
    out: dict[str, Array] = {}
    ids, seg = batch["input_ids"], batch["segment_ids"]
    prompt = (jnp.cumsum(batch["loss_mask"], axis=1) == 0) & (seg > 0)
    if getattr(model_cfg, "prefix_lm", False):
        out["prefix_mask"] = prompt
    if model_cfg is not None and hasattr(model_cfg, "connector"):
        out.update(instruction_inputs(model_cfg, ids, prompt))
    return out


def next_token_loss(ctx: LossContext, params: Any, batch: Mapping[str, Array], rng: Array):
    """Cross-entropy on the supervised tokens (`loss_mask`), summed, with its token count."""
    del rng
    model = ctx.model
    variables = model_variables(params)  # with a LoRA run's adapters, for its dense layers
    hidden, _ = model.apply(variables, **model_inputs(ctx, batch), return_hidden=True)
    head = lambda h: model.apply(variables, h,  # noqa: E731
                                 method=lambda m, x: m.decoder.logits_from_hidden(x))
    weights = batch["loss_mask"].astype(jnp.float32)
    total = losses.chunked_cross_entropy_sum(hidden, head, batch["targets"], weights,
                                             ctx.loss_chunk)
    return total, jnp.sum(weights), {}


LM_FIELDS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "pixel_values")
# A flat batch's media beside pixel_values [groups, crops, S, S, 3] (train/media_batch.py).
FLAT_MEDIA_FIELDS = ("image_slots", "image_weights", "crop_valid")


def batch_fields(stage: Stage, cfg: Any) -> tuple[str, ...]:
    """The fields the loop ships to `stage`'s step: its own, and with data.media="flat" the
    flat media fields (a stage that takes pixels and sees them as a MediaLayout)."""
    media = cfg.data.get("media", "padded") if cfg is not None else "padded"
    if media != "flat" or "pixel_values" not in stage.fields:
        return stage.fields
    if stage.fields != LM_FIELDS:
        raise ValueError(f"data.media='flat' feeds the next-token stages (sft, pretrain); "
                         f"stage {stage.name!r} takes {', '.join(stage.fields)}: use "
                         "data.media='padded'")
    return (*stage.fields, *FLAT_MEDIA_FIELDS)


# ---- preference pairs (reward, DPO) --------------------------------------------------------
SIDES = ("chosen", "rejected")
PAIR_TEXT_FIELDS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
PREFERENCE_FIELDS = (*(f"{s}_{f}" for s in SIDES for f in PAIR_TEXT_FIELDS), "pixel_values")


def pair_rows(batch: Mapping[str, Array], name: str) -> Array:
    """chosen_<name> and rejected_<name> [B, T] -> [2B, T], rows (c0, r0, c1, r1, ...).

    Interleaving keeps each pair on the device that holds it: a batch-sharded [B, T] becomes a
    batch-sharded [2B, T] without moving data."""
    both = jnp.stack([batch[f"{s}_{name}"] for s in SIDES], axis=1)
    return both.reshape(-1, *both.shape[2:])


def pair_hidden(ctx: LossContext, params: Any, batch: Mapping[str, Array]) -> Array:
    """Final hidden states of chosen and rejected in one decoder pass, the shared images encoded
    once: [2B, T, D], rows interleaved as in `pair_rows`. The prompt (before the first
    supervised token) is a prefix-LM's prefix and an instruction-aware resampler's instruction,
    as in `model_inputs`."""
    model, variables = ctx.model, model_variables(params)
    rows = {name: pair_rows(batch, name) for name in PAIR_TEXT_FIELDS
            if f"{SIDES[0]}_{name}" in batch}
    prompt = prompt_inputs(getattr(model, "cfg", None), rows) if "loss_mask" in rows else {}
    features = None
    pixels = ctx.pixels(batch)
    if pixels is not None:
        # Both sides of a pair share the prompt: the chosen rows' instruction serves both.
        instruction = [prompt[k][::len(SIDES)] if k in prompt else None
                       for k in ("instruction", "instruction_mask")]
        features = model.apply(variables, pixels, *instruction, method="encode_images")
        features = jnp.repeat(features, len(SIDES), axis=0)
    hidden, _ = model.apply(variables, rows["input_ids"], image_features=features,
                            segment_ids=rows["segment_ids"], positions=rows["positions"],
                            prefix_mask=prompt.get("prefix_mask"), return_hidden=True,
                            plain_causal=ctx.plain_causal)
    return hidden


def sequence_log_probs(ctx: LossContext, params: Any, hidden: Array, targets: Array,
                       mask: Array) -> Array:
    """sum_t mask * log p(targets_t) per row [b], the LM head applied chunk by chunk."""
    model, variables = ctx.model, model_variables(params)
    head = lambda h: model.apply(variables, h,  # noqa: E731
                                 method=lambda m, x: m.decoder.logits_from_hidden(x))
    token = losses.chunked_token_log_probs(hidden, head, targets, ctx.loss_chunk)
    return jnp.sum(token * mask.astype(jnp.float32), axis=-1)


def last_token_index(segment_ids: Array) -> Array:
    """The position of each row's last real (segment_ids > 0) token [b]; -1 for an empty row."""
    t = segment_ids.shape[-1]
    return jnp.max(jnp.where(segment_ids > 0, jnp.arange(t), -1), axis=-1)
