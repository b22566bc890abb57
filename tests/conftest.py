"""Test set-up: 8 fake CPU devices (set before jax is imported), exact fp32 matmuls and a
persistent compilation cache shared by the tests and the processes they start."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests (and the `lvlm` processes they start) compile the same tiny programs; XLA's
# compile time dominates the suite on CPU, so identical programs are compiled once. The cache
# is keyed by the program, the compile options and the jax version, so it never returns a stale
# executable. Environment variables, so that subprocesses share it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"lvlm_jax_test_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
