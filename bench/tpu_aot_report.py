"""LLaVA-1.5-7B's train step of every stage on a v5p-64 and a v5e-256, AOT-compiled on a CPU host:
per-chip memory, the collectives of the optimized program, a roofline step time and its MFU.

    python bench/tpu_aot_report.py --out bench/results/tpu_aot_report.txt
    python bench/tpu_aot_report.py --config=experiments/llava_next.py:7b \
        --out bench/results/tpu_aot_report_llava_next.txt

writes the text there and every report as JSON beside it (bench/results/tpu_aot_report.json).
Each stage (pretrain, sft, dpo, ppo's update) compiles with the same config, its stage swapped
in, as `lvlm compile --stages=...` does. The paper's batch sizes at 2048 tokens: v5p-64 runs
each step at stage 1's batch of 256, the heavier batch on the same slice; v5e-256 at stage 2's
128. Each case tries the config as it is (FSDP over every chip, full remat, bf16 compute), then
the next setting in ATTEMPTS, and prints the first report that fits. A 7B compile takes ~3
minutes on 2 CPU cores, so the whole run (2 slices x 4 stages) takes ~30 minutes;
--topologies and --stages run a part. Needs libtpu (`pip install -e '.[tpu]'`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from typing import Any

# A compile-only run: no TPU is driven from here, and a CPU host must not try to start one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lvlm_jax import aot  # noqa: E402
from lvlm_jax import config as config_lib  # noqa: E402

CONFIG = "experiments/llava15.py:7b"
STAGES = ("pretrain", "sft", "dpo", "ppo")
CASES: list[tuple[str, dict[str, str], str]] = [
    ("v5p-64", {"data.batch_size": "256"}, "at stage 1's batch (256)"),
    ("v5e-256", {"data.batch_size": "128"}, "at stage 2's batch (128)"),
]
# --config=experiments/llava_next.py:7b: LLaVA-NeXT's any-res instruction tuning (sft only: flat
# media take no preference or rollout records), its stage-2 batch of 128 at 4096 tokens with
# the recipe's budget of 4 crops of 336 a row (an image takes up to 5: a global view + a 2x2,
# 1x3 or 3x1 grid), the crops of 4 rows in each of the 32 chips' groups.
OTHER_CASES: dict[str, tuple[tuple[str, ...], list[tuple[str, dict[str, str], str]]]] = {
    "experiments/llava_next.py:7b": (("sft",), [
        ("v5p-64", {"data.batch_size": "128"},
         "at stage 2's batch (128 x 4096 tokens), any-res: 512 crops of 336 a step"),
    ]),
}
# Tried in order until one fits; each adds to the config's own settings.
ATTEMPTS: list[tuple[str, dict[str, str]]] = [
    ("as configured", {}),
    ("tensor=2 (fsdp = chips/2): batch rows can be fewer than chips",
     {"mesh.ici.tensor": "2"}),
    # sharding.make_mesh maps each mesh axis onto whole physical axes of the torus: on a
    # 16x16 v5e-256, fsdp=128 x tensor=2 has no such mapping, fsdp=16 x tensor=16 has.
    ("tensor=16 (fsdp=16): mesh axes that map onto whole axes of a 16x16 torus",
     {"mesh.ici.tensor": "16"}),
]


def run_case(topology: str, overrides: dict[str, str], what: str, stage: str, log,
             reports: list[dict[str, Any]], config: str = CONFIG) -> bool:
    log(f"== {config} on {topology}, stage {stage}: {what}")
    for label, extra in ATTEMPTS:
        settings = {**overrides, **extra}
        cfg = config_lib.load(config, list(settings.items()))
        t0 = time.perf_counter()
        try:
            report = aot.compile_report(cfg, topology, assumed_mfu=0.5, stage=stage)
        except (ValueError, NotImplementedError) as e:
            log(f"-- {label}: does not build: {str(e).splitlines()[0][:160]}")
            continue
        took = time.perf_counter() - t0
        report.update(config=config, overrides=settings, attempt=label)
        reports.append(report)
        if report["fits"]:
            log(f"-- {label} ({', '.join(f'{k}={v}' for k, v in settings.items())}); "
                f"{took:.0f} s")
            log(aot.format_report(report))
            return True
        total = (report["memory"] or {}).get("total")
        log(f"-- {label}: does not fit ({aot._gib(total)} GiB per chip"
            f"{'; ' + report['error'] if report['error'] else ''})")
    log("-- no attempt fits")
    return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="", help="also write the output to this file, and the "
                                             "reports as JSON beside it (.json)")
    p.add_argument("--config", default=CONFIG,
                   choices=(CONFIG, *OTHER_CASES), help="the recipe whose cases run")
    p.add_argument("--topologies", default=None,
                   help="comma-separated subset of the cases' topologies (default: all)")
    p.add_argument("--stages", default=None, help="comma-separated stages (default: all)")
    args = p.parse_args()
    all_stages, cases = (STAGES, CASES) if args.config == CONFIG else OTHER_CASES[args.config]
    stages = aot.parse_stages(args.stages or ",".join(all_stages))
    topologies = (args.topologies or ",".join(t for t, _, _ in cases)).split(",")
    lines: list[str] = []
    reports: list[dict[str, Any]] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    import jax

    log(f"jax {jax.__version__}, libtpu {importlib.metadata.version('libtpu')}, "
        f"compiled on {os.cpu_count()} CPU cores")
    ok = all([run_case(topology, overrides, what, stage, log, reports, args.config)
              for topology, overrides, what in cases if topology in topologies
              for stage in stages])
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(reports, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
