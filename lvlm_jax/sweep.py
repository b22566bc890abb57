"""`lvlm sweep`: every point of a sweep file runs as its own `lvlm train` in a sub-workdir named
from its overrides. Finished points are skipped and interrupted ones resume (from their
checkpoint), so rerunning the same command completes a sweep. Ends with the summary table,
summary.csv and curves.png of all points.

A sweep file defines `get_sweep(arg=None) -> list[dict]`: one dict of config overrides
("optimizer.learning_rate": 1e-3, ...) per run, usually built with lvlm_jax.sweep_helpers.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from lvlm_jax import config as config_lib
from lvlm_jax import summarize as summarize_lib

_MAX_NAME = 100
_print = functools.partial(print, flush=True)  # progress shows up in piped logs


@dataclasses.dataclass
class Point:
    """One run of a sweep: its overrides, the sub-workdir they name and its length in steps
    (None when only the run knows it, e.g. train.epochs over a dataset of unknown size)."""

    name: str
    overrides: dict[str, Any]
    workdir: str
    total_steps: int | None


def load_sweep(spec: str) -> list[dict[str, Any]]:
    """`path/to/sweep.py[:arg]` -> the file's get_sweep(arg), checked to be a list of dicts."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"sweep file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_lvlm_sweep_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"sweep file {path!r} has no get_sweep(arg=None)")
    points = module.get_sweep(arg or None)
    if not isinstance(points, list) or not points:
        raise ValueError(f"{path}:get_sweep must return a non-empty list of dicts")
    for i, p in enumerate(points):
        if not isinstance(p, dict) or not all(isinstance(k, str) for k in p):
            raise ValueError(f"{path}:get_sweep point {i} is not a dict of config keys: {p!r}")
    return points


def point_names(points: Sequence[dict[str, Any]]) -> list[str]:
    """A stable, filesystem-safe directory name per point, from its overrides."""
    keys = sorted({k for p in points for k in p})
    short = summarize_lib.short_keys(keys)
    digest = lambda p: hashlib.sha1(json.dumps(p, sort_keys=True, default=repr)
                                    .encode()).hexdigest()[:8]
    names = []
    for p in points:
        text = ",".join(f"{short[k]}={summarize_lib.format_value(p[k])}" for k in sorted(p))
        name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text) or "base"
        if len(name) > _MAX_NAME:
            name = f"{name[:_MAX_NAME - 9]}-{digest(p)}"
        names.append(name)
    counts = collections.Counter(names)
    for i, p in enumerate(points):
        same = [j for j in range(i) if points[j] == p]
        if same:
            raise ValueError(f"sweep points {same[0]} and {i} are the same: {p}")
    # Distinct values that read alike once made filesystem-safe ("a/b" and "a_b") get a hash.
    names = [f"{name}-{digest(p)}" if counts[name] > 1 else name
             for name, p in zip(names, points, strict=True)]
    return names


def plan(config_spec: str, sweep_spec: str, workdir: str,
         overrides: Sequence[tuple[str, str]] = ()) -> list[Point]:
    """The sweep's points, each checked against the config before anything runs: a key not in
    the config (or a value of the wrong type) fails here, naming it."""
    base = config_lib.load(config_spec, overrides)
    points = load_sweep(sweep_spec)
    out = []
    for name, point in zip(point_names(points), points, strict=True):
        cfg = copy.deepcopy(base)
        for key, value in point.items():
            try:
                config_lib.apply_override(cfg, key, summarize_lib.format_value(value))
            except (KeyError, ValueError) as e:
                msg = e.args[0] if e.args else e
                raise ValueError(f"sweep {sweep_spec}: {msg}") from None
        try:
            total = config_lib.total_steps(cfg)
        except ValueError:
            total = None
        out.append(Point(name, dict(point), os.path.join(workdir, name), total))
    return out


