"""jax's persistent compilation cache, turned off for multi-device XLA:CPU programs.

An XLA:CPU executable read back from the cache loses the order between a collective inside a
while loop (a scanned layer stack) and one outside it: XLA's thunk deserializer gives each nested
thunk sequence its own collective-communicator resource, so the top-level execution graph no
longer orders the loop after the outer collective, and devices that start them in different
orders wait for each other forever (docs/xla_cpu_collective_deadlock.md: the source lines, a
repro and the figures). A freshly compiled executable keeps the order. So on CPU meshes of more
than one device, every process compiles what it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
from jax.experimental.compilation_cache import compilation_cache

log = logging.getLogger(__name__)


def cache_is_safe(devices: Sequence[jax.Device]) -> bool:
    """False where an executable loaded from the persistent cache could deadlock: XLA:CPU
    with more than one device taking part in the program's collectives."""
    return not (len(devices) > 1 and all(d.platform == "cpu" for d in devices))


def guard(devices: Sequence[jax.Device]) -> bool:
    """Turns the persistent compilation cache off for this process (with a warning that says
    why) when it is on and programs over `devices` could load a deadlocking executable from it.
    Returns True when it turned the cache off."""
    on = jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache
    if cache_is_safe(devices) or not on:
        return False
    log.warning(
        "jax's persistent compilation cache (%s) is turned off for this process: XLA:CPU "
        "executables with collectives over %d devices can deadlock when loaded from it "
        "(docs/xla_cpu_collective_deadlock.md)", jax.config.jax_compilation_cache_dir,
        len(devices))
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # jax decides once per process whether to use the cache
    return True
