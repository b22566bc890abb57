"""PPO and GRPO: GAE, the clipped losses, KL estimates and group advantages against hand
computations; prompts load left-padded; the rule reward is exact match of the decoded response;
rollouts' log-probs equal the generator's; a few steps through the one loop keep the reference
bitwise and give finite metrics."""

import copy
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training_utils import demo_tokenizer_file, tiny_config

from data_pipelines.loader import SyntheticSource, encode_prompt
from data_pipelines.synthetic import SyntheticShapes
from data_pipelines.templates import render
from lvlm_jax import sharding
from lvlm_jax.evals.answers import exact_match
from lvlm_jax.models import build_model, dummy_inputs, vlm_config
from lvlm_jax.train import input_pipeline, loop, rl_math
from lvlm_jax.train import rollout as rollout_lib
from lvlm_jax.train.rollout import decode_responses, finish, rule_rewards
from lvlm_jax.train.stages import LossContext, get_stage, grpo, ppo, reward
from lvlm_jax.train.stages.base import extra_param_keys, normalize_pixels

N_NEW = 5  # response tokens sampled per prompt in the loop tests


# ---- the arithmetic by hand -------------------------------------------------------------
def test_gae_equals_a_python_loop_on_random_values_with_masks():
    rng = np.random.default_rng(0)
    b, n, gamma, lam = 5, 7, 0.9, 0.8
    rewards, values = rng.normal(size=(b, n)), rng.normal(size=(b, n))
    lengths = [7, 3, 1, 0, 5]
    mask = (np.arange(n)[None] < np.array(lengths)[:, None]).astype(np.float32)
    adv, ret = rl_math.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                           jnp.asarray(mask), gamma, lam)
    expected = np.zeros((b, n))
    for i, length in enumerate(lengths):
        running = 0.0
        for t in reversed(range(length)):
            next_value = values[i, t + 1] if t + 1 < length else 0.0
            running = rewards[i, t] + gamma * next_value - values[i, t] + gamma * lam * running
            expected[i, t] = running
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, (expected + values) * mask, rtol=1e-5, atol=1e-6)


def test_ppo_policy_loss_clips_hand_made_ratios():
    ratios = np.array([[0.5, 0.9, 1.0, 1.1, 1.5, 1.5, 0.5, 3.0]])
    adv = np.array([[1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 1, 0]], np.float32)  # the last token is past the end
    old = np.random.default_rng(1).normal(size=ratios.shape) - 2.0
    loss, clipped = rl_math.ppo_policy_loss(jnp.asarray(np.log(ratios) + old, jnp.float32),
                                            jnp.asarray(old, jnp.float32),
                                            jnp.asarray(adv, jnp.float32), mask, 0.2)
    # max(-A r, -A clip(r)): -0.5, -0.9, -1.0, 1.1, -1.2 (clipped), 1.5, 0.8 (clipped)
    np.testing.assert_allclose(loss, (-0.5 - 0.9 - 1.0 + 1.1 - 1.2 + 1.5 + 0.8) / 7, rtol=1e-5)
    np.testing.assert_allclose(clipped, 2 / 7, rtol=1e-6)


def test_ppo_value_loss_clips_hand_made_values():
    values, old = jnp.array([[1.0, 3.0, -2.0]]), jnp.array([[0.5, 0.5, 0.0]])
    returns = jnp.array([[2.0, 1.0, 0.0]])
    loss, clipped = rl_math.ppo_value_loss(values, old, returns, jnp.ones((1, 3)), 0.2)
    # clipped values 0.7, 0.7, -0.2: max squared errors 1.69 (clipped), 4, 4
    np.testing.assert_allclose(loss, 0.5 * (1.69 + 4 + 4) / 3, rtol=1e-5)
    np.testing.assert_allclose(clipped, 1 / 3, rtol=1e-6)


def test_kl_estimates_on_hand_made_probabilities():
    logp, ref = jnp.log(jnp.array([0.5, 0.3])), jnp.log(jnp.array([0.25, 0.3]))
    np.testing.assert_allclose(rl_math.kl_k1(logp, ref), [math.log(2), 0.0], atol=1e-6)
    # k3 = exp(r) - r - 1 with r = log(ref / p) = log(0.5)
    np.testing.assert_allclose(rl_math.kl_k3(logp, ref), [0.5 + math.log(2) - 1, 0.0],
                               atol=1e-6)


