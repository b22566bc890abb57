"""The `lvlm` command (also `python -m lvlm_jax`): demo, train, generate, compile, import, export.

Subcommands take `--config=FILE[:ARG]` plus `--config.a.b=value` overrides on a locked config;
a mistyped key fails with one line naming it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
from collections.abc import Sequence


def _eval_overrides(args: argparse.Namespace) -> list[tuple[str, str]]:
    """`lvlm eval`'s --tasks, --data_dir and --limit as config overrides."""
    out = []
    if args.tasks is not None:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        out.append(("evals.tasks", repr(tuple(names))))
    if args.data_dir is not None:
        out.append(("evals.data_dir", args.data_dir))
    if args.limit is not None:
        out.append(("evals.num_examples", str(args.limit)))
    return out


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
    d = sub.add_parser("demo", help="pretrain -> sft -> dpo -> ppo of a tiny LVLM on built-in "
                       "data, on CPU")
    d.add_argument("--workdir", required=True)
    d.add_argument("--seeds", type=int, default=1,
                   help="run the demo for seeds 0..N-1, each in WORKDIR/seed_K/, and print each "
                        "figure's median and min-max; 1: one run in WORKDIR itself")
    t = sub.add_parser("train", help="train the stage named by config.stage")
    _add_config(t)
    t.add_argument("--workdir", required=True)
    _add_distributed(t)
    ev = sub.add_parser("eval", help="run the configured evaluators (evals.tasks) on a "
                                     "checkpoint of a training workdir")
    _add_config(ev)
    ev.add_argument("--workdir", required=True, help="the training workdir")
    ev.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    ev.add_argument("--tasks", default=None,
                    help="comma-separated tasks (evals.tasks), e.g. docvqa,chartqa,mmbench")
    ev.add_argument("--data_dir", default=None,
                    help="the benchmarks' released files, each in DATA_DIR/<task>/ "
                         "(evals.data_dir)")
    ev.add_argument("--limit", type=int, default=None,
                    help="examples per task (evals.num_examples); 0: every one")
    c = sub.add_parser("compile", help="AOT-compile the train step for a TPU topology: memory, "
                                       "collectives, roofline step time and MFU")
    _add_config(c)
    c.add_argument("--topology", required=True, help="e.g. v5p-64, v5e-256, v6e-64, v5p:4x4x4")
    c.add_argument("--num_slices", type=int, default=1)
    c.add_argument("--assumed_mfu", type=float, default=0.5,
                   help="the MFU used to turn FLOPs into an implied step time")
    c.add_argument("--stages", default=None,
                   help="comma-separated stages to compile with this config, one report each "
                        "(e.g. pretrain,sft,dpo,ppo); default: the config's own stage")
    c.add_argument("--json", default=None, metavar="PATH",
                   help="also write the reports (a list, one per stage) as JSON")
    e = sub.add_parser("export", help="a training workdir -> params-only or HF folder")
    e.add_argument("--checkpoint", required=True, help="the training workdir")
    e.add_argument("--format", default="hf", choices=("hf", "params"))
    e.add_argument("--out", required=True)
    e.add_argument("--step", type=int, default=None)
    g = sub.add_parser("generate", help="answer a prompt about images or videos with a trained "
                                        "run")
    g.add_argument("--checkpoint", required=True,
                   help="a training workdir, or a params-only checkpoint with the run's "
                        "config.json beside it")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image; repeat for several (one <image> each, in order); any-res "
                        "models (model.image_grid_pinpoints) get it tiled")
    g.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="a video file or a folder of frame images; repeat for several (one "
                        "<video> each, in order)")
    g.add_argument("--num_frames", type=int, default=None,
                   help="frames sampled uniformly from each video (default: the run's "
                        "data.num_frames, else 8)")
    g.add_argument("--prompt", default=None,
                   help="the question; with --chat, the optional first turn")
    g.add_argument("--chat", action="store_true",
                   help="a multi-turn session on stdin, one turn a line; /quit or EOF ends")
    g.add_argument("--max_new_tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top_k", type=int, default=0, help="0 = no top-k filter")
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    sw = sub.add_parser("sweep", help="run (or print) every `lvlm train` of a sweep file, then "
                                      "summarize them; --config.x=... applies to every run")
    _add_config(sw)
    sw.add_argument("--sweep", required=True, help="experiments/sweeps/FILE.py[:ARG]")
    sw.add_argument("--workdir", required=True, help="each run goes to a subdirectory of it")
    sw.add_argument("--parallel", type=int, default=1, help="runs at a time")
    sw.add_argument("--print_only", action="store_true",
                    help="print one `lvlm train` command per run (for a job array); run nothing")
    sw.add_argument("--sort_by", default=None,
                    help="summary column (default eval_loss, else loss); -NAME for descending")
    sm = sub.add_parser("summarize", help="table, summary.csv and curves.png of run workdirs")
    sm.add_argument("dirs", nargs="+", metavar="DIR", help="run workdirs, or sweep dirs")
    sm.add_argument("--out", default=None, help="where summary.csv and curves.png go "
                                                "(default: DIR, or the DIRs' common parent)")
    sm.add_argument("--sort_by", default=None,
                    help="summary column (default eval_loss, else loss); -NAME for descending")
    i = sub.add_parser("import", help="an HF folder (LLaVA, LLaVA-NeXT(-Video), OneVision, "
                                      "PaliGemma, DeepSeek-VL) -> params-only checkpoint")
    i.add_argument("--hf", required=True)
    i.add_argument("--out", required=True)
    dt = sub.add_parser("data", help="dataset tools")
    dsub = dt.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("convert", help="LLaVA JSON, caption JSONL or preference JSON -> "
                                         "ArrayRecord shards for --config.data.path")
    dc.add_argument("--format", required=True, help="llava | captions | preferences")
    dc.add_argument("--input", required=True, help="a JSON list or JSONL file")
    dc.add_argument("--images", default=None,
                    help="the folder image and video paths are relative to (default: the "
                         "input's)")
    dc.add_argument("--out", required=True, help="a new or empty folder for the shards")
    dc.add_argument("--num_shards", type=int, default=None,
                    help="default: one per 50,000 records")
    dc.add_argument("--workers", type=int, default=None, help="processes; default: all cores")
    dc.add_argument("--max_pixels", type=int, default=None,
                    help="larger images are skipped (default: PIL's decompression-bomb limit)")
    dtt = dsub.add_parser("train-tokenizer", help="a sentencepiece model for --config.data."
                                                  "tokenizer, with <image> and the chat "
                                                  "templates' markers as single pieces")
    dtt.add_argument("--input", required=True,
                     help="text files, comma-separated; one sentence or document a line")
    dtt.add_argument("--vocab_size", type=int, required=True,
                     help="an upper bound: a small corpus gives fewer pieces")
    dtt.add_argument("--out", required=True, help="PREFIX: writes PREFIX.model, PREFIX.vocab")
    dtt.add_argument("--model_type", default="bpe", choices=("bpe", "unigram"))
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


