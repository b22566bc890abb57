"""The recipe configs in experiments/: every ARG builds, real sizes have their published parameter
counts (found abstractly), and every tiny variant takes a finite training step on CPU."""

import functools
import importlib.util
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training_utils import random_batches

from lvlm_jax import config as config_lib
from lvlm_jax.models import build_model, dummy_inputs, vlm_config
from lvlm_jax.param_paths import flat_paths
from lvlm_jax.train import loop, lora
from lvlm_jax.train.optimizer import check_patterns
from lvlm_jax.train.stages import STAGES, LossContext
from lvlm_jax.train.stages.base import model_inputs, prompt_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("llava15", "paligemma", "instructblip", "flamingo", "rlhf")


def module(name: str):
    spec = importlib.util.spec_from_file_location(f"_exp_{name}", f"{ROOT}/experiments/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ALL = [(f, a) for f in FILES for a in module(f).ARGS]
REAL = [(f, a) for f, a in ALL if a in module(f).PUBLISHED_PARAMS]
TINY = [(f, a) for f, a in ALL if a.startswith("tiny")]


def load(name: str, arg: str):
    return config_lib.load(f"{ROOT}/experiments/{name}.py:{arg}")


def needs_stage(cfg):
    if cfg.stage not in STAGES:  # being written by another helper: remove once registered
        pytest.skip(f"stage {cfg.stage!r} is not registered yet")


@functools.cache
def abstract_params(model_json: str, lora_json: str) -> dict:
    """Shapes of a model's params (plus LoRA adapters), by jax.eval_shape: nothing allocated."""
    cfg = vlm_config(json.loads(model_json))
    model = build_model(cfg)
    init = lambda rng: model.init(rng, **dummy_inputs(cfg, batch=1))["params"]  # noqa: E731
    lora_cfg = json.loads(lora_json)
    if lora_cfg.get("rank"):
        init = lora.init_with_adapters(init, lora_cfg)
    return flat_paths(nn.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0))))


def params_of(cfg) -> dict:
    return abstract_params(json.dumps(cfg.model.to_dict(), sort_keys=True),
                           json.dumps(cfg.lora.to_dict(), sort_keys=True))


@pytest.mark.parametrize("name, arg", ALL)
def test_every_config_and_arg_builds(name, arg):
    cfg = load(name, arg)
    model_cfg = vlm_config(cfg.model.to_dict())
    assert cfg.data.batch_size > 0 and cfg.data.seq_len > model_cfg.image_tokens
    assert module(name).__doc__.count("lvlm train --config=experiments/") >= 2
    with pytest.raises(ValueError, match=f"experiments/{name}.py"):
        load(name, "no_such_arg")


@pytest.mark.parametrize("name, arg", REAL)
def test_real_size_matches_the_published_parameter_count(name, arg):
    cfg = load(name, arg)
    shapes = params_of(cfg)
    base = sum(math.prod(x.shape) for p, x in shapes.items() if not p.startswith("lora/"))
    published = module(name).PUBLISHED_PARAMS[arg]
    assert abs(base - published) <= 0.03 * published, f"{base:,} vs published {published:,.0f}"
    # Freeze and multiplier regexes select real parameters of this model.
    check_patterns(_nested(shapes), cfg.optimizer.to_dict())


def _nested(flat: dict) -> dict:
    out: dict = {}
    for path, x in flat.items():
        *head, last = path.split("/")
        node = out
        for h in head:
            node = node.setdefault(h, {})
        node[last] = x
    return out


def test_llava15_7b_lora_adapters_have_peft_s_trainable_count():
    shapes = params_of(load("llava15", "7b_lora"))
    adapters = sum(math.prod(x.shape) for p, x in shapes.items()
                   if p.startswith("lora/") and p != "lora/alpha")
    # rank 128 on q, k, v, o (4096 -> 4096) and gate, up, down (4096 <-> 11008), 32 layers.
    assert adapters == 32 * 128 * (4 * (4096 + 4096) + 3 * (4096 + 11008)) == 319_815_680