def test_grpo_advantages_normalise_each_group_and_cover_only_response_tokens():
    rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    lengths = np.array([3, 1, 2, 3, 3, 3, 3, 3])
    mask = (np.arange(3)[None] < lengths[:, None]).astype(np.float32)
    adv = np.asarray(rl_math.grpo_advantages(rewards, mask, group_size=4))
    # group 1: mean 0.5, std 0.5; group 2: all equal -> 0
    expected = np.array([1, -1, -1, 1, 0, 0, 0, 0], np.float64)[:, None] * mask
    np.testing.assert_allclose(adv, expected, atol=1e-5)
    with pytest.raises(ValueError, match="groups of 3"):
        rl_math.grpo_advantages(rewards, mask, group_size=3)


def test_kl_penalty_is_on_every_token_and_the_score_on_the_last():
    logp = jnp.full((2, 4), -1.0)
    ref = jnp.full((2, 4), -1.5)  # log-ratio 0.5 everywhere
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]], jnp.float32)
    rewards = ppo.kl_penalised_rewards(jnp.array([1.0, 2.0]), logp, ref, mask, kl_coef=0.1)
    np.testing.assert_allclose(rewards, [[-0.05, -0.05, 0.95, 0.0], [1.95, 0.0, 0.0, 0.0]],
                               atol=1e-6)


# ---- prompts, log-probs and the rule reward ----------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return demo_tokenizer_file(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    from data_pipelines.tokenizer import Tokenizer

    return Tokenizer(tokenizer_path)


def test_synthetic_prompts_are_left_padded_with_the_vqa_answer_as_reference(tokenizer):
    source = SyntheticSource("prompt", 4, image_size=16)
    record, vqa = source[2], SyntheticShapes(image_size=16).vqa(2)
    assert record["prompt"] == "<image>\n" + vqa["question"]
    out = encode_prompt(record, tokenizer=tokenizer, template="chatml", seq_len=64,
                        image_size=16, image_tokens=4)
    ids, _ = render("chatml", [{"from": "human", "value": record["prompt"]}], tokenizer, 4,
                    add_generation_prompt=True)
    np.testing.assert_array_equal(out["prompt_ids"][64 - len(ids):], ids)
    assert (out["prompt_ids"][:64 - len(ids)] == tokenizer.pad_id).all()
    np.testing.assert_array_equal(out["prompt_segment_ids"], np.arange(64) >= 64 - len(ids))
    assert decode_responses(out["reference_ids"][None], tokenizer, ()) == [vqa["answer"]]
    assert out["pixel_values"].shape == (1, 16, 16, 3) and out["pixel_values"].any()


def test_rule_reward_is_exact_match_of_the_normalised_response_up_to_its_stop(tokenizer):
    eos, enc = tokenizer.eos_id, tokenizer.encode
    answers = ["red circle", "2", "yes", "red circle"]
    rows = [enc("Red circle.") + [eos] + enc("blue"),  # case, punctuation; text after the stop
            enc("3") + [eos],
            enc("the yes"),  # an article, and no stop token at all
            enc("red") + [tokenizer.vocab_size + 3] + enc("circle")]  # beyond the tokenizer
    width = max(len(r) for r in rows)
    tokens = np.array([r + [tokenizer.pad_id] * (width - len(r)) for r in rows], np.int32)
    refs = np.zeros((4, 8), np.int32)
    for i, a in enumerate(answers):
        refs[i, :len(enc(a))] = enc(a)
    np.testing.assert_array_equal(rule_rewards(tokens, refs, tokenizer, (eos,)), [1, 0, 1, 0])


