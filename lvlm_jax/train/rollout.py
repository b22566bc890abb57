"""Rollouts for PPO and GRPO: the loader's prompts -> sampled responses (the KV-cache generator)
-> policy and reference log-probs, values, rewards -> the stage's training batch.

A stage with a rollout (`make_rollout(setup)`, see stages/ppo.py `RolloutStage`) gets it called
by the one loop before every jitted step, on this process's prompt batch. Sampling and scoring
run in one jit, the rule reward (exact match of the normalised decoded response and reference)
on the host, and the stage's advantages in a second jit whose outputs carry the step's batch
shardings.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from data_pipelines.templates import end_of_turn_ids
from lvlm_jax import sharding
from lvlm_jax.evals.answers import exact_match
from lvlm_jax.generate import generate_tokens
from lvlm_jax.train import lora
from lvlm_jax.train.rl_math import kl_k1, response_log_probs, sequence_inputs

if TYPE_CHECKING:  # stages/ imports this module: a runtime import here would be circular
    from lvlm_jax.train.stages.base import LossContext

Array = jax.Array
PROMPT_FIELDS = ("prompt_ids", "prompt_segment_ids", "pixel_values", "reference_ids")
REWARDS = ("rule", "model", "both")
_ROLLOUT_SALT = 0x5A3


@dataclasses.dataclass(frozen=True)
class RolloutOptions:
    """The sampling and reward options of `config.<stage>`."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    group_size: int = 1
    reward: str = "rule"
    reward_model: str = ""
    epochs: int = 1  # optimizer steps on each rollout batch before sampling again

    @classmethod
    def from_config(cls, cfg: Any, section: str, **defaults: Any) -> RolloutOptions:
        given = cfg.get(section) if cfg is not None else None
        names = {f.name for f in dataclasses.fields(cls)}
        opts = cls(**{**defaults, **{k: v for k, v in (given or {}).items() if k in names}})
        if opts.reward not in REWARDS:
            raise ValueError(f"{section}.reward must be one of {list(REWARDS)}, "
                             f"got {opts.reward!r}")
        if opts.reward in ("model", "both") and not opts.reward_model:
            raise ValueError(f"{section}.reward={opts.reward!r} needs {section}.reward_model="
                             "WORKDIR of a `reward` stage run")
        for key in ("max_new_tokens", "group_size", "epochs"):
            if int(getattr(opts, key)) < 1:
                raise ValueError(f"{section}.{key} must be >= 1, got {getattr(opts, key)}")
        if opts.temperature < 0:
            raise ValueError(f"{section}.temperature must be >= 0, got {opts.temperature}")
        return opts


def option(cfg: Any, section: str, key: str, default: Any) -> Any:
    """`cfg.<section>.<key>`, or `default` without a config, such a section or such a key."""
    given = None if cfg is None else cfg.get(section)
    return default if given is None or given.get(key) is None else given.get(key)


# advantages(sampled, score [b, 1]) -> (the stage's training fields, metrics); hashable (a
# frozen dataclass) so that rollouts of equal settings share one compilation.
AdvantagesFn = Callable[[Mapping[str, Array], Array], tuple[dict[str, Array], dict[str, Array]]]
# values(params, hidden [b, n, D]) -> [b, n]
ValuesFn = Callable[[Any, Array], Array]


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """Everything static about sampling and scoring (a jit static argument)."""

    ctx: LossContext  # the policy model, pixel normalisation, the LM head's chunk
    opts: RolloutOptions
    stop_ids: tuple[int, ...]
    pad_id: int
    mesh: Any
    values: ValuesFn | None = None  # PPO's value head; None: no values
    reward_ctx: LossContext | None = None  # the reward model's, with opts.reward model/both


def _batch_sharded(mesh: Any, tree: dict[str, Array]) -> dict[str, Array]:
    return {k: jax.lax.with_sharding_constraint(v, sharding.batch_sharding(mesh, v.ndim))
            for k, v in tree.items()}


