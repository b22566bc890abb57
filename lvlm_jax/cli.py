"""The `lvlm` command (also `python -m lvlm_jax`): demo, train, compile, import, export.

Subcommands take `--config=FILE[:ARG]` plus `--config.a.b=value` overrides on a locked config;
a mistyped key fails with one line naming it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required,
                   help="experiments/FILE.py[:ARG]; override fields with --config.a.b=value")


def _add_distributed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (also detected on TPU pods and under SLURM)")
    g.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
    g.add_argument("--num_processes", type=int, default=None)
    g.add_argument("--process_id", type=int, default=None)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvlm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="pretrain -> sft of a tiny LVLM on built-in data, on CPU")
    d.add_argument("--workdir", required=True)
    t = sub.add_parser("train", help="train the stage named by config.stage")
    _add_config(t)
    t.add_argument("--workdir", required=True)
    _add_distributed(t)
    c = sub.add_parser("compile", help="AOT-compile the train step for a TPU topology")
    _add_config(c)
    c.add_argument("--topology", required=True, help="e.g. v5p-64, v5e-256, v6e-64, v5p:4x4x4")
    c.add_argument("--num_slices", type=int, default=1)
    c.add_argument("--assumed_mfu", type=float, default=0.5,
                   help="the MFU used to turn FLOPs into an implied step time")
    e = sub.add_parser("export", help="a training workdir -> params-only or HF folder")
    e.add_argument("--checkpoint", required=True, help="the training workdir")
    e.add_argument("--format", default="hf", choices=("hf", "params"))
    e.add_argument("--out", required=True)
    e.add_argument("--step", type=int, default=None)
    i = sub.add_parser("import", help="an HF folder (LLaVA, PaliGemma) -> params-only checkpoint")
    i.add_argument("--hf", required=True)
    i.add_argument("--out", required=True)
    return p


def maybe_initialize_distributed(args: argparse.Namespace) -> None:
    """jax.distributed.initialize from flags, or from a TPU pod / SLURM environment."""
    import jax

    if args.coordinator_address or args.num_processes:
        missing = [n for n in ("coordinator_address", "num_processes", "process_id")
                   if getattr(args, n) is None]
        if missing:
            raise SystemExit(f"lvlm: multi-host needs --{', --'.join(missing)} as well")
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            # Several CPU processes (tests, laptops) exchange collectives over gloo.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator_address, args.num_processes,
                                   args.process_id)
    elif "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        jax.distributed.initialize()
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()


def _quiet_libtpu_on_hosts_without_tpus() -> None:
    """With libtpu installed (the `tpu` extra, for AOT compiles) jax probes for TPUs at start-up
    and prints pages of errors on a machine that has none; skip the probe there."""
    import glob

    if "JAX_PLATFORMS" in os.environ or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*"):
        return
    if "TPU_ACCELERATOR_TYPE" in os.environ or "TPU_WORKER_HOSTNAMES" in os.environ:
        return
    os.environ["JAX_PLATFORMS"] = "cuda,cpu" if glob.glob("/dev/nvidia*") else "cpu"


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libtpu_on_hosts_without_tpus()
    from lvlm_jax import config as config_lib

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = config_lib.split_overrides(argv)
    except ValueError as e:
        print(f"lvlm: {e}", file=sys.stderr)
        return 2
    args = parser().parse_args(rest)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            from lvlm_jax.demo import run_demo

            run_demo(args.workdir, overrides)
            return 0
        if args.command == "export":
            from lvlm_jax.checkpoints.export import export_checkpoint

            print(export_checkpoint(args.checkpoint, args.format, args.out, args.step))
            return 0
        if args.command == "import":
            from lvlm_jax.checkpoints.export import import_to_params_only

            print(import_to_params_only(args.hf, args.out))
            return 0
        cfg = config_lib.load(args.config, overrides)
        if args.command == "train":
            maybe_initialize_distributed(args)
            from lvlm_jax.train import loop

            loop.train(cfg, args.workdir)
            return 0
        if args.command == "compile":
            # Compiling for a TPU topology needs libtpu, not a local TPU: keep jax on the CPU.
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
            from lvlm_jax import aot

            report = aot.compile_report(cfg, args.topology, num_slices=args.num_slices,
                                        assumed_mfu=args.assumed_mfu)
            print(aot.format_report(report))
            return 0 if report["fits"] else 1
    except (KeyError, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lvlm {args.command}: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