def test_response_log_probs_equal_log_softmax_of_a_plain_forward_at_the_temperature():
    cfg = tiny_config()
    model = build_model(vlm_config(cfg.model.to_dict()))
    params = jax.jit(lambda r: nn.meta.unbox(model.init(r, **dummy_inputs(model.cfg))))(
        jax.random.PRNGKey(0))["params"]
    rng = np.random.default_rng(0)
    prompt_ids = rng.integers(8, 128, (2, 9)).astype(np.int32)
    prompt_ids[:, 3:7] = 5  # the image block
    prompt_seg = np.ones((2, 9), np.int32)
    prompt_seg[1, :2] = 0  # row 1 is left-padded
    response = rng.integers(8, 128, (2, 4)).astype(np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32)
    seq = rl_math.sequence_inputs(prompt_ids, prompt_seg, response, mask)
    pixels = normalize_pixels(rng.integers(0, 256, (2, 1, 16, 16, 3), dtype=np.uint8),
                              (0.5,) * 3, (0.5,) * 3)
    logits, _ = jax.jit(lambda p: model.apply(
        {"params": p}, seq["input_ids"], pixels, segment_ids=seq["segment_ids"],
        positions=seq["positions"]))(params)
    for temperature in (1.0, 1.5, 0.5):  # the policy that samples at T: softmax(logits / T)
        logp, hidden = jax.jit(lambda p, t=temperature: rl_math.response_log_probs(
            model, p, seq, pixels, 4, 2, t))(params)
        full = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32) / temperature),
                          np.float64)
        expected = np.take_along_axis(full[:, 8:12], response[..., None], -1)[..., 0]
        np.testing.assert_allclose(np.asarray(logp) * mask, expected * mask, atol=1e-4)
        assert hidden.shape == (2, 4, model.cfg.language.embed_dim)
    assert not np.allclose(np.asarray(logp) * mask, 0.0)


# ---- a few steps through the one loop -------------------------------------------------------
def rl_config(stage, tokenizer_path, steps=3, **kw):
    cfg = tiny_config(stage, batch=8, seq=48, steps=steps, **kw)
    cfg.model.language = {"preset": "tiny", "vocab_size": 384, "num_layers": 2}
    cfg.model.image_token_id = -1  # the tokenizer's
    cfg.data.kind, cfg.data.template, cfg.data.tokenizer = "prompt", "chatml", tokenizer_path
    cfg.data.num_examples, cfg.data.shuffle = 64, False
    cfg.train.loss_chunk = 64  # the response is short: one chunk
    cfg[stage].max_new_tokens = N_NEW
    return cfg


def start_params(setup):
    """The params the run started from: its init is deterministic (and already compiled)."""
    return jax.device_get(setup.init_state(int(setup.cfg.seed)).params)


def assert_bitwise(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.fixture(scope="module")
def ppo_run(tokenizer_path, tmp_path_factory):
    cfg = rl_config("ppo", tokenizer_path, **{"ppo.epochs": 2})
    # A random policy never answers a question exactly: every reward would be 0, every
    # advantage 0 and no step would change anything. A reward for responses whose first token
    # is even gives these steps a signal.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rollout_lib, "rule_rewards",
                      lambda tokens, *_: (np.asarray(tokens)[:, 0] % 2 == 0).astype(np.float32))
        setup, history = loop.train(cfg, str(tmp_path_factory.mktemp("ppo")),
                                    log=lambda m: None)
    return cfg, setup, history


def test_ppo_steps_through_the_loop_have_finite_metrics_and_reuse_each_rollout(ppo_run):
    cfg, setup, history = ppo_run
    assert len(history) == 3 and int(setup.state.step) == 3
    for record in history:
        for key in ("loss", "reward", "kl_ref", "clip_fraction", "response_length",
                    "value_loss", "approx_kl", "grad_norm"):
            assert math.isfinite(record[key]), (key, record)
        assert 1 <= record["response_length"] <= N_NEW
        assert record["tokens"] == record["response_length"] * cfg.data.batch_size
    # epochs=2: step 2 trains again on step 1's rollout, by then off-policy
    assert history[1]["reward"] == history[0]["reward"]
    assert history[1]["kl_ref"] == history[0]["kl_ref"]
    assert history[0]["approx_kl"] < 1e-6 < history[1]["approx_kl"]
    assert history[0]["clip_fraction"] == 0.0  # on-policy: every ratio is 1


def test_ppo_never_changes_the_reference_and_trains_the_policy_and_value_head(ppo_run):
    _, setup, _ = ppo_run
    start = start_params(setup)
    assert_bitwise(jax.device_get(setup.state.reference), start)
    now = jax.device_get(setup.state.params)
    for part in ("decoder", ppo.HEAD):
        assert any(not np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(now[part]), jax.tree.leaves(start[part]), strict=True))


def test_ppo_started_from_a_params_tree_without_a_value_head_gets_a_fresh_one(ppo_run):
    # The demo chains sft -> dpo -> ppo through init_params: the sft params have no value head.
    cfg, setup, _ = ppo_run
    start = start_params(setup)
    policy = {k: v for k, v in start.items() if k != ppo.HEAD}
    assert extra_param_keys(get_stage("ppo"), setup.model.cfg) == {ppo.HEAD}
    assert extra_param_keys(get_stage("sft"), setup.model.cfg) == set()
    again = loop.materialize(setup, init_params=policy)
    now = jax.device_get(again.state.params)
    assert_bitwise(now, start)  # the policy as given, the head as the seed initialises it
    assert_bitwise(jax.device_get(again.state.reference), start)


