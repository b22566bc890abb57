"""GPU train-step benchmark: a ~1B LVLM (SigLIP-B/16 at 224px + a ~1B Llama-style decoder,
2048 tokens, bf16 compute, cuDNN flash attention), batches made on the device so the loader is
not measured. Prints step time, tokens/s and MFU (model FLOPs / step time / chip peak).

    python bench/gpu_train.py                      # the H100 run (target: MFU >= 55%)
    python bench/gpu_train.py --tiny --steps 3     # the same script at a CPU-sized shape

Beside ours it times the same step with XLA's attention instead of cuDNN (--baseline), the
plain-JAX reference point of DESIGN.md (45% vs 25% MFU on an H100), and prints the ratio.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from lvlm_jax.config import base_config
from lvlm_jax.train import flops as flops_lib
from lvlm_jax.train import loop


def make_config(args) -> object:
    c = base_config()
    c.stage = "sft"
    c.optimizer.freeze = []
    c.optimizer.warmup_steps = 0
    c.train.total_steps = 1000
    c.train.progress = False
    c.train.loss_chunk = args.loss_chunk
    c.mesh.ici = {"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1}
    attention = args.attention
    if args.tiny:
        c.model.vision = {"preset": "siglip_b16_224", "image_size": 32, "patch_size": 16,
                          "depth": 2, "width": 64, "mlp_dim": 128, "num_heads": 4,
                          "attention": "xla" if attention == "cudnn" else attention}
        c.model.language = {"preset": "llama_1b", "vocab_size": 512, "embed_dim": 128,
                            "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "mlp_dim": 256,
                            "attention": "xla" if attention == "cudnn" else attention}
        c.data.seq_len, c.data.batch_size, c.data.image_size = 64, 4, 32
    else:
        c.model.vision = {"preset": "siglip_b16_224", "dtype": "bfloat16",
                          "attention": attention, "remat_policy": args.remat}
        c.model.language = {"preset": "llama_1b", "dtype": "bfloat16", "attention": attention,
                            "remat_policy": args.remat}
        c.data.seq_len, c.data.batch_size, c.data.image_size = args.seq_len, args.batch, 224
    c.model.connector = {"kind": "projector", "projector": "mlp2x_gelu"}
    c.model.image_token_id = 3
    return c


def device_batches(setup, seed: int = 0):
    """A jitted generator of global batches already in their shards on the devices."""
    d = setup.cfg.data
    m = setup.model.cfg
    shardings = setup.batch_shardings
    n_img = m.image_tokens
    vocab = m.language.vocab_size

    def make(key):
        k1, k2 = jax.random.split(key)
        ids = jax.random.randint(k1, (d.batch_size, d.seq_len), 4, vocab, jnp.int32)
        ids = ids.at[:, 1:1 + n_img].set(m.image_token_id)
        targets = jnp.concatenate([ids[:, 1:], jnp.zeros((d.batch_size, 1), jnp.int32)], 1)
        pos = jnp.broadcast_to(jnp.arange(d.seq_len, dtype=jnp.int32), ids.shape)
        mask = (pos >= 1 + n_img).astype(jnp.float32)
        pixels = jax.random.randint(k2, (d.batch_size, 1, d.image_size, d.image_size, 3), 0,
                                    256, jnp.int32).astype(jnp.uint8)
        return {"input_ids": ids, "targets": targets, "loss_mask": mask,
                "segment_ids": jnp.ones_like(ids), "positions": pos, "pixel_values": pixels}

    make = jax.jit(make, out_shardings=shardings)
    key = jax.random.PRNGKey(seed)
    while True:
        key, sub = jax.random.split(key)
        yield make(sub)


def time_steps(args, attention: str) -> dict:
    args = argparse.Namespace(**{**vars(args), "attention": attention})
    cfg = make_config(args)
    setup = loop.build(cfg)
    batches = device_batches(setup)
    state = setup.state
    with loop.mesh_context(setup.mesh):
        t0 = time.perf_counter()
        state, m = setup.step_fn(state, next(batches))
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            state, m = setup.step_fn(state, next(batches))
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = setup.step_fn(state, next(batches))
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / args.steps
    peak = flops_lib.device_peak()
    mfu = flops_lib.mfu(setup.flops_per_step, dt, jax.device_count(), peak)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    return {"attention": attention, "step_s": dt, "compile_s": compile_s,
            "tokens_per_s": cfg.data.batch_size * cfg.data.seq_len / dt, "mfu": mfu,
            "params": n_params, "loss": float(m["loss"]), "tflops_per_step":
            setup.flops_per_step / 1e12}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU-sized shapes")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attention", default="cudnn")
    p.add_argument("--remat", default="minimal")
    p.add_argument("--loss_chunk", type=int, default=512)
    p.add_argument("--baseline", action="store_true",
                   help="also time XLA attention in the same run and print the ratio")
    args = p.parse_args()
    dev = jax.devices()[0]
    print(f"device: {getattr(dev, 'device_kind', dev.platform)} x {jax.device_count()}")
    ours = time_steps(args, args.attention if not args.tiny else "xla")
    rows = [ours]
    if args.baseline:
        rows.append(time_steps(args, "xla"))
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak for this device)"
        print(f"gpu_train[{r['attention']}]: {r['params'] / 1e9:.3f}B params, "
              f"step {r['step_s'] * 1e3:.1f} ms (compile {r['compile_s']:.1f} s), "
              f"{r['tokens_per_s']:.0f} tokens/s, {r['tflops_per_step']:.2f} TFLOP/step, "
              f"MFU {mfu}, loss {r['loss']:.3f}")
    if args.baseline:
        print(f"gpu_train: {rows[0]['attention']} vs xla attention speed-up "
              f"{rows[1]['step_s'] / rows[0]['step_s']:.2f}x")


if __name__ == "__main__":
    main()
