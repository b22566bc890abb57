"""XLA flags of test processes: quick-to-compile CPU code, a device count, a collective timeout."""

from __future__ import annotations

import os

# The suite's time is mostly XLA:CPU compiling tiny programs. Two flags cut that: LLVM at
# optimisation level 0, and the older elemental emitter for fusions instead of the new fusion
# emitters (whose MLIR pipeline is most of what remains). A tiny 8-device train step compiled
# in 4.4 s with the first flag alone and in 1.7 s with both; 6 tiny-variant and KV-cache tests
# took 97 s with neither, 58 s with the first, 43 s with both. The same tiny steps run ~1.4x
# slower, which tests that take a few steps never notice. Every process of a test compiles
# with the same flags, so "equal to" comparisons between an in-process run and a CLI one
# compare like with like. Benchmarks (bench/) never use these.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
# The TPU compiler in libtpu (AOT compiles on this host) reads XLA_FLAGS too, and dies on a
# flag its XLA does not know: this one.
CPU_ONLY = ("--xla_cpu_use_fusion_emitters=false",)
# A collective that still waited would end its process after 120 s (XLA's default: 30 minutes)
# with the stack of the wait, instead of holding the suite.
COLLECTIVE_TIMEOUT = "--xla_cpu_collective_timeout_seconds=120"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process; `devices` fakes that many CPU devices (None: the real one)."""
    flags = [*FAST_COMPILE, COLLECTIVE_TIMEOUT]
    if devices is not None:
        flags.insert(0, f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


def cpu_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """This process's environment for a subprocess on the CPU: `xla_flags(devices)`, quiet logs."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices),
                TF_CPP_MIN_LOG_LEVEL="3", **extra)


def without_cpu_only(flags: str) -> str:
    """`flags` less those that libtpu's XLA does not know."""
    return " ".join(f for f in flags.split() if f not in CPU_ONLY)
