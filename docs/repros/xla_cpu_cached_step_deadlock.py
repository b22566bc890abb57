"""Repro: an 8-fake-device train step loaded from jax's persistent compilation cache deadlocks.

    python docs/repros/xla_cpu_cached_step_deadlock.py --cache /tmp/xla_cache 1    # fills it
    python docs/repros/xla_cpu_cached_step_deadlock.py --cache /tmp/xla_cache 200  # loads it
    python docs/repros/xla_cpu_cached_step_deadlock.py 200                         # compiles

The second command aborts with XLA's "Termination timeout ... Expected 8 threads to join the
rendezvous" in about half the tries; the third never did (docs/xla_cpu_collective_deadlock.md).
"""

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("steps", type=int)
parser.add_argument("--cache", default="", help="jax persistent compilation cache directory")
args = parser.parse_args()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
if args.cache:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = args.cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from lvlm_jax import config as config_lib  # noqa: E402
from lvlm_jax.train import input_pipeline, loop  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
cfg = config_lib.load(f"{ROOT}/experiments/paligemma.py:tiny")
cfg.unlock()
cfg.data.batch_size = 8
cfg.train.update(total_steps=args.steps, epochs=0.0, examples=0, progress=False)
batches, model_cfg, size = input_pipeline.make_input(cfg)
setup = loop.build(cfg, model_cfg, size)
t0 = time.time()
for step in range(1, args.steps + 1):
    _, history = loop.run_steps(setup, batches, step)
    print(step, f"loss={history[-1]['loss']:.4f}", f"{time.time() - t0:.1f}s", flush=True)
