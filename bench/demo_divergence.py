"""Why `lvlm demo` figures move between machines: the same demo stage under perturbations that
differ between machines (the CPU's vector ISA, the number of cores), beside another seed.

    python bench/demo_divergence.py [--stage=pretrain] [--steps=60]

Each variant runs `lvlm train --config=experiments/demo.py:<stage>` for --steps steps in its own
process, and the script prints, per variant, the first step whose training loss differs from
the default run's (bitwise) and the largest difference of the two runs' losses at one step,
beside the same for another seed. A variant that changes the float rounding of XLA:CPU's kernels
starts a different trajectory; whether the figures at the end then differ is a property of the
recipe, which is why the demo is judged over several seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, extra XLA flags, CPU affinity or None, extra config overrides)
VARIANTS = (
    ("default", "", None, ()),
    ("1 core (taskset -c 0)", "", "0", ()),
    ("ISA capped at AVX", "--xla_cpu_max_isa=AVX", None, ()),
    ("ISA capped at SSE4_2", "--xla_cpu_max_isa=SSE4_2", None, ()),
    ("another seed (1)", "", None, ("--config.seed=1",)),
)
# --quick (the test suite's run): the default and another seed, whose losses must differ from
# step 1 on: the comparison works, in two processes instead of five.
QUICK = ("default", "another seed (1)")


def run(stage: str, steps: int, workdir: str, flags: str, cpus: str | None,
        extra: tuple[str, ...]) -> list[float]:
    # The variant's flags on top of the caller's (the test suite's fast-compile flags).
    base = os.environ.get("XLA_FLAGS", "")
    env = {**os.environ, "XLA_FLAGS": f"{base} {flags}".strip(), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "lvlm_jax", "train",
           f"--config={ROOT}/experiments/demo.py:{stage}", f"--workdir={workdir}",
           f"--config.train.total_steps={steps}", "--config.train.log_every=1",
           "--config.train.progress=false", *extra]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    return [losses[s] for s in sorted(losses)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="pretrain", choices=("pretrain",),
                   help="a stage that starts from scratch (the others need init_from)")
    p.add_argument("--steps", type=int, default=150,
                   help="the caption loss's drop happens in steps 60-120")
    p.add_argument("--quick", action="store_true",
                   help="the default run, the ISA cap at SSE4_2 and the other seed only")
    args = p.parse_args()
    variants = [v for v in VARIANTS if not args.quick or v[0] in QUICK]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, flags, cpus, extra) in enumerate(variants):
            results[name] = run(args.stage, args.steps, os.path.join(tmp, str(i)), flags, cpus,
                                extra)
    base = results["default"]
    seed_gap = max_gap(results["another seed (1)"], base)
    print(f"demo_divergence: {args.stage}, {args.steps} steps; final loss of the default run "
          f"{base[-1]:.5f}")
    for name, losses in results.items():
        if name == "default":
            continue
        first = next((i + 1 for i, (a, b) in enumerate(zip(base, losses, strict=True))
                      if a != b), None)
        gap = max_gap(losses, base)
        where = "never (bitwise equal)" if first is None else f"step {first}"
        print(f"  {name:<24} first differs: {where:<22} largest |loss diff| {gap:.5f} "
              f"({gap / seed_gap if seed_gap else float('nan'):.2f}x the seed's), final loss "
              f"{losses[-1]:.5f}")
    return 0


def max_gap(a: list[float], b: list[float]) -> float:
    """The largest |difference| of two runs' losses at the same step."""
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


if __name__ == "__main__":
    sys.exit(main())