@functools.partial(jax.jit, static_argnames=("spec",))
def sample_and_score(params: Any, reference: Any, reward_params: Any,
                     prompts: Mapping[str, Array], rng: Array, *, spec: SampleSpec
                     ) -> dict[str, Array]:
    """Samples `group_size` responses per prompt with the KV-cache generator and scores them:
    the sequences (input_ids, segment_ids, positions [b, p + n]), pixel_values, response_mask,
    old_log_probs and ref_log_probs [b, n] (one forward each over prompt + response),
    reference_ids, the generator's own sample_log_probs, and old_values [b, n] / model_reward
    [b, 1] when the spec has a value head / a reward model."""
    model, n = spec.ctx.model, int(spec.opts.max_new_tokens)
    reference = lora.reference(params, reference)  # under LoRA: the policy's base
    if spec.opts.group_size > 1:  # rows (p0 x G, p1 x G, ...): a group stays on its device
        prompts = {k: jnp.repeat(v, spec.opts.group_size, axis=0) for k, v in prompts.items()}
    pixels = spec.ctx.pixels(prompts)
    # The sampler runs plain kernels: LoRA adapters merged once per rollout. The log-probs
    # below take them unmerged, computed as the train step computes them.
    out = generate_tokens(model, lora.merge(params), prompts["prompt_ids"],
                          prompts["prompt_segment_ids"], pixels, rng, max_new_tokens=n,
                          temperature=float(spec.opts.temperature), stop_ids=spec.stop_ids,
                          pad_id=spec.pad_id, prefix_lm=model.cfg.prefix_lm,
                          fuse_projections=sharding.mesh_platform(spec.mesh) == "cpu")
    mask = (jnp.arange(n)[None] < out["lengths"][:, None]).astype(jnp.float32)
    seq = sequence_inputs(prompts["prompt_ids"], prompts["prompt_segment_ids"], out["tokens"],
                          mask)
    chunk = spec.ctx.loss_chunk
    temperature = float(spec.opts.temperature)
    logp, hidden = response_log_probs(model, params, seq, pixels, n, chunk, temperature)
    ref_logp, _ = response_log_probs(model, reference, seq, pixels, n, chunk, temperature)
    sampled = {**seq, "pixel_values": prompts["pixel_values"], "response_mask": mask,
               "old_log_probs": logp, "ref_log_probs": ref_logp,
               "reference_ids": prompts["reference_ids"], "sample_log_probs": out["log_probs"]}
    if spec.values is not None:
        sampled["old_values"] = spec.values(params, hidden) * mask
    if spec.reward_ctx is not None:
        from lvlm_jax.train.stages.reward import score

        # The response as the supervised part: the reward model reads the prompt as it did in
        # training (a prefix-LM's prefix, an instruction-aware resampler's instruction).
        response = jnp.concatenate([jnp.zeros_like(prompts["prompt_ids"], jnp.float32), mask], 1)
        sampled["model_reward"] = score(spec.reward_ctx, reward_params, {
            **seq, "pixel_values": prompts["pixel_values"], "loss_mask": response})[:, None]
    return _batch_sharded(spec.mesh, sampled)


@functools.partial(jax.jit, static_argnames=("spec", "advantages"))
def finish(sampled: Mapping[str, Array], *, spec: SampleSpec, advantages: AdvantagesFn
           ) -> tuple[dict[str, Array], dict[str, Array]]:
    """The sequence score (rule_reward and/or model_reward) -> the stage's advantages: (the
    training batch, sharded like the step's, and rollout metrics)."""
    kind = spec.opts.reward
    parts = [sampled[k] for k, on in (("rule_reward", kind in ("rule", "both")),
                                      ("model_reward", kind in ("model", "both"))) if on]
    score = sum(parts[1:], parts[0])
    mask = sampled["response_mask"]
    fields, extra = advantages(sampled, score)
    metrics = {
        "reward": jnp.mean(score),
        "response_length": jnp.mean(jnp.sum(mask, axis=1)),
        # the summed per-token log-ratio to the reference, per response
        "kl_ref": jnp.mean(jnp.sum(kl_k1(sampled["old_log_probs"], sampled["ref_log_probs"])
                                   * mask, axis=1)),
        **extra,
    }
    if kind == "both":
        metrics["rule_reward"] = jnp.mean(sampled["rule_reward"])
        metrics["model_reward"] = jnp.mean(sampled["model_reward"])
    return _batch_sharded(spec.mesh, fields), metrics


def decode_responses(tokens: np.ndarray, tokenizer: Any, stop_ids: Sequence[int]) -> list[str]:
    """Token rows -> texts, each cut at its first stop token; pad and image ids dropped. An id
    the tokenizer lacks (the model's vocabulary may be larger) decodes as <unk>, so such a
    response never matches a reference."""
    drop = {tokenizer.pad_id, tokenizer.image_id}
    vocab, unk = tokenizer.vocab_size, tokenizer.unk_id
    texts = []
    for row in np.asarray(tokens).tolist():
        kept, outside = [], False
        for t in row:
            if t in stop_ids:
                break
            if t not in drop:
                outside |= not 0 <= t < vocab
                kept.append(t if 0 <= t < vocab else unk)
        text = tokenizer.decode([t for t in kept if t is not None]).strip()
        # A tokenizer without <unk> (Llama-3's) marks such a response with U+FFFD instead.
        texts.append(text + "\ufffd" if outside and unk is None else text)
    return texts


def rule_rewards(tokens: np.ndarray, reference_ids: np.ndarray, tokenizer: Any,
                 stop_ids: Sequence[int]) -> np.ndarray:
    """[b] float32: 1 where the normalised response equals the normalised reference, else 0."""
    responses = decode_responses(tokens, tokenizer, stop_ids)
    answers = decode_responses(reference_ids, tokenizer, ())
    return np.asarray([exact_match(r, a) for r, a in zip(responses, answers, strict=True)],
                      np.float32)


