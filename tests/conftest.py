"""Test set-up: 8 fake CPU devices (set before jax is imported), exact fp32 matmuls and a
persistent compilation cache shared by the tests and the processes they start."""

import os
import tempfile

# Known XLA:CPU bug (jax 0.10): a train step on the 8 fake devices can deadlock now and then. Its
# thunk executor runs independent thunks in whatever order they become ready, per device, and
# nothing orders collectives: seen with gdb and XLA's log, 7 devices waited in a scanned loop's
# all-reduce (op 1) while 6 waited in a top-level all-gather (op 70) of the same run, with idle
# threads to spare (a bigger pool, PJRT_NPROC=32, did not help). XLA aborts the process when a
# rendezvous passes its termination timeout (XLA's default: 40 s), and tests/session_guard.py
# reruns the test. A collective's own wait is bounded too (XLA's default is 30 minutes), so that
# a deadlock past the rendezvous also ends in an abort instead of the per-test timeout.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_timeout_seconds=120").strip()
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


# A crashed or hung test reruns on a fresh worker, and a stuck session restarts its workers:
# tests/session_guard.py. Its hooks are this conftest's.
from session_guard import (  # noqa: E402, F401
    pytest_cmdline_main,
    pytest_configure,
    pytest_handlecrashitem,
    pytest_report_teststatus,
    pytest_runtest_logreport,
    pytest_runtest_logstart,
    pytest_runtest_protocol,
    pytest_terminal_summary,
    pytest_testnodedown,
    pytest_testnodeready,
    pytest_unconfigure,
)