@pytest.mark.parametrize("to_trunk", [False, True])
def test_ppo_value_loss_trains_only_the_value_head_unless_asked(ppo_run, to_trunk):
    # A fresh head values every state at 0; with zero advantages only the value loss is left,
    # and by default its gradient stops at the head (the critic's error must not move the
    # policy).
    cfg, setup, _ = ppo_run
    assert not np.any(start_params(setup)[ppo.HEAD]["kernel"])
    cfg = copy.deepcopy(cfg)
    cfg.ppo.value_grad_to_trunk = to_trunk
    batches, _, _ = input_pipeline.make_input(cfg)
    rollout = ppo.make_rollout(setup)
    with loop.mesh_context(setup.mesh), nn.logical_axis_rules(sharding.flax_rules(setup.rules)):
        batch, _ = rollout(setup.state, next(batches))
        batch = {**jax.device_get(batch), "advantages": np.zeros_like(batch["advantages"]),
                 "returns": np.ones_like(batch["returns"]) * batch["response_mask"]}
        ctx = dataclasses.replace(rollout.spec.ctx, config=cfg)
        params = jax.device_get(setup.state.params)
        # A head that has learned something: through a zero kernel no gradient reaches the trunk
        params[ppo.HEAD]["kernel"] = np.full_like(params[ppo.HEAD]["kernel"], 0.1)
        grads = jax.device_get(jax.jit(jax.grad(
            lambda p: ppo.ppo_loss(ctx, p, batch, None)[0]))(params))
    assert np.any(grads[ppo.HEAD]["kernel"]) and np.any(grads[ppo.HEAD]["bias"])
    trunk = [np.any(g) for g in jax.tree.leaves(grads["decoder"])]
    assert any(trunk) == to_trunk


def test_ppo_rollout_rewards_are_exact_match_and_its_log_probs_the_generators(ppo_run,
                                                                              tokenizer):
    cfg, setup, _ = ppo_run
    batches, _, _ = input_pipeline.make_input(cfg)
    local = next(batches)  # records 0..7 (no shuffle)
    rollout = ppo.make_rollout(setup)
    with loop.mesh_context(setup.mesh), nn.logical_axis_rules(sharding.flax_rules(setup.rules)):
        sampled = jax.device_get(rollout.rollouts(setup.state, local))
    answers = [SyntheticShapes(image_size=16).vqa(i)["answer"] for i in range(8)]
    mask, tokens = sampled["response_mask"], sampled["input_ids"][:, -N_NEW:]
    texts = []
    for row, m in zip(tokens, mask, strict=True):
        kept = [int(t) for t in row[: int(m.sum())] if int(t) not in rollout.spec.stop_ids]
        texts.append(tokenizer.decode(kept).strip())
    expected = [exact_match(t, a) for t, a in zip(texts, answers, strict=True)]
    np.testing.assert_array_equal(sampled["rule_reward"][:, 0], expected)
    # the full forward over prompt + response equals the KV-cache decode
    np.testing.assert_allclose(sampled["old_log_probs"] * mask,
                               sampled["sample_log_probs"] * mask, atol=2e-4)
    # a response ends at its first stop token or at max_new_tokens
    lengths = mask.sum(1).astype(int)
    for row, n in zip(tokens, lengths, strict=True):
        stops = [i for i, t in enumerate(row) if int(t) in rollout.spec.stop_ids]
        assert n == (stops[0] + 1 if stops else N_NEW)


