"""Any-res tiling against the plain resize on the built-in high-resolution task: held-out accuracy.

    python bench/anyres_vs_resize.py [--seeds=0,1,2] [--steps=1500] \
        [--out bench/results/anyres_vs_resize.txt]

The task (data_pipelines/synthetic_highres.py): one 16-px shape in a 96-192 px canvas; the
question asks which shape. For each seed, two runs of the CLI, `lvlm train
--config=experiments/llava_next.py:tiny` with `data.source=synthetic_highres`, the same model,
data, steps and seed: "anyres" tiles each image on the grids of ANYRES_PINPOINTS (a global view
plus up to 9 tiles of 32 px), "resize" gives the model one 32-px view of the padded image (no
pinpoints, no newline: LLaVA-1.5's input). Each run is then scored on EVAL_EXAMPLES held-out
records read through the same loader (the eval split's images never appear in training): the
model's answer is the shape whose first answer token it scores highest where the reply starts.
Chance is 1/3. The script prints one line per run and the median margin, with the date, the
package versions and the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = f"{ROOT}/experiments/llava_next.py:tiny"
ANYRES_PINPOINTS = "((32, 64), (64, 32), (64, 64), (64, 128), (128, 64), (96, 96))"
EVAL_EXAMPLES = 300
# The recipe's tiny model from scratch, its vision tower at the full learning rate (the recipe's
# 0.1x is for a pretrained tower): ~1000 steps pass before it tells the shapes apart in tiles.
COMMON = {"data.source": "synthetic_highres", "data.num_examples": "24000",
          "data.seq_len": "224", "data.batch_size": "16", "evals.num_examples": str(EVAL_EXAMPLES),
          "train.log_every": "100", "train.progress": "false", "optimizer.learning_rate": "1e-3",
          "optimizer.lr_multipliers": "()"}
MODES = {
    "anyres": {"model.image_grid_pinpoints": ANYRES_PINPOINTS, "data.max_crops": "160"},
    "resize": {"model.image_grid_pinpoints": "()", "model.image_newline": "false",
               "data.max_crops": "16"},
}


def overrides(mode: str, seed: int, steps: int) -> dict[str, str]:
    return {**COMMON, **MODES[mode], "seed": str(seed), "train.total_steps": str(steps)}


def train(workdir: str, settings: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "lvlm_jax", "train", f"--config={RECIPE}",
           f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in settings.items())]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def accuracy(workdir: str, settings: dict[str, str]) -> tuple[float, int]:
    """(held-out accuracy, examples) of the run in `workdir`, trained with `settings`."""
    import jax
    import numpy as np

    from lvlm_jax import config as config_lib
    from lvlm_jax.checkpoints.manager import restore_params
    from lvlm_jax.models import build_model
    from lvlm_jax.train import input_pipeline
    from lvlm_jax.train.stages import LossContext

    cfg = config_lib.load(RECIPE, list(settings.items()))
    tokenizer = input_pipeline.load_tokenizer(cfg.data)
    model_cfg = input_pipeline.resolve_model_config(cfg, tokenizer)
    model = build_model(model_cfg, platform="cpu")
    params, _ = restore_params(workdir)
    ctx = LossContext(model, image_mean=tuple(cfg.data.image_mean),
                      image_std=tuple(cfg.data.image_std))

    @jax.jit
    def logits(params, batch):
        out, _ = model.apply({"params": params}, batch["input_ids"], ctx.pixels(batch),
                             segment_ids=batch["segment_ids"], positions=batch["positions"])
        return out

    first_logits, first_targets = [], []
    for batch in input_pipeline.make_eval_batches(cfg, model_cfg)():
        out = np.asarray(logits(params, {k: np.asarray(v) for k, v in batch.items()}))
        mask = np.asarray(batch["loss_mask"]) > 0
        rows = np.flatnonzero(mask.any(axis=1))
        where = mask.argmax(axis=1)[rows]  # the reply's first supervised position
        first_logits.append(out[rows, where])
        first_targets.append(np.asarray(batch["targets"])[rows, where])
    scores, targets = np.concatenate(first_logits), np.concatenate(first_targets)
    answers = np.unique(targets)
    if len(answers) != 3:
        raise RuntimeError(f"the three shapes' replies start with {len(answers)} distinct "
                           "tokens; the first-token choice needs three")
    chosen = answers[scores[:, answers].argmax(axis=1)]
    return float((chosen == targets).mean()), len(targets)


def environment() -> str:
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}"
                         for p in ("jax", "flax", "optax", "grain", "numpy", "pillow"))
    from lvlm_jax.demo_report import cpu_model

    cpu = cpu_model()
    return (f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {versions}; "
            f"{os.cpu_count()} x {cpu}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--out", default=None, help="also write the lines to this file")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = [f"anyres_vs_resize: {RECIPE.split('/')[-1]} on data.source=synthetic_highres, "
             f"{args.steps} steps of 16, held-out shape accuracy (chance 33.3%)",
             f"  {environment()}"]
    print("\n".join(lines), flush=True)
    margins = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            acc = {}
            for mode in MODES:
                workdir = os.path.join(tmp, f"{mode}_{seed}")
                settings = overrides(mode, seed, args.steps)
                train(workdir, settings)
                acc[mode], n = accuracy(workdir, settings)
            margins.append(acc["anyres"] - acc["resize"])
            line = (f"  seed {seed}: anyres {100 * acc['anyres']:.1f}%, resize "
                    f"{100 * acc['resize']:.1f}% ({n} held-out), margin "
                    f"{100 * margins[-1]:+.1f} points")
            lines.append(line)
            print(line, flush=True)
    line = (f"  median margin {100 * statistics.median(margins):+.1f} points (min "
            f"{100 * min(margins):+.1f}, max {100 * max(margins):+.1f}) over {len(seeds)} seeds")
    lines.append(line)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