class Rollout:
    """`rollout(state, local_prompts) -> (training batch, metrics)`, both global jax.Arrays.

    Built once per run (the reward model, if any, is loaded here, frozen). With `epochs` > 1
    the same batch serves that many steps; the prompts the loader hands over meanwhile are
    not used."""

    def __init__(self, setup: Any, section: str, advantages: AdvantagesFn,
                 values: ValuesFn | None = None, tokenizer: Any = None, **defaults: Any):
        from lvlm_jax.train.stages.base import LossContext

        cfg = setup.cfg
        if cfg.data.kind != "prompt":
            raise ValueError(f"stage {cfg.stage!r} samples responses to prompts: it needs "
                             f"data.kind='prompt', got {cfg.data.kind!r}")
        opts = RolloutOptions.from_config(cfg, section, **defaults)
        if tokenizer is None:
            from lvlm_jax.train.input_pipeline import load_tokenizer

            tokenizer = load_tokenizer(cfg.data)
        self.tokenizer = tokenizer
        ctx = LossContext(model=setup.model, image_mean=tuple(cfg.data.image_mean),
                          image_std=tuple(cfg.data.image_std), loss_chunk=cfg.train.loss_chunk)
        self.reward_params, reward_ctx = None, None
        if opts.reward in ("model", "both"):
            reward_ctx, self.reward_params = load_reward_model(opts.reward_model, ctx,
                                                               setup.mesh, setup.rules)
        stop_ids = tuple(dict.fromkeys(
            [*end_of_turn_ids(cfg.data.template, tokenizer), tokenizer.eos_id]))
        self.spec = SampleSpec(ctx, opts, stop_ids, int(tokenizer.pad_id), setup.mesh, values,
                               reward_ctx)
        self.advantages = advantages
        self._cache: tuple[int, Any] | None = None

    def rollouts(self, state: Any, local: Mapping[str, np.ndarray]) -> dict[str, Array]:
        """Samples responses to this process's prompts under `state.params`: global arrays of
        `sample_and_score` plus "rule_reward" [b, 1]."""
        mesh = self.spec.mesh
        prompts = sharding.to_global({f: local[f] for f in PROMPT_FIELDS}, mesh)
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), _ROLLOUT_SALT)
        sampled = sample_and_score(state.params, state.reference, self.reward_params, prompts,
                                   rng, spec=self.spec)
        # Every host scores every row (cheap) and places its own shards of the result.
        n = sampled["response_mask"].shape[1]
        tokens = multihost_utils.process_allgather(sampled["input_ids"][:, -n:], tiled=True)
        refs = multihost_utils.process_allgather(sampled["reference_ids"], tiled=True)
        rule = rule_rewards(tokens, refs, self.tokenizer, self.spec.stop_ids)[:, None]
        sampled["rule_reward"] = jax.device_put(rule, sharding.batch_sharding(mesh, 2))
        return sampled

    def __call__(self, state: Any, local: Mapping[str, np.ndarray]
                 ) -> tuple[dict[str, Array], dict[str, Array]]:
        step = int(state.step)
        if self._cache is not None and 0 <= step - self._cache[0] < self.spec.opts.epochs:
            return self._cache[1]
        out = finish(self.rollouts(state, local), spec=self.spec, advantages=self.advantages)
        self._cache = (step, out)
        return out


def load_reward_model(workdir: str, ctx: LossContext, mesh: Any, rules: Any
                      ) -> tuple[LossContext, Any]:
    """(context with the reward model, its params sharded on `mesh`) of a `reward` stage run,
    loaded once and never trained. It must share the policy's tokenizer and image layout."""
    from lvlm_jax.checkpoints.export import read_model_config
    from lvlm_jax.checkpoints.manager import restore_params
    from lvlm_jax.models import build_model, dummy_inputs
    from lvlm_jax.train.stages import reward
    from lvlm_jax.train.stages.base import with_extra_params

    model_cfg = read_model_config(workdir)
    model = build_model(model_cfg, platform=sharding.mesh_platform(mesh))
    init = with_extra_params(lambda r: model.init(r, **dummy_inputs(model_cfg))["params"],
                             reward.STAGE, model_cfg)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = sharding.logical_shardings(abstract, mesh, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          flax.linen.unbox(abstract), shardings)
    params, _ = restore_params(workdir, target=target)  # read onto its shards, on every host
    params = lora.merge(params)
    if reward.HEAD not in params:
        raise ValueError(f"reward_model={workdir!r} has no {reward.HEAD!r} params: it is not a "
                         "run of the `reward` stage")
    params = jax.device_put(params, shardings)
    return dataclasses.replace(ctx, model=model), params


def stage_fields(extra: Sequence[str]) -> tuple[str, ...]:
    """The training batch of a rollout stage: the sampled sequences plus `extra` fields."""
    return ("input_ids", "segment_ids", "positions", "pixel_values", "response_mask",
            "old_log_probs", *extra)
