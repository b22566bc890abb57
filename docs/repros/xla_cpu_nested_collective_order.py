"""Minimal repro: an XLA:CPU executable loaded from jax's persistent cache loses the ordering
between a collective inside a while loop and an independent collective outside it.

    TF_CPP_VMODULE=thunk_executor=2 python docs/repros/xla_cpu_nested_collective_order.py

One program on 8 fake CPU devices: a `fori_loop` whose body all-reduces (psum), and beside it an
all-gather that does not depend on the loop. The script runs it compiled in this process, then
(after `jax.clear_caches()`) loaded back from the persistent cache it just wrote, each in a child
process with a short collective timeout, and prints how each ended and, with the VMODULE above,
the top-level ThunkExecutor's graph ("#source_nodes=... #sink_nodes=...").

What it showed with jax/jaxlib 0.10.2 on a 2-core VM (docs/xla_cpu_collective_deadlock.md):
- compiled: the while thunk depends on the all-gather (the shared communicator resource);
  3 x 1000 runs finished;
- loaded: that dependency is gone (12 sink nodes in the top-level graph instead of 11), and
  3 of 3 tries aborted with "Expected 8 threads to join the rendezvous", two within their first
  25 runs. With a 20-step loop (REPRO_LOOP=20) 2000 loaded runs finished: the loop must still
  be running when the all-gather's input is ready.
"""

import os
import subprocess
import sys
import tempfile

RUNS = int(os.environ.get("REPRO_RUNS", "300"))
LOOP = int(os.environ.get("REPRO_LOOP", "200"))  # all-reduces in the loop


def child(mode: str, cache: str) -> None:
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8"
                               " --xla_cpu_collective_timeout_seconds=20")
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    mesh = jax.make_mesh((8,), ("d",))

    def per_device(x, y):
        def body(i, c):
            return jnp.tanh(c) + 1e-3 * jax.lax.psum(c, "d")  # an all-reduce in the loop

        looped = jax.lax.fori_loop(0, LOOP, body, x)
        # Independent of the loop, and ready while it runs (after a sort of varying length).
        gathered = jax.lax.all_gather(jnp.sort(jnp.sin(y * 7.1)), "d", tiled=True)
        # More top-level work, so the executor does not run the sequence in order (it does for
        # 8 thunks or fewer, and for small buffers).
        sorts = [jnp.sort(y * k) for k in range(2, 12)]
        return looped, gathered, sorts

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("d"), P("d")),
                              out_specs=(P("d"), P(), P("d")), check_vma=False))
    rows = jax.NamedSharding(mesh, P("d"))
    x = jax.device_put(jnp.ones((8 * 4096,), jnp.float32), rows)
    y = jax.device_put(jnp.arange(8 * 4096, dtype=jnp.float32), rows)
    jax.block_until_ready(f(x, y))  # compiles, and writes the cache entry
    if mode == "loaded":
        jax.clear_caches()  # the next call reads the executable back from the cache
        jax.block_until_ready(f(x, y))
    for run in range(1, RUNS + 1):
        jax.block_until_ready(f(x, y))
        if run % 25 == 0:
            print(f"{mode}: {run} runs finished", flush=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        for mode in ("compiled", "loaded"):
            proc = subprocess.run([sys.executable, __file__, mode, cache], capture_output=True,
                                  text=True, timeout=600)
            graphs = [ln.split("] ", 1)[-1] for ln in proc.stderr.splitlines()
                      if "Constructed ThunkExecutor" in ln and "source_nodes" in ln]
            print(f"== {mode}: exit code {proc.returncode}")
            print("\n".join(sorted(set(graphs))) or "(set TF_CPP_VMODULE=thunk_executor=2 to "
                                                    "see the executors' graphs)")
            done = proc.stdout.strip().splitlines()
            print(done[-1] if done else f"{mode}: no run finished")
            if proc.returncode:
                print(next((ln for ln in proc.stderr.splitlines() if "rendezvous" in ln),
                           proc.stderr[-800:]))
            if mode == "compiled":
                os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")


if __name__ == "__main__":
    if len(sys.argv) == 3:
        child(sys.argv[1], sys.argv[2])
    else:
        main()
