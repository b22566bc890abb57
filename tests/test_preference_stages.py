"""Preference stages: the DPO and Bradley-Terry losses equal their formulas, the frozen reference
never moves, preference pairs load from the synthetic set and from converted ArrayRecords, and
reward / DPO runs chain from another run and resume bitwise."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from training_utils import IMG, tiny_config

from data_pipelines.arrayrecord_source import ArrayRecordSource
from data_pipelines.convert import convert
from data_pipelines.loader import SyntheticSource, demo_tokenizer, make_dataset
from lvlm_jax.checkpoints.manager import Checkpointer, restore_params
from lvlm_jax.models import build_model, dummy_inputs, vlm_config
from lvlm_jax.param_paths import flat_paths
from lvlm_jax.train import loop
from lvlm_jax.train.stages import LossContext, dpo, reward
from lvlm_jax.train.stages.base import normalize_pixels, with_reference


# ---- the losses against plain forward passes ---------------------------------------------
class Tiny:
    """A tiny random model, its params, a perturbed copy of them, and jitted plain forwards."""

    def __init__(self, **model_overrides):
        self.model = build_model(vlm_config({**tiny_config().model.to_dict(), **model_overrides}))
        init = jax.jit(lambda rng: nn.meta.unbox(
            self.model.init(rng, **dummy_inputs(self.model.cfg))))
        self.params = jax.device_get(init(jax.random.PRNGKey(0))["params"])
        rng = np.random.default_rng(1)
        self.other = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, x.dtype),
                                  self.params)
        self.forward = {h: jax.jit(self._forward(h)) for h in (False, True)}

    def _forward(self, hidden):
        def forward(params, ids, pixels, seg, pos, prefix=None):
            pixels = normalize_pixels(pixels, (0.5,) * 3, (0.5,) * 3)
            return self.model.apply({"params": params}, ids, pixels, segment_ids=seg,
                                    positions=pos, prefix_mask=prefix, return_hidden=hidden)[0]
        return forward


@pytest.fixture(scope="module")
def tiny():
    return Tiny()


def hand_made_pairs():
    """Two pairs over a shared prompt (bos, 4 image tokens, 2 words); replies of different
    lengths, padded to 14 tokens."""
    prompt = [2, IMG, IMG, IMG, IMG, 40, 41]
    replies = {"chosen": [[50, 51, 52, 3], [60, 3]], "rejected": [[53, 54, 3], [61, 62, 63, 64, 3]]}
    t, batch = 14, {}
    for side, rows in replies.items():
        ids = np.zeros((2, t), np.int32)
        mask = np.zeros((2, t), np.float32)
        for i, reply in enumerate(rows):
            row = prompt + reply
            ids[i, :len(row)] = row
            mask[i, len(prompt) - 1:len(row) - 1] = 1  # predicts the reply tokens
        seg = (ids > 0).astype(np.int32)
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_targets"] = np.concatenate([ids[:, 1:], np.zeros((2, 1), np.int32)], 1)
        batch[f"{side}_loss_mask"] = mask
        batch[f"{side}_segment_ids"] = seg
        batch[f"{side}_positions"] = (np.arange(t)[None] * seg).astype(np.int32)
    rng = np.random.default_rng(0)
    batch["pixel_values"] = rng.integers(0, 256, (2, 1, 16, 16, 3), dtype=np.uint8)
    return batch


def plain_forward(tiny, params, batch, side, hidden=False, prefix=None):
    """One side alone, the images through the full model call: logits or final hidden states."""
    out = tiny.forward[hidden](params, batch[f"{side}_input_ids"], batch["pixel_values"],
                               batch[f"{side}_segment_ids"], batch[f"{side}_positions"], prefix)
    return np.asarray(out, np.float64)


def plain_log_probs(tiny, params, batch, side, prefix=None):
    logits = plain_forward(tiny, params, batch, side, prefix=prefix)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                           ) - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp, batch[f"{side}_targets"][..., None], -1)[..., 0]
    return (picked * batch[f"{side}_loss_mask"]).sum(-1)


def test_dpo_loss_equals_the_formula_with_log_probs_from_plain_forward_passes(tiny):
    model, policy, ref = tiny.model, tiny.params, tiny.other
    batch = hand_made_pairs()
    beta = 0.5
    pc, pr = (plain_log_probs(tiny, policy, batch, s) for s in ("chosen", "rejected"))
    rc, rr = (plain_log_probs(tiny, ref, batch, s) for s in ("chosen", "rejected"))
    logits = beta * ((pc - rc) - (pr - rr))
    expected = np.sum(np.log1p(np.exp(-logits)))  # -log sigmoid
    cfg = tiny_config(stage="dpo", **{"dpo.beta": beta})
    ctx = LossContext(model, loss_chunk=4, config=cfg)
    loss = jax.jit(lambda p, r, b: dpo.dpo_loss(with_reference(ctx, r), p, b, None))
    total, pairs, metrics = loss(policy, ref, batch)
    assert float(pairs) == 2.0
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["chosen_logp"]), pc.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rejected_logp"]), pr.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["chosen_reward"]), beta * (pc - rc).sum(),
                               rtol=1e-4)
    np.testing.assert_allclose(float(metrics["reward_margin"]), logits.sum(), rtol=1e-4)
    assert float(metrics["reward_accuracy"]) == float(np.sum(logits > 0))
    assert abs(logits).min() > 1e-3  # the reference really differs from the policy


def test_on_a_prefix_lm_the_prompt_is_the_prefix_of_both_responses():
    tiny = Tiny(prefix_lm=True)
    batch = hand_made_pairs()
    expected = {}
    for side in ("chosen", "rejected"):
        # The prefix, as for SFT (base.prompt_inputs): the tokens before the first position
        # with loss_mask 1 (bos, image, the first word; the second predicts the reply).
        prefix = (np.arange(14)[None] < 6) & (batch[f"{side}_segment_ids"] > 0)
        expected[side] = plain_log_probs(tiny, tiny.params, batch, side, prefix)
        all_prefix = plain_log_probs(tiny, tiny.params, batch, side)
        assert abs(all_prefix - expected[side]).max() > 1e-3  # the prefix matters
    ctx = LossContext(tiny.model, loss_chunk=4)
    loss = jax.jit(lambda p, r, b: dpo.dpo_loss(with_reference(ctx, r), p, b, None))
    _, _, metrics = loss(tiny.params, tiny.other, batch)
    np.testing.assert_allclose(float(metrics["chosen_logp"]), expected["chosen"].sum(),
                               rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rejected_logp"]), expected["rejected"].sum(),
                               rtol=1e-5)


def test_bradley_terry_loss_and_accuracy_on_hand_made_rewards():
    chosen = jnp.array([2.0, 0.0, -1.0, 5.0])
    rejected = jnp.array([1.0, 1.0, -1.0, -9.0])
    valid = jnp.array([True, True, True, False])  # the last pair is padding
    total, pairs, m = reward.bradley_terry(chosen, rejected, valid)
    expected = math.log1p(math.exp(-1)) + math.log1p(math.exp(1)) + math.log(2)
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    assert float(pairs) == 3.0
    assert float(m["reward_accuracy"]) == 1.0  # only 2 > 1; a tie is not a win
    assert float(m["reward_margin"]) == 0.0  # 1 - 1 + 0
    assert float(m["chosen_reward"]) == 1.0 and float(m["rejected_reward"]) == 1.0


def test_reward_is_the_head_on_the_last_real_token_of_each_response(tiny):
    model = tiny.model
    params = {**tiny.params, **reward.init_head(jax.random.PRNGKey(3), model.cfg)}
    batch = hand_made_pairs()
    head = params[reward.HEAD]
    rewards = {}
    for side in ("chosen", "rejected"):
        hidden = plain_forward(tiny, tiny.params, batch, side, hidden=True)
        last = batch[f"{side}_segment_ids"].sum(-1) - 1
        h = hidden[np.arange(2), last]
        rewards[side] = h @ np.asarray(head["kernel"])[:, 0] + float(head["bias"][0])
    ctx = LossContext(model, loss_chunk=4)
    total, pairs, m = jax.jit(lambda p, b: reward.reward_loss(ctx, p, b, None))(params, batch)
    margin = rewards["chosen"] - rewards["rejected"]
    np.testing.assert_allclose(float(total), np.sum(np.log1p(np.exp(-margin))), rtol=1e-5)
    np.testing.assert_allclose(float(m["chosen_reward"]), rewards["chosen"].sum(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(float(m["rejected_reward"]), rewards["rejected"].sum(),
                               rtol=1e-5, atol=1e-6)
    assert float(pairs) == 2.0


# ---- preference data ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


def pairs_of(source, tokenizer, n):
    ds = make_dataset(source, kind="preference", tokenizer=tokenizer, template="vicuna_v1",
                      seq_len=160, image_size=16, image_tokens=4, batch_size=n, seed=0,
                      shuffle=False, num_epochs=1)
    return next(iter(ds))


def test_preference_pairs_share_the_prompt_and_mask_only_the_responses(tokenizer):
    source = SyntheticSource("preference", 4, image_size=16)
    batch = pairs_of(source, tokenizer, 4)
    for i in range(4):
        record = source[i]
        n_c, n_r = (int(batch[f"{s}_segment_ids"][i].sum()) for s in ("chosen", "rejected"))
        # The rows agree up to the start of the replies (the prompt and its image).
        start = int(np.argmax(batch["chosen_loss_mask"][i]))
        assert start == int(np.argmax(batch["rejected_loss_mask"][i]))
        assert np.array_equal(batch["chosen_input_ids"][i, :start + 1],
                              batch["rejected_input_ids"][i, :start + 1])
        assert np.count_nonzero(batch["chosen_input_ids"][i, :start] == tokenizer.image_id) == 4
        for side, n in (("chosen", n_c), ("rejected", n_r)):
            mask = batch[f"{side}_loss_mask"][i] > 0
            assert np.flatnonzero(mask).max() == n - 2  # up to the eos, nothing after
            text = tokenizer.decode(batch[f"{side}_targets"][i][mask])
            assert text == record[side]
            assert batch[f"{side}_targets"][i][mask][-1] == tokenizer.eos_id
        assert n_r > n_c  # the rejected answer names one more (absent) object
    assert batch["pixel_values"].shape == (4, 1, 16, 16, 3)
    assert batch["pixel_values"].any()


def test_converted_preference_records_load_like_the_synthetic_ones(tokenizer, tmp_path):
    source = SyntheticSource("preference", 3, image_size=16)
    records = []
    for i in range(3):
        r = source[i]
        Image.fromarray(r["images"][0]).save(tmp_path / f"{i}.png")
        records.append({"id": r["id"], "images": [f"{i}.png"], "prompt": r["prompt"],
                        "chosen": r["chosen"], "rejected": r["rejected"]})
    (tmp_path / "prefs.json").write_text(json.dumps(records))
    report = convert("preferences", tmp_path / "prefs.json", tmp_path, tmp_path / "out",
                     workers=1, verbose=False)
    assert report.converted == 3
    converted = ArrayRecordSource(tmp_path / "out")
    assert converted.kind == "preference"
    a, b = pairs_of(source, tokenizer, 3), pairs_of(converted, tokenizer, 3)
    assert a.keys() == b.keys() and len(a) == 11
    for name in a:
        assert np.array_equal(a[name], b[name]), name


# ---- runs through loop.train: chaining, the frozen reference, resume ---------------------
def pref_config(stage, steps, **kw):
    return tiny_config(stage=stage, batch=8, seq=40, steps=steps, **{
        "model.language": {"preset": "tiny", "vocab_size": 384, "num_layers": 2},
        "model.image_token_id": -1, "data.kind": "preference", "data.template": "plain",
        "data.num_examples": 256, "optimizer.schedule": "constant",
        "checkpoint.every_steps": 2, **kw})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    loop.train(pref_config("pretrain", 2, **{"data.kind": "caption"}), workdir, log=lambda m: 0)
    return workdir


@pytest.fixture(scope="module")
def dpo_run(pretrained, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dpo"))
    setup, history = loop.train(pref_config("dpo", 4, **{"checkpoint.init_from": pretrained}),
                                workdir, log=lambda m: 0)
    return workdir, setup, history


def test_dpo_sft_weight_adds_the_chosen_per_token_nll_to_the_formula(tiny):
    model, policy, ref = tiny.model, tiny.params, tiny.other
    batch = hand_made_pairs()
    beta, weight = 0.5, 0.3
    pc, pr = (plain_log_probs(tiny, policy, batch, s) for s in ("chosen", "rejected"))
    rc, rr = (plain_log_probs(tiny, ref, batch, s) for s in ("chosen", "rejected"))
    logits = beta * ((pc - rc) - (pr - rr))
    chosen_tokens = batch["chosen_loss_mask"].sum(-1)  # 4 and 2 reply tokens
    assert chosen_tokens.tolist() == [4.0, 2.0]
    nll = -pc / chosen_tokens
    expected = np.sum(np.log1p(np.exp(-logits)) + weight * nll)
    cfg = tiny_config(stage="dpo", **{"dpo.beta": beta, "dpo.sft_weight": weight})
    ctx = LossContext(model, loss_chunk=4, config=cfg)
    loss = jax.jit(lambda p, r, b: dpo.dpo_loss(with_reference(ctx, r), p, b, None))
    total, pairs, metrics = loss(policy, ref, batch)
    assert float(pairs) == 2.0
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["chosen_nll"]), nll.sum(), rtol=1e-5)
    assert weight * nll.sum() > 1e-2 * expected  # the term is not negligible here


def test_dpo_reference_is_the_starting_policy_bitwise_and_never_changes(pretrained, dpo_run):
    _, setup, history = dpo_run
    assert len(history) == 4
    start = flat_paths(restore_params(pretrained)[0])
    reference = flat_paths(jax.device_get(setup.state.reference))
    policy = flat_paths(jax.device_get(setup.state.params))
    assert reference.keys() == start.keys() == policy.keys()
    for path, value in start.items():
        assert reference[path].tobytes() == np.asarray(value).tobytes(), path
    assert not np.array_equal(policy["decoder/embed_tokens/embedding"],
                              reference["decoder/embed_tokens/embedding"])
    # Sharded like the policy, and no optimizer state of its own.
    ref_shardings = jax.tree.map(lambda x: x.sharding, setup.state.reference)
    assert ref_shardings == jax.tree.map(lambda x: x.sharding, setup.state.params)
    n_opt = len(jax.tree.leaves(setup.state.opt_state))
    sft = loop.plan(pref_config("sft", 1, **{"optimizer.freeze": [r"vision/.*"]}))
    assert n_opt == len(jax.tree.leaves(sft.abstract_state.opt_state))


def test_dpo_starts_at_log_2_and_its_loss_falls(dpo_run):
    _, _, history = dpo_run
    # Policy == reference at step 0: loss log(2) up to float32 rounding of the two forward
    # passes (the differentiated one may fuse differently), margin 0.
    assert abs(history[0]["loss"] - math.log(2)) < 1e-6
    assert abs(history[0]["reward_margin"]) < 1e-5
    assert history[-1]["loss"] < 0.5 * math.log(2)
    assert history[-1]["reward_accuracy"] == 1.0
    assert history[-1]["chosen_reward"] > history[-1]["rejected_reward"]


def test_dpo_resume_is_bitwise_identical_to_an_uninterrupted_run(pretrained, dpo_run,
                                                                  tmp_path):
    _, straight_setup, straight = dpo_run

    def cfg(steps):
        return pref_config("dpo", steps, **{"checkpoint.init_from": pretrained})

    loop.train(cfg(2), str(tmp_path), log=lambda m: 0)  # stops (as if preempted) at step 2
    messages = []
    setup, history = loop.train(cfg(4), str(tmp_path), log=messages.append)
    assert any(m.startswith("resumed from") for m in messages)
    assert [h["loss"] for h in history] == [h["loss"] for h in straight[2:]]
    final, expected = jax.device_get(setup.state), jax.device_get(straight_setup.state)
    assert int(final.step) == int(expected.step) == 4
    for name in ("params", "reference", "opt_state"):
        a, b = flat_paths(getattr(final, name)), flat_paths(getattr(expected, name))
        assert a.keys() == b.keys()
        for path in a:
            assert np.asarray(a[path]).tobytes() == np.asarray(b[path]).tobytes(), (name, path)


def test_lora_dpo_keeps_only_the_base_weights_that_train_as_its_reference(pretrained, tmp_path):
    # The projector trains in full beside the adapters: the state keeps its starting values for
    # the reference, and nothing else (the rest of the reference is the policy's frozen base).
    cfg = pref_config("dpo", 2, **{"checkpoint.init_from": pretrained, "lora.rank": 4,
                                   "lora.alpha": 8.0, "lora.trainable": (r"connector/.*",)})
    setup, history = loop.train(cfg, str(tmp_path), log=lambda m: 0)
    start = flat_paths(restore_params(pretrained)[0])
    reference = flat_paths(jax.device_get(setup.state.reference))
    policy = flat_paths(jax.device_get(setup.state.params))
    assert sorted(reference) == sorted(p for p in start if p.startswith("connector/"))
    for path, value in reference.items():
        assert value.tobytes() == np.asarray(start[path]).tobytes(), path
        assert not np.array_equal(policy[path], value), path  # the policy's projector moved
    # Policy == reference at step 0 (B = 0): DPO's log 2, margin 0.
    assert abs(history[0]["loss"] - math.log(2)) < 1e-6
    assert abs(history[0]["reward_margin"]) < 1e-5
    # The checkpoint holds that small reference and restores the state bit for bit.
    ckpt = Checkpointer(str(tmp_path))
    restored, step = ckpt.restore(setup.abstract_state)
    ckpt.close()
    assert step == 2
    final = jax.device_get(setup.state)
    for name in ("params", "reference", "opt_state"):
        a, b = flat_paths(jax.device_get(getattr(restored, name))), flat_paths(getattr(final, name))
        assert a.keys() == b.keys()
        for path in a:
            assert np.asarray(a[path]).tobytes() == np.asarray(b[path]).tobytes(), (name, path)


def test_reward_model_trains_from_a_pretrain_run_with_its_new_head(pretrained, tmp_path):
    messages = []
    setup, history = loop.train(
        pref_config("reward", 4, **{"checkpoint.init_from": pretrained}), str(tmp_path),
        log=messages.append)
    assert any("missing 2 (reward_head/bias, reward_head/kernel), unexpected 0" in m
               for m in messages)
    assert setup.state.reference is None
    saved = flat_paths(restore_params(str(tmp_path))[0])
    start = flat_paths(restore_params(pretrained)[0])
    assert saved["reward_head/kernel"].shape == (setup.model.cfg.language.embed_dim, 1)
    # The head and the LM train; the vision tower (frozen by default) is the pretrain run's.
    assert not np.array_equal(saved["decoder/embed_tokens/embedding"],
                              start["decoder/embed_tokens/embedding"])
    vision = [p for p in start if p.startswith("vision/")]
    assert vision and all(saved[p].tobytes() == np.asarray(start[p]).tobytes() for p in vision)
    assert all(np.isfinite(h["loss"]) for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert 0.0 <= history[-1]["reward_accuracy"] <= 1.0