def _generate(args: argparse.Namespace) -> int:
    from lvlm_jax import chat

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    media = dict(video_paths=args.video, num_frames=args.num_frames)
    if not args.chat:
        if args.prompt is None:
            raise chat.BadInput("the prompt is empty; give --prompt=TEXT (or --chat)")
        chat.check_request(args.image, args.prompt, **media, **sampling)  # before the slow load
        print(chat.answer(chat.load(args.checkpoint), args.image, args.prompt, **media,
                          **sampling))
        return 0
    chat.check_sampling(**sampling)
    chat.check_image_files(args.image)
    chat.chat_media.check_videos(args.video, args.num_frames)
    turns = [args.prompt] if args.prompt else []
    bot = chat.load(args.checkpoint)
    try:
        chat.chat(bot, args.image, itertools.chain(turns, sys.stdin), sys.stdout, sys.stderr,
                  interactive=sys.stdin.isatty(), **media, **sampling)
    except KeyboardInterrupt:  # Ctrl-C ends a session as /quit does, without a traceback
        print(file=sys.stderr)
        return 130
    return 0


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
            from lvlm_jax.demo import run_demo, run_demo_seeds

            if args.seeds == 1:
                run_demo(args.workdir, overrides)
            else:
                run_demo_seeds(args.workdir, args.seeds, overrides)
            return 0
        if args.command == "export":
            from lvlm_jax.checkpoints.export import export_checkpoint

            print(export_checkpoint(args.checkpoint, args.format, args.out, args.step))
            return 0
        if args.command == "import":
            from lvlm_jax.checkpoints.export import import_to_params_only

            print(import_to_params_only(args.hf, args.out))
            return 0
        if args.command == "generate":
            return _generate(args)
        if args.command == "data" and args.data_command == "train-tokenizer":
            from data_pipelines import tokenizer

            print(tokenizer.train_corpus_files(args.input.split(","), args.out,
                                               args.vocab_size, args.model_type))
            return 0
        if args.command == "data":
            from data_pipelines import convert

            extra = {} if args.max_pixels is None else {"max_pixels": args.max_pixels}
            report = convert.convert(args.format, args.input, args.images, args.out,
                                     num_shards=args.num_shards, workers=args.workers, **extra)
            print(report.summary())
            return 0
        if args.command == "sweep":
            from lvlm_jax import sweep

            return sweep.run_sweep(args.config, args.sweep, args.workdir, overrides,
                                   parallel=args.parallel, print_only=args.print_only,
                                   sort_by=args.sort_by)
        if args.command == "summarize":
            from lvlm_jax import summarize

            print(summarize.summarize_dirs(args.dirs, args.out, args.sort_by))
            return 0
        if args.command == "eval":
            overrides = [*overrides, *_eval_overrides(args)]
        cfg = config_lib.load(args.config, overrides)
        if args.command == "train":
            maybe_initialize_distributed(args)
            from lvlm_jax.train import loop

            loop.train(cfg, args.workdir)
            return 0
        if args.command == "eval":
            from lvlm_jax.evaluate import evaluate_checkpoint, format_summary

            step, figures = evaluate_checkpoint(cfg, args.workdir, args.step)
            print(format_summary(step, figures, args.workdir))
            return 0
        if args.command == "compile":
            # Compiling for a TPU topology needs libtpu, not a local TPU: keep jax on the CPU.
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
            from lvlm_jax import aot

            stages = aot.parse_stages(args.stages or cfg.stage)  # a typo fails before compiling
            aot.parse_topology(args.topology)
            reports = []
            for stage in stages:
                reports.append(aot.compile_report(cfg, args.topology, num_slices=args.num_slices,
                                                  assumed_mfu=args.assumed_mfu, stage=stage))
                print(("\n" if len(reports) > 1 else "") + aot.format_report(reports[-1]),
                      flush=True)
            if args.json:
                os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                with open(args.json, "w") as f:
                    json.dump(reports, f, indent=1)
            return 0 if all(r["fits"] for r in reports) else 1
    except (KeyError, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lvlm {args.command}: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
