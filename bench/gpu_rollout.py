"""GPU RL rollout benchmark: PPO/GRPO's sampling phase on the ~1B LVLM of bench/gpu_train.py
(SigLIP-B/16 + a Llama-style ~1B decoder, bf16): a batch of 64 image prompts, 256 new tokens
sampled at temperature 1 with the KV-cache generator, then the policy's and the reference's
log-probs of the responses (one forward each), as `train/rollout.py` does before every step.

    python bench/gpu_rollout.py                 # the H100 run: batch 64, 256 new tokens
    python bench/gpu_rollout.py --tiny          # the same script at a CPU-sized shape

Prints sampled tokens/s (generation alone) and rollout tokens/s (generation + scoring), for our
default scanned decoder beside the unscanned one (the layout choice `chat.load` makes on CPU),
with their ratio. Every row samples the same tokens (same params, same key): checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from gpu_train import make_config  # noqa: E402

from lvlm_jax.generate import generate_tokens  # noqa: E402
from lvlm_jax.models.scan_utils import unstack_layers  # noqa: E402
from lvlm_jax.models.vlm import VLM  # noqa: E402
from lvlm_jax.train import loop  # noqa: E402
from lvlm_jax.train.rl_math import response_log_probs, sequence_inputs  # noqa: E402


def prompts(model_cfg, batch: int, prompt_len: int, image_size: int, seed: int = 0):
    """Left-padded prompts: an image block then text, rows of different lengths."""
    rng = np.random.default_rng(seed)
    n_img = model_cfg.image_tokens
    ids = rng.integers(4, model_cfg.language.vocab_size, size=(batch, prompt_len))
    seg = np.ones((batch, prompt_len), np.int32)
    for r in range(batch):
        pad = int(rng.integers(0, 8))
        seg[r, :pad] = 0
        ids[r, :pad] = 0
        ids[r, pad + 1:pad + 1 + n_img] = model_cfg.image_token_id
    pixels = rng.uniform(-1, 1, size=(batch, 1, image_size, image_size, 3))
    return jnp.asarray(ids, jnp.int32), jnp.asarray(seg), jnp.asarray(pixels, jnp.float32)


@functools.partial(jax.jit, static_argnames=("model", "n", "chunk"))
def score(model, params, reference, ids, seg, tokens, lengths, pixels, *, n, chunk):
    """The policy's and the reference's log p of each response token."""
    mask = (jnp.arange(n)[None] < lengths[:, None]).astype(jnp.float32)
    seq = sequence_inputs(ids, seg, tokens, mask)
    logp, _ = response_log_probs(model, params, seq, pixels, n, chunk)
    ref, _ = response_log_probs(model, reference, seq, pixels, n, chunk)
    return logp, ref


def time_rollout(model, params, ids, seg, pixels, args, chunk: int) -> dict:
    def run():
        t0 = time.perf_counter()
        out = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(1),
                              max_new_tokens=args.new_tokens, temperature=1.0)
        jax.block_until_ready(out["tokens"])
        t1 = time.perf_counter()
        logp = score(model, params, params, ids, seg, out["tokens"], out["lengths"], pixels,
                     n=args.new_tokens, chunk=chunk)
        jax.block_until_ready(logp)
        return out, t1 - t0, time.perf_counter() - t0

    first = run()  # compiles both programs
    gen, total = [], []
    for _ in range(args.repeats):
        out, g, t = run()
        gen.append(g)
        total.append(t)
    tokens = int(np.sum(np.asarray(out["lengths"])))
    return {"tokens": np.asarray(out["tokens"]), "compile_s": first[2],
            "gen_s": min(gen), "total_s": min(total), "sampled": tokens,
            "gen_tps": ids.shape[0] * args.new_tokens / min(gen),
            "rollout_tps": ids.shape[0] * args.new_tokens / min(total)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU-sized shapes")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--prompt_len", type=int, default=320, help="image tokens + question")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.tiny:
        args.batch, args.new_tokens, args.prompt_len, args.repeats = 4, 8, 24, 1
    cfg_args = argparse.Namespace(tiny=args.tiny, attention="xla", remat="none",
                                  loss_chunk=512, seq_len=args.prompt_len + args.new_tokens,
                                  batch=args.batch)
    cfg = make_config(cfg_args)
    cfg.data.batch_size = max(jax.device_count(), args.batch)
    setup = loop.build(cfg)
    params = jax.device_get(setup.state.params)
    del setup.state
    model = setup.model
    dev = jax.devices()[0]
    print(f"device: {getattr(dev, 'device_kind', dev.platform)}; batch {args.batch}, "
          f"{args.new_tokens} new tokens, prompts of {args.prompt_len}, "
          f"{sum(x.size for x in jax.tree.leaves(params)) / 1e9:.3f}B params, "
          f"dense_kernel {model.cfg.language.dense_kernel}")
    ids, seg, pixels = prompts(model.cfg, args.batch, args.prompt_len, cfg.data.image_size)
    params = jax.device_put(params)
    rows = [("scanned decoder", model, params)]
    unscanned_cfg = dataclasses.replace(model.cfg, language=dataclasses.replace(
        model.cfg.language, scan_layers=False))
    rows.append(("unscanned decoder", VLM(unscanned_cfg),
                 dict(params, decoder=unstack_layers(dict(params["decoder"])))))
    results = []
    for name, m, prm in rows:
        r = time_rollout(m, prm, ids, seg, pixels, args, cfg.train.loss_chunk)
        results.append(r)
        print(f"gpu_rollout[{name}]: generate {r['gen_s'] * 1e3:.0f} ms "
              f"({r['gen_tps']:.0f} tokens/s), generate + score {r['total_s'] * 1e3:.0f} ms "
              f"({r['rollout_tps']:.0f} tokens/s), compile {r['compile_s']:.1f} s, "
              f"{r['sampled']} tokens before stops")
    same = bool(np.array_equal(results[0]["tokens"], results[1]["tokens"]))
    print(f"gpu_rollout: scanned vs unscanned rollout speed ratio "
          f"{results[1]['total_s'] / results[0]['total_s']:.2f}x; same tokens: {same}")


if __name__ == "__main__":
    main()
