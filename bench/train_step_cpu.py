"""CPU train step, lvlm_jax vs HF transformers' LlavaForConditionalGeneration on one config."""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: no probing for TPUs

IMAGE_TOKEN = 31999  # inside the 32k vocabulary, so both models can embed every id
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# One shape for both models: a CLIP-style tower and a Llama-style decoder (~50M parameters).
FULL = dict(
    vision=dict(image_size=224, patch_size=16, width=256, depth=4, mlp_dim=1024, num_heads=4),
    language=dict(vocab_size=32000, embed_dim=512, num_layers=4, num_heads=8, mlp_dim=1408),
    seq_len=512, batch=8, steps=5, warmup=2,
)
QUICK = dict(  # a seconds-long run that exercises the same code
    vision=dict(image_size=32, patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2),
    language=dict(vocab_size=32000, embed_dim=64, num_layers=2, num_heads=4, mlp_dim=128),
    seq_len=64, batch=2, steps=2, warmup=1,
)
LR = 1e-4


def our_config(shape: dict, batch: int, loss_chunk: int, overrides=()):
    """base_config() + the model presets, overridden to the benchmark shape; everything trains."""
    from lvlm_jax import config as config_lib

    v, lm = shape["vision"], shape["language"]
    cfg = config_lib.base_config()
    cfg.stage = "sft"
    cfg.model.vision = {"preset": "clip_b16_224", "feature_layer": -2, **v}
    cfg.model.language = {"preset": "tiny", "num_kv_heads": lm["num_heads"],
                          "max_length": shape["seq_len"], **lm}
    cfg.model.image_token_id = IMAGE_TOKEN
    cfg.data.batch_size = batch
    cfg.data.seq_len = shape["seq_len"]
    cfg.data.image_mean = CLIP_MEAN
    cfg.data.image_std = CLIP_STD
    cfg.optimizer.freeze = []  # train everything, as the HF side does
    cfg.optimizer.learning_rate = LR
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.warmup_steps = 0
    cfg.optimizer.weight_decay = 0.0
    cfg.optimizer.grad_clip_norm = 1.0
    cfg.train.total_steps = 1000
    cfg.train.loss_chunk = loss_chunk
    cfg.train.progress = False
    for key, value in overrides:
        section, _, field = key.rpartition(".")
        if section in ("model.vision", "model.language"):  # preset overrides: any model field
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
            cfg.model[section.split(".")[1]][field] = value
        else:
            config_lib.apply_override(cfg, key, value)
    return cfg


