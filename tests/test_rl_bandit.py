"""PPO and GRPO on a two-armed bandit: one prompt, two answers ("yes" and "no") that the starting
policy samples about equally often, and a rule reward for "yes" only. Through the one loop
(real rollouts, the stage's advantages and loss, the optimizer), each stage must move the
policy to the rewarded answer within a few steps; a sign error in the advantages, a reward that
does not reach the loss, or advantages drowned in critic noise all fail here."""

import jax
import numpy as np
import pytest
from training_utils import demo_tokenizer_file, tiny_config

from data_pipelines.loader import make_dataset
from data_pipelines.templates import end_of_turn_ids, render
from data_pipelines.tokenizer import Tokenizer
from lvlm_jax.train import loop, rl_math
from lvlm_jax.train.stages.base import LossContext

QUESTION = "is there a red circle in the image?"
REWARDED, OTHER = "yes", "no"
TEMPLATE = "chatml"
SEQ = 48
RL_STEPS = 12


def bandit_config(stage: str, tokenizer_path: str, **kw):
    cfg = tiny_config(stage, batch=8, seq=SEQ, steps=RL_STEPS, **kw)
    cfg.model.language = {"preset": "tiny", "vocab_size": 384, "num_layers": 2}
    cfg.model.image_token_id = -1  # the tokenizer's
    cfg.data.template, cfg.data.tokenizer = TEMPLATE, tokenizer_path
    cfg.train.loss_chunk = 64
    return cfg


def records(n: int, kind: str) -> list[dict]:
    """One fixed image and question; sft answers alternate, prompts reward "yes" only."""
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    if kind == "prompt":
        return [{"id": str(i), "images": [image], "prompt": f"<image>\n{QUESTION}",
                 "reference": REWARDED} for i in range(n)]
    return [{"id": str(i), "images": [image], "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"},
        {"from": "gpt", "value": (REWARDED, OTHER)[i % 2]}]} for i in range(n)]


def batches(cfg, setup, tokenizer, kind: str):
    data = make_dataset(records(64, kind), kind=kind, tokenizer=tokenizer, template=TEMPLATE,
                        seq_len=SEQ, image_size=16, image_tokens=setup.model.cfg.image_tokens,
                        batch_size=cfg.data.batch_size, seed=0)
    return iter(data)


def answer_probabilities(setup, params, tokenizer) -> dict[str, float]:
    """p(answer, then the end of the turn | the prompt) under `params`, for both arms."""
    prompt, _ = render(TEMPLATE, [{"from": "human", "value": f"<image>\n{QUESTION}"}],
                       tokenizer, setup.model.cfg.image_tokens, add_generation_prompt=True)
    stop = end_of_turn_ids(TEMPLATE, tokenizer)[0]
    rows = [np.asarray([*tokenizer.encode(a), stop], np.int32) for a in (REWARDED, OTHER)]
    n = max(len(r) for r in rows)
    response = np.stack([np.pad(r, (0, n - len(r))) for r in rows])
    mask = np.stack([np.arange(n) < len(r) for r in rows]).astype(np.float32)
    prompts = np.repeat(np.asarray(prompt, np.int32)[None], 2, axis=0)
    seq = rl_math.sequence_inputs(prompts, np.ones_like(prompts), response, mask)
    image = records(1, "prompt")[0]["images"][0]
    ctx = LossContext(setup.model, (0.5,) * 3, (0.5,) * 3)
    pixels = ctx.pixels({"pixel_values": np.repeat(image[None, None], 2, axis=0)})
    logp, _ = jax.jit(lambda p: rl_math.response_log_probs(setup.model, p, seq, pixels, n, 64))(
        params)
    p = np.exp(np.sum(np.asarray(logp) * mask, axis=1))
    return {REWARDED: float(p[0]), OTHER: float(p[1])}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return demo_tokenizer_file(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def start(tokenizer_path):
    """A policy that answers the bandit's question "yes" or "no", about half each: sft on
    answers that alternate."""
    tokenizer = Tokenizer(tokenizer_path)
    cfg = bandit_config("sft", tokenizer_path, **{"optimizer.learning_rate": 3e-3})
    cfg.train.total_steps = 40
    setup = loop.build(cfg)
    loop.run_steps(setup, batches(cfg, setup, tokenizer, "conversation"), 40)
    params = jax.device_get(setup.state.params)
    probs = answer_probabilities(setup, params, tokenizer)
    assert 0.3 < probs[REWARDED] < 0.7 and 0.3 < probs[OTHER] < 0.7, probs
    return tokenizer, params, probs


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_rl_moves_a_two_armed_bandit_policy_to_the_rewarded_answer(stage, start,
                                                                   tokenizer_path):
    tokenizer, params, before = start
    cfg = bandit_config(stage, tokenizer_path, **{"optimizer.learning_rate": 1e-3})
    cfg.data.kind = "prompt"
    cfg[stage].max_new_tokens = 4
    setup = loop.build(cfg, init_params=params)
    _, history = loop.run_steps(setup, batches(cfg, setup, tokenizer, "prompt"), RL_STEPS)
    after = answer_probabilities(setup, jax.device_get(setup.state.params), tokenizer)
    assert after[REWARDED] > 0.9, (before, after)
    assert after[OTHER] < 0.1 * before[OTHER], (before, after)
    # The sampled reward the loop logs follows the policy.
    first, last = history[0]["reward"], np.mean([h["reward"] for h in history[-3:]])
    assert first < 0.8 < last, [h["reward"] for h in history]
