"""The train state and the jitted update step: gradient accumulation over micro-batches, grads
only for trainable parameters, and a skip (no update) on a non-finite loss or gradient."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from lvlm_jax.train.stages.base import LossContext, Stage, with_reference

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any
    rng: Array
    nonfinite: Array  # how many steps were skipped for a non-finite loss or gradient
    # The frozen starting params of a stage with uses_reference (see stages/base.py), sharded
    # like `params`, never updated, checkpointed with the rest; None for other stages. A LoRA
    # run keeps only the base weights that train in full, or None (lora.saved_reference).
    reference: Any = None


def split_trainable(params: Any, trainable: Any) -> tuple[list, list, Any]:
    leaves, treedef = jax.tree.flatten(params)
    flags = jax.tree.leaves(trainable)
    train = [x for x, f in zip(leaves, flags, strict=True) if f]
    frozen = [x for x, f in zip(leaves, flags, strict=True) if not f]
    return train, frozen, (treedef, flags)


def merge_trainable(train: list, frozen: list, spec: Any) -> Any:
    treedef, flags = spec
    it_t, it_f = iter(train), iter(frozen)
    return jax.tree.unflatten(treedef, [next(it_t) if f else next(it_f) for f in flags])


def micro_batches(batch: Mapping[str, Array], k: int) -> dict[str, Array]:
    """[B, ...] -> [k, B/k, ...], micro-batch j holding rows j, j+k, ...: each device keeps its
    own rows, so splitting moves no data."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} does not split into {k} micro-batches")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return {name: split(x) for name, x in batch.items()}


def make_train_step(ctx: LossContext, stage: Stage, tx: optax.GradientTransformation,
                    trainable: Any, schedule: optax.Schedule, grad_accum: int = 1):
    """(state, batch) -> (new state, metrics). Loss = sum over supervised tokens / their count,
    over the whole batch, so k micro-batches equal one batch k times larger."""

    def sums_and_grads(params, batch, rng, reference):
        train, frozen, spec = split_trainable(params, trainable)
        lctx = with_reference(ctx, reference)

        def f(train_leaves):
            p = merge_trainable(train_leaves, frozen, spec)
            total, weight, metrics = stage.loss(lctx, p, batch, rng)
            return total, (weight, metrics)

        (total, (weight, metrics)), grads = jax.value_and_grad(f, has_aux=True)(train)
        return total, weight, metrics, grads

    def step(state: TrainState, batch: Mapping[str, Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        # None for a LoRA run whose base trains nowhere: its reference is the policy's base
        # (lora.reference); a stage that reads a missing one fails in reference_params.
        ref = state.reference if stage.uses_reference else None
        if grad_accum == 1:
            total, weight, metrics, grads = sums_and_grads(state.params, batch, rng, ref)
        else:
            micro = micro_batches(batch, grad_accum)
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(sums_and_grads, state.params, first, rng, ref)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

            def body(acc, xs):
                mb, i = xs
                out = sums_and_grads(state.params, mb, jax.random.fold_in(rng, i), ref)
                return jax.tree.map(jnp.add, acc, out), None

            (total, weight, metrics, grads), _ = jax.lax.scan(
                body, zeros, (micro, jnp.arange(grad_accum)))
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
        loss = total / denom
        grad_norm = optax.global_norm(grads)
        _, frozen, spec = split_trainable(state.params, trainable)
        zero_frozen = [jnp.zeros_like(x) for x in frozen]
        full_grads = merge_trainable(grads, zero_frozen, spec)
        updates, new_opt = tx.update(full_grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # Frozen parameters keep their exact bits (p + 0.0 would turn -0.0 into +0.0).
        new_params = jax.tree.map(lambda n, o, t: n if t else o, new_params, state.params,
                                  trainable)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
        )
        out = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "tokens": weight, "finite": finite}
        out.update({k: v / denom for k, v in metrics.items()})
        return new_state, out

    return step