def make_batch(shape: dict, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """[BOS, image placeholders, text]: full rows, loss on the text after the image."""
    rng = np.random.default_rng(seed)
    t, v = shape["seq_len"], shape["vision"]
    n_img = (v["image_size"] // v["patch_size"]) ** 2  # CLS dropped ("default" strategy)
    ids = rng.integers(2, IMAGE_TOKEN, size=(batch, t)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1:1 + n_img] = IMAGE_TOKEN
    targets = np.concatenate([ids[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    pos = np.arange(t)
    loss_mask = np.broadcast_to((pos >= n_img) & (pos < t - 1), (batch, t)).astype(np.float32)
    size = v["image_size"]
    return {
        "input_ids": ids,
        "targets": targets,
        "loss_mask": np.ascontiguousarray(loss_mask),
        "segment_ids": np.ones((batch, t), np.int32),
        "positions": np.broadcast_to(pos, (batch, t)).astype(np.int32),
        "pixel_values": rng.integers(0, 256, size=(batch, 1, size, size, 3), dtype=np.uint8),
    }


class Ours:
    """lvlm_jax's jitted train step, built by the training loop's own `build`."""

    def __init__(self, cfg, batch: dict[str, np.ndarray]):
        import flax.linen as nn
        import jax

        from lvlm_jax import sharding
        from lvlm_jax.train import loop

        self.setup = loop.build(cfg, devices=jax.devices()[:1])  # one CPU device, all cores
        self.contexts = lambda: (loop.mesh_context(self.setup.mesh),  # noqa: E731
                                 nn.logical_axis_rules(sharding.flax_rules(self.setup.rules)))
        self.batch = {f: jax.device_put(batch[f], self.setup.batch_shardings[f])
                      for f in self.setup.batch_shardings}
        self.params = sum(x.size for x in jax.tree.leaves(self.setup.state.params))

    def step(self) -> float:
        mesh_ctx, rules_ctx = self.contexts()
        with mesh_ctx, rules_ctx:  # as in loop.run_steps
            self.setup.state, metrics = self.setup.step_fn(self.setup.state, self.batch)
        return float(metrics["loss"])  # waits for the step


class HF:
    """transformers' LLaVA in PyTorch: forward with labels, backward, clip, AdamW."""

    def __init__(self, shape: dict, batch: dict[str, np.ndarray]):
        import torch
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
        )

        torch.manual_seed(0)
        v, lm = shape["vision"], shape["language"]
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=v["width"], intermediate_size=v["mlp_dim"],
                num_hidden_layers=v["depth"], num_attention_heads=v["num_heads"],
                image_size=v["image_size"], patch_size=v["patch_size"],
                hidden_act="quick_gelu"),
            text_config=LlamaConfig(
                vocab_size=lm["vocab_size"], hidden_size=lm["embed_dim"],
                intermediate_size=lm["mlp_dim"], num_hidden_layers=lm["num_layers"],
                num_attention_heads=lm["num_heads"], num_key_value_heads=lm["num_heads"],
                max_position_embeddings=shape["seq_len"], rms_norm_eps=1e-5,
                tie_word_embeddings=False),
            image_token_index=IMAGE_TOKEN, projector_hidden_act="gelu",
            vision_feature_layer=-2, vision_feature_select_strategy="default",
            image_seq_length=(v["image_size"] // v["patch_size"]) ** 2)
        self.model = LlavaForConditionalGeneration(config).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)
        self.params = sum(p.numel() for p in self.model.parameters())
        # The processor's output: normalised float NCHW pixels; labels -100 off the text.
        pix = (batch["pixel_values"][:, 0].astype(np.float32) / 255.0
               - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
        labels = batch["input_ids"].astype(np.int64).copy()
        n_img = int((batch["input_ids"][0] == IMAGE_TOKEN).sum())
        labels[:, :1 + n_img] = -100
        self.inputs = dict(
            input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)),
            attention_mask=torch.ones(batch["input_ids"].shape, dtype=torch.long),
            pixel_values=torch.from_numpy(np.ascontiguousarray(pix.transpose(0, 3, 1, 2))),
            labels=torch.from_numpy(labels))

    def step(self) -> float:
        import torch

        loss = self.model(**self.inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def load() -> str:
    """The 1/5/15-minute load averages: other work on a shared machine skews the timings."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _busy_ticks() -> tuple[int, int] | None:
    """(CPU ticks busy on the whole machine, ticks used by this process), where /proc has them."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            own = f.read()
    except OSError:
        return None
    fields = own[own.rindex(")") + 2:].split()
    return sum(vals) - vals[3] - vals[4], int(fields[11]) + int(fields[12])


def timed(fn, cores: int) -> tuple[float, float, float | None]:
    """(seconds, loss, share of the machine's CPU that other processes used meanwhile)."""
    b0, t0 = _busy_ticks(), time.perf_counter()
    loss = fn()
    dt, b1 = time.perf_counter() - t0, _busy_ticks()
    if b0 is None or b1 is None:
        return dt, loss, None
    others = (b1[0] - b0[0]) - (b1[1] - b0[1])
    return dt, loss, max(0.0, others / os.sysconf("SC_CLK_TCK") / (dt * cores))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=None, help="timed steps per framework")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (after compiling)")
    p.add_argument("--loss_chunk", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="a tiny shape that runs in seconds")
    p.add_argument("--skip_hf", action="store_true", help="time only lvlm_jax (profiling)")
    p.add_argument("--max_foreign", type=float, default=0.15,
                   help="discard steps during which other processes used more of the CPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of our config, e.g. --set model.language.remat_policy=full")
    args = p.parse_args(argv)
    shape = QUICK if args.quick else FULL
    batch_size = args.batch or shape["batch"]
    steps = args.steps or shape["steps"]
    warmup = shape["warmup"] if args.warmup is None else args.warmup
    cores = os.cpu_count() or 1

    import torch

    torch.set_num_threads(cores)  # XLA's CPU client uses every core by default
    import jax

    batch = make_batch(shape, batch_size)
    overrides = [tuple(s.split("=", 1)) for s in args.set]
    cfg = our_config(shape, batch_size, args.loss_chunk, overrides)
    print(f"train_step_cpu: batch {batch_size} x {shape['seq_len']} tokens, "
          f"{cores} cores, jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__}, loss_chunk {args.loss_chunk}"
          + (f", overrides {args.set}" if args.set else "")
          + f", load average {load()}", flush=True)

    ours = Ours(cfg, batch)
    t_compile, loss0, _ = timed(ours.step, cores)
    print(f"lvlm_jax: {ours.params / 1e6:.2f}M params; first step (compile) {t_compile:.1f} s, "
          f"loss {loss0:.3f}", flush=True)
    hf = None
    if not args.skip_hf:
        hf = HF(shape, batch)
        t_first, hf_loss0, _ = timed(hf.step, cores)
        print(f"HF:       {hf.params / 1e6:.2f}M params; first step {t_first:.1f} s, "
              f"loss {hf_loss0:.3f}; attention {hf.model.config._attn_implementation}",
              flush=True)
    for _ in range(warmup):
        ours.step()
        if hf is not None:
            hf.step()
    # Interleaved, so that load from other processes falls on both sides alike. A step during
    # which other processes took more than --max_foreign of the CPU is shown but not counted
    # (PyTorch's OpenMP loops slow down far more than XLA's under contention), and is retried
    # up to 3x --steps rounds in all.
    names = ["lvlm_jax"] + ([] if hf is None else ["HF"])
    steppers = {"lvlm_jax": ours.step, "HF": hf.step if hf is not None else None}
    times: dict[str, list[float]] = {k: [] for k in names}
    clean: dict[str, list[float]] = {k: [] for k in names}
    for i in range(3 * steps):
        if min(len(clean[k]) for k in names) >= steps:
            break
        parts = []
        for k in names:
            dt, loss, foreign = timed(steppers[k], cores)
            times[k].append(dt)
            if foreign is None or foreign <= args.max_foreign:
                clean[k].append(dt)
            busy = "" if foreign is None else f", others {100 * foreign:.0f}% CPU"
            parts.append(f"{k} {dt:.2f} s (loss {loss:.3f}{busy})")
        print(f"step {i}: " + ", ".join(parts), flush=True)
    if all(clean[k] for k in names):
        times = clean
    else:
        print(f"WARNING: not every framework had a step with other processes under "
              f"{100 * args.max_foreign:.0f}% of the CPU; the numbers below are skewed by the load",
              flush=True)
    # Best of the counted steps: on a shared machine the minimum is the least disturbed.
    rate = {k: batch_size / min(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k}: best {min(v):.3f} s/step, median {statistics.median(v):.3f}, "
              f"max {max(v):.3f} over {len(v)} counted steps; {batch_size / min(v):.2f} ex/s, "
              f"{batch_size * shape['seq_len'] / min(v):.0f} tokens/s")
    if hf is None:
        line = f"train_step_cpu: lvlm_jax {rate['lvlm_jax']:.2f} ex/s"
    else:
        line = (f"train_step_cpu: lvlm_jax {rate['lvlm_jax']:.2f} ex/s, HF {rate['HF']:.2f} ex/s, "
                f"ratio {rate['lvlm_jax'] / rate['HF']:.2f}x")
    print(f"load average at the end: {load()}")
    print(line, flush=True)
    return line


if __name__ == "__main__":
    main()