def train_args(config_spec: str, point: Point, overrides: Sequence[tuple[str, str]]
               ) -> list[str]:
    """The `lvlm train` arguments of a point: the sweep's overrides come after the common ones,
    so they win."""
    pairs = [*overrides, *((k, summarize_lib.format_value(v)) for k, v in point.overrides.items())]
    return ["train", f"--config={config_spec}", f"--workdir={point.workdir}",
            *(f"--config.{k}={v}" for k, v in pairs)]


def checkpoint_step(workdir: str) -> int | None:
    """The latest complete checkpoint (orbax renames a step's directory to its number only once
    the save has finished)."""
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = [int(n) for n in os.listdir(root) if n.isdigit()
             and os.path.isdir(os.path.join(root, n))]
    return max(steps, default=None)


def is_finished(point: Point) -> bool:
    step = checkpoint_step(point.workdir)
    if step is None:
        return False
    total = point.total_steps
    if total is None:  # the run logs its length when it ends (or is preempted)
        total = next((r["total_steps"] for r in reversed(
            summarize_lib.read_records(point.workdir)) if "total_steps" in r), None)
    return total is not None and step >= total


def _tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(collections.deque(f, maxlen=lines))


def run_sweep(config_spec: str, sweep_spec: str, workdir: str,
              overrides: Sequence[tuple[str, str]] = (), parallel: int = 1,
              print_only: bool = False, sort_by: str | None = None,
              log: Callable[[str], None] = _print) -> int:
    """Runs (or with print_only, prints the `lvlm train` command of) every point; returns the
    exit status: 0 when every point has finished."""
    if parallel < 1:
        raise ValueError(f"--parallel must be at least 1, got {parallel}")
    points = plan(config_spec, sweep_spec, workdir, overrides)
    columns = {"run", *summarize_lib.METRIC_COLUMNS, *(k for p in points for k in p.overrides)}
    if sort_by and sort_by.lstrip("-") not in columns:
        raise ValueError(f"cannot sort by {sort_by.lstrip('-')!r}: the columns are "
                         f"{', '.join(sorted(columns))}")
    if print_only:
        for p in points:
            log(shlex.join(["lvlm", *train_args(config_spec, p, overrides)]))
        return 0
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump({"config": config_spec, "sweep": sweep_spec, "overrides": list(overrides),
                   "points": {p.name: p.overrides for p in points}}, f, indent=2, default=repr)
    n = len(points)
    todo = collections.deque()
    for i, p in enumerate(points, 1):
        if is_finished(p):
            log(f"[{i}/{n}] {p.name}: finished already, skipped")
        else:
            todo.append((i, p))
    running: dict[str, tuple[Point, subprocess.Popen, float]] = {}
    failed = []
    try:
        while todo or running:
            while todo and len(running) < parallel:
                i, p = todo.popleft()
                step = checkpoint_step(p.workdir)
                log(f"[{i}/{n}] {p.name}: " + (f"resuming from step {step}" if step else
                                               "starting"))
                os.makedirs(p.workdir, exist_ok=True)
                with open(os.path.join(p.workdir, "train.log"), "a") as out:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "lvlm_jax", *train_args(config_spec, p, overrides)],
                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                running[p.name] = (p, proc, time.monotonic())
            time.sleep(0.2)
            for name, (p, proc, t0) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[name]
                if rc == 0 and is_finished(p):
                    log(f"{p.name}: finished in {time.monotonic() - t0:.0f}s")
                    continue
                failed.append(p)
                why = f"exit {rc}" if rc else f"stopped at step {checkpoint_step(p.workdir)}"
                log(f"{p.name}: FAILED ({why}); the end of {p.workdir}/train.log:\n"
                    + _tail(os.path.join(p.workdir, "train.log")))
    except KeyboardInterrupt:
        # SIGTERM makes each run save a checkpoint and stop: the next sweep resumes them.
        for _, proc, _ in running.values():
            proc.terminate()
        for _, proc, _ in running.values():
            proc.wait()
        log("interrupted; run the same command again to resume")
        return 130
    log(summarize_lib.summarize([(p.workdir, p.overrides) for p in points], workdir, sort_by))
    if failed:
        log(f"{len(failed)} of {n} runs did not finish: {', '.join(p.name for p in failed)}")
        return 1
    return 0
