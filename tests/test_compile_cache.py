"""A multi-device XLA:CPU mesh turns jax's persistent compilation cache off (executables loaded
from it can deadlock in their collectives: docs/xla_cpu_collective_deadlock.md); a one-device
mesh keeps it."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import os
import jax, jax.numpy as jnp
from lvlm_jax import sharding

def double(x):
    return 2 * x

def triple(x):
    return 3 * x

cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
entries = lambda: sorted(n for n in os.listdir(cache) if n.startswith(("jit_double", "jit_triple")))
sharding.make_mesh({"ici": {"fsdp": -1}}, jax.devices()[:1])  # one device: the cache stays
jax.jit(double)(jnp.ones(3))
print("one device:", entries(), flush=True)
sharding.make_mesh({"ici": {"fsdp": -1}})  # eight CPU devices: turned off
jax.jit(triple)(jnp.ones(3))
print("eight devices:", entries(), flush=True)
"""


def test_a_multi_device_cpu_mesh_turns_the_persistent_compilation_cache_off(tmp_path):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    one, eight = (ast.literal_eval(lines[k]) for k in ("one device", "eight devices"))
    assert len(one) == 1 and one[0].startswith("jit_double")  # the cache was in use
    assert eight == one  # 'triple' was compiled, not written
    assert "persistent compilation cache" in out.stderr and "turned off" in out.stderr
    assert "xla_cpu_collective_deadlock" in out.stderr
