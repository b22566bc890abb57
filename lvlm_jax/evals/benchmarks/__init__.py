"""The benchmark registry: each task's reader of its released files, prompt and scorer."""

from __future__ import annotations

from lvlm_jax.evals.benchmarks import (
    chartqa,
    coco_captions,
    docvqa,
    infovqa,
    mmbench,
    mmmu,
    pope,
    scienceqa,
    textvqa,
    vqav2,
)
from lvlm_jax.evals.benchmarks.base import Benchmark, Loaded, MissingFiles, Result, Skip

BENCHMARKS: dict[str, Benchmark] = {
    m.BENCHMARK.name: m.BENCHMARK
    for m in (vqav2, textvqa, docvqa, infovqa, chartqa, scienceqa, mmbench, mmmu, pope,
              coco_captions)
}


def get(name: str) -> Benchmark:
    """The benchmark called `name`; ValueError naming the valid ones otherwise."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; valid benchmarks: "
                         f"{', '.join(BENCHMARKS)}") from None


__all__ = ["BENCHMARKS", "Benchmark", "Loaded", "MissingFiles", "Result", "Skip", "get"]
