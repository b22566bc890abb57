"""The `lvlm demo` results tables: one run's, several seeds' (each figure as median and min-max),
and the line naming the date, package versions and CPU they ran on."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

PACKAGES = ("jax", "jaxlib", "flax", "optax", "grain", "orbax-checkpoint", "numpy", "pillow")

# (label, summary key, kind): "pct" figures print as percentages, "loss" with 3 decimals,
# "seconds" as whole seconds; "before -> after" rows name two keys.
ROWS: tuple[tuple[str, str | tuple[str, str], str], ...] = (
    ("held-out caption loss (after pretrain)", "caption_loss", "loss"),
    ("held-out VQA accuracy (after sft)", "vqa_accuracy", "pct"),
    ("@kinds", "", ""),
    ("POPE accuracy (after sft)", "pope_accuracy", "pct"),
    ("POPE F1", "pope_f1", "pct"),
    ("POPE yes-ratio", "pope_yes_ratio", "pct"),
    ("CHAIR-i, sampled descriptions (sft -> dpo)",
     ("hallucination_rate_before", "hallucination_rate_after"), "pct"),
    ("  sampled descriptions with a hallucination",
     ("hallucinated_descriptions_before", "hallucinated_descriptions_after"), "pct"),
    ("  CHAIR-i, greedy descriptions",
     ("hallucination_rate_greedy_before", "hallucination_rate_greedy_after"), "pct"),
    ("dpo reward accuracy (last steps)", "dpo_reward_accuracy", "pct"),
    ("held-out VQA accuracy (after dpo)", "vqa_accuracy_after_dpo", "pct"),
    ("ppo: held-out reward (before -> after)", ("rl_reward_before", "rl_reward_after"), "pct"),
    ("ppo: held-out greedy exact match", ("rl_accuracy_before", "rl_accuracy_after"), "pct"),
    ("grpo: held-out reward (before -> after)", ("grpo_reward_before", "grpo_reward_after"),
     "pct"),
    ("grpo: held-out greedy exact match", ("grpo_accuracy_before", "grpo_accuracy_after"),
     "pct"),
    ("wall time", "wall_seconds", "seconds"),
)


def environment() -> str:
    """One line: the date (UTC), Python and package versions, the CPU model and its cores."""
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{date}; Python {platform.python_version()}, {', '.join(versions)}; "
            f"{cpu_model()}, {cores} cores")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def flatten(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numeric figures of a summary, nested dicts as 'outer/inner' keys."""
    flat: dict[str, float] = {}
    for key, value in summary.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}/{k}": v for k, v in flatten(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)
    return flat


def aggregate(summaries: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """{figure: {median, min, max}} over the runs that report it."""
    flats = [flatten(s) for s in summaries]
    keys = dict.fromkeys(k for f in flats for k in f)
    out = {}
    for key in keys:
        values = [f[key] for f in flats if key in f]
        out[key] = {"median": statistics.median(values), "min": min(values),
                    "max": max(values)}
    return out


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "seconds":
        return f"{value:.0f} s"
    return f"{value:.3f}"


def _rows(flat_keys: Sequence[str]) -> list[tuple[str, str | tuple[str, str], str]]:
    kinds = sorted(k.split("/", 1)[1] for k in flat_keys if k.startswith("vqa_accuracy_by_kind/"))
    rows = []
    for label, key, kind in ROWS:
        if label == "@kinds":
            rows += [(f"  {k} questions", f"vqa_accuracy_by_kind/{k}", "pct") for k in kinds]
        else:
            rows.append((label, key, kind))
    return rows


def _cell(flat: Mapping[str, float], key: str | tuple[str, str], kind: str) -> str:
    if isinstance(key, tuple):
        return " -> ".join(_fmt(flat.get(k), kind) for k in key)
    return _fmt(flat.get(key), kind)


def _render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: (f"{r[0]:<{widths[0]}}" + "".join(  # noqa: E731
        f"  {c:>{w}}" for c, w in zip(r[1:], widths[1:], strict=True))).rstrip()
    return [line(header), "-" * len(line(["-" * w for w in widths])), *map(line, rows)]


def format_table(summary: Mapping[str, Any], env: str | None = None) -> str:
    """One run's results table, under the line naming where it ran."""
    flat = flatten(summary)
    rows = [(label, _cell(flat, key, kind)) for label, key, kind in _rows(list(flat))]
    lines = ["", "lvlm demo results", env or environment(), *_render(["", "value"], rows)]
    return "\n".join(lines)


def format_seeds_table(summaries: Sequence[Mapping[str, Any]], seeds: Sequence[int],
                       env: str | None = None) -> str:
    """Every figure of every seed, then its median and min-max over the seeds."""
    flats = [flatten(s) for s in summaries]
    stats = aggregate(summaries)
    header = ["", *(f"seed {s}" for s in seeds), "median", "min - max"]
    rows = []
    for label, key, kind in _rows(list(stats)):
        cells = [_cell(f, key, kind) for f in flats]
        if isinstance(key, tuple):
            median = " -> ".join(_fmt(stats.get(k, {}).get("median"), kind) for k in key)
            spread = "" if key[1] not in stats else (
                f"{_fmt(stats[key[1]]['min'], kind)} - {_fmt(stats[key[1]]['max'], kind)}")
        else:
            median = _fmt(stats.get(key, {}).get("median"), kind)
            spread = "" if key not in stats else (
                f"{_fmt(stats[key]['min'], kind)} - {_fmt(stats[key]['max'], kind)}")
        rows.append([label, *cells, median, spread])
    title = f"lvlm demo results, {len(seeds)} seeds (min - max: of the figure after the arrow)"
    return "\n".join(["", title, env or environment(), *_render(header, rows)])