def test_ppo_model_reward_scores_rollouts_with_the_frozen_reward_run(ppo_run, tmp_path):
    """A reward run's checkpoint (here: the policy's trunk with a reward head) scores each
    sampled sequence at its last token; with reward="both" the score adds the rule reward."""
    from lvlm_jax.checkpoints.export import write_model_config
    from lvlm_jax.checkpoints.manager import Checkpointer

    cfg, setup, _ = ppo_run
    params = jax.device_get(setup.state.params)
    rm_params = {**{k: v for k, v in params.items() if k != ppo.HEAD},
                 reward.HEAD: params[ppo.HEAD]}
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, {"params": rm_params})
    ckpt.close()
    write_model_config(setup.model.cfg, str(tmp_path))
    both = copy.deepcopy(cfg)
    both.ppo.reward, both.ppo.reward_model = "both", str(tmp_path)
    rollout = ppo.make_rollout(dataclasses.replace(setup, cfg=both))
    batches, _, _ = input_pipeline.make_input(cfg)
    with loop.mesh_context(setup.mesh), nn.logical_axis_rules(sharding.flax_rules(setup.rules)):
        sampled = rollout.rollouts(setup.state, next(batches))
        _, metrics = finish(sampled, spec=rollout.spec, advantages=rollout.advantages)
    sampled = jax.device_get(sampled)
    ctx = LossContext(model=setup.model)
    expected = jax.jit(lambda p, b: reward.score(ctx, p, b))(rm_params, {
        k: sampled[k] for k in ("input_ids", "segment_ids", "positions", "pixel_values")})
    np.testing.assert_allclose(sampled["model_reward"][:, 0], expected, atol=1e-5)
    np.testing.assert_allclose(
        metrics["reward"], np.mean(sampled["model_reward"] + sampled["rule_reward"]), atol=1e-5)
    with pytest.raises(ValueError, match="needs ppo.reward_model"):
        both.ppo.reward_model = ""
        ppo.make_rollout(dataclasses.replace(setup, cfg=both))


def test_grpo_steps_through_the_loop_keep_the_reference_and_sample_groups(tokenizer_path,
                                                                          tmp_path_factory):
    # Sampled at 1.5: the rollout's log-probs and the loss's both score softmax(logits / 1.5)
    cfg = rl_config("grpo", tokenizer_path, steps=2,
                    **{"grpo.group_size": 2, "grpo.temperature": 1.5})
    setup, history = loop.train(cfg, str(tmp_path_factory.mktemp("grpo")), log=lambda m: None)
    assert len(history) == 2
    for record in history:
        for key in ("loss", "reward", "kl", "kl_ref", "clip_fraction", "response_length",
                    "reward_std_in_group"):
            assert math.isfinite(record[key]), (key, record)
        # 8 prompts x 2 samples
        assert record["tokens"] == record["response_length"] * 16
    assert history[0]["kl"] < 1e-6  # the policy starts as the reference
    assert history[0]["clip_fraction"] == 0.0  # on-policy at the sampling temperature
    assert_bitwise(jax.device_get(setup.state.reference), start_params(setup))


def test_lora_rollout_samples_with_the_adapters_and_scores_the_reference_without_them(
        tokenizer_path):
    cfg = rl_config("grpo", tokenizer_path, **{"grpo.group_size": 2, "lora.rank": 4,
                                               "lora.alpha": 8.0})
    setup = loop.build(cfg)
    assert setup.state.reference is None  # no copy of the model: the reference is the base
    # Adapters that have trained (a fresh B is zero: the policy would be the base).
    rng = np.random.default_rng(0)
    params = jax.device_get(setup.state.params)
    params["lora"] = jax.tree.map(
        lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype) if x.ndim else x,
        params["lora"])
    state = setup.state.replace(params=jax.device_put(params, setup.state_shardings.params))
    batches, _, _ = input_pipeline.make_input(cfg)
    rollout = grpo.make_rollout(setup)
    with loop.mesh_context(setup.mesh), nn.logical_axis_rules(sharding.flax_rules(setup.rules)):
        sampled = jax.device_get(rollout.rollouts(state, next(batches)))
    mask = sampled["response_mask"]
    # Sampled with the adapters merged, scored with them unmerged: the same policy.
    np.testing.assert_allclose(sampled["old_log_probs"] * mask,
                               sampled["sample_log_probs"] * mask, atol=2e-4)
    # The reference log-probs are the base model's, without adapters.
    base = {k: v for k, v in params.items() if k != "lora"}
    seq = {k: sampled[k] for k in ("input_ids", "segment_ids", "positions")}
    pixels = normalize_pixels(sampled["pixel_values"], cfg.data.image_mean, cfg.data.image_std)
    ref, _ = jax.jit(lambda p: rl_math.response_log_probs(setup.model, p, seq, pixels, N_NEW,
                                                          cfg.train.loss_chunk))(base)
    np.testing.assert_allclose(sampled["ref_log_probs"] * mask, np.asarray(ref) * mask,
                               atol=1e-5)
    assert np.abs((sampled["old_log_probs"] - sampled["ref_log_probs"]) * mask).max() > 1e-2