def _one_step_batches(cfg, name):
    """(batches, model config, dataset size): the configured synthetic pipeline, except for
    Flamingo, whose loader input needs one <image> marker per image (the loader emits
    image_tokens copies, and a cross-attention model has none): random rows with one marker."""
    from lvlm_jax.train import input_pipeline

    if name != "flamingo":
        return input_pipeline.make_input(cfg)
    cfg.data.image_size = cfg.model.vision.image_size
    model_cfg = vlm_config(dict(cfg.model.to_dict(), image_token_id=5))
    return random_batches(cfg, image_tokens=1), model_cfg, None


@pytest.mark.parametrize("name, arg", TINY)
def test_tiny_variant_takes_a_finite_training_step(name, arg):
    cfg = load(name, arg)
    needs_stage(cfg)
    cfg.unlock()
    cfg.data.batch_size = 8
    cfg.train.update(total_steps=1, epochs=0.0, examples=0, progress=False)
    batches, model_cfg, size = _one_step_batches(cfg, name)
    setup = loop.build(cfg, model_cfg, size)
    _, history = loop.run_steps(setup, batches, 1)
    assert len(history) == 1 and np.isfinite(history[0]["loss"]), history


def test_prefix_lm_prompt_is_everything_before_the_first_supervised_token():
    cfg = vlm_config(load("paligemma", "tiny").model.to_dict())
    batch = {"input_ids": jnp.array([[9, 9, 7, 7, 7, 7, 0]]),
             "loss_mask": jnp.array([[0, 0, 0, 1, 1, 0, 0]], jnp.float32),
             "segment_ids": jnp.array([[1, 1, 1, 1, 1, 1, 0]])}
    np.testing.assert_array_equal(prompt_inputs(cfg, batch)["prefix_mask"],
                                  [[True, True, True, False, False, False, False]])


def test_paligemma_supervised_logits_do_not_see_later_tokens():
    cfg = load("paligemma", "tiny")
    cfg.data.image_size = cfg.model.vision.image_size
    model_cfg = vlm_config(dict(cfg.model.to_dict(), image_token_id=5))
    model = build_model(model_cfg)
    batch = next(random_batches(cfg, image_tokens=model_cfg.image_tokens))
    batch = {k: jnp.asarray(v[:2]) for k, v in batch.items()}
    params = model.init(jax.random.PRNGKey(0), **dummy_inputs(model_cfg))["params"]
    ctx = LossContext(model)
    run = lambda b: np.asarray(model.apply({"params": params}, **model_inputs(ctx, b))[0])  # noqa: E731
    first = int(np.argmax(np.asarray(batch["loss_mask"][0]) > 0))
    changed = dict(batch, input_ids=batch["input_ids"].at[0, first + 2].add(1))
    before, after = run(batch), run(changed)
    # Every position up to the changed token gives the same logits: no look-ahead.
    np.testing.assert_allclose(before[0, :first + 2], after[0, :first + 2], atol=1e-6)
    assert np.max(np.abs(before[0, first + 2:] - after[0, first + 2:])) > 1e-4


def test_instruction_is_the_prompt_text_left_aligned_without_image_tokens():
    cfg = vlm_config(dict(load("instructblip", "tiny").model.to_dict(), image_token_id=5))
    batch = {"input_ids": jnp.array([[1, 5, 5, 21, 22, 30, 31, 0]]),
             "loss_mask": jnp.array([[0, 0, 0, 0, 0, 1, 1, 0]], jnp.float32),
             "segment_ids": jnp.array([[1, 1, 1, 1, 1, 1, 1, 0]])}
    out = prompt_inputs(cfg, batch)
    assert out["instruction"].shape == (1, 8)  # max_instruction_len (64) cut to the row
    np.testing.assert_array_equal(out["instruction"][0, :3], [1, 21, 22])
    np.testing.assert_array_equal(out["instruction_mask"][0],
                                  [True, True, True] + [False] * 5)
    assert not np.any(out["instruction"][0, 3:])
