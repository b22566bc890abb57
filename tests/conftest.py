"""Test set-up: 8 fake CPU devices (set before jax is imported) and exact fp32 matmuls."""

import os

from xla_env import xla_flags

# No persistent compilation cache: on XLA:CPU (jax 0.10.2) an 8-device train step that was
# loaded from it deadlocked in 10 of 18 runs of 200 steps, and the same step compiled in the
# process in none of ~15,000 steps (docs/xla_cpu_collective_deadlock.md has the repro, the
# stacks and the figures). So every process compiles what it runs, quickly: tests/xla_env.py.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(devices=8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# A crashed or hung test fails with its stack, its processes end, and a stuck session restarts
# its workers: tests/session_guard.py. Its hooks are this conftest's.
from session_guard import (  # noqa: E402, F401
    pytest_configure,
    pytest_handlecrashitem,
    pytest_runtest_logreport,
    pytest_runtest_logstart,
    pytest_runtest_protocol,
    pytest_testnodedown,
    pytest_testnodeready,
    pytest_unconfigure,
)

# The slowest files first (each starts processes that compile their own programs), so that on 2
# workers they overlap with the many short files instead of running alone at the end: xdist's
# default order (most tests first) left tests/test_topology.py's ~6 minutes as the suite's tail.
SLOW_FILES_FIRST = ("test_topology.py", "test_demo.py", "test_multiprocess.py",
                    "test_preemption_multiprocess.py", "test_sweeps.py",
                    "test_preference_stages.py", "test_checkpoints.py", "test_session_guard.py",
                    "test_loader_resume.py", "test_tokenizers_hf.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return SLOW_FILES_FIRST.index(name) if name in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)

    items.sort(key=rank)  # stable: the files' own order otherwise


def pytest_sessionstart(session):
    # The controller's scheduler keeps the workers' collection order (its default: the files
    # with the most tests first). Only for this suite: tests/test_session_guard.py runs a nested
    # session with a copy of this file, whose timing assumes xdist's own order.
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.exists(os.path.join(here, SLOW_FILES_FIRST[0])):
        session.config.option.loadscopereorder = False
