"""Run summaries: one row per training workdir (its overrides, final and best metrics), printed
as a table and written as summary.csv and curves.png. Serves `lvlm summarize` and `lvlm sweep`.

Reads only each run's metrics.jsonl and config.json, so it needs no jax and works on runs that
are still going or were cut off.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

# Metric columns, in table order; eval and timing columns appear only when some run has them.
METRIC_COLUMNS = ("status", "steps", "loss", "eval_loss", "best_eval_loss", "compile_seconds",
                  "train_seconds")


def read_records(workdir: str) -> list[dict[str, Any]]:
    """metrics.jsonl of a run; a line cut off by a killed process is ignored."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def curve(records: Sequence[Mapping[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a metric; a resumed run logs some steps twice and the later one wins."""
    by_step: dict[int, float] = {}
    for r in records:
        v = _number(r.get(metric))
        if v is not None:
            by_step[int(r["step"])] = v
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def metrics_row(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Final and best metrics of one run; `status` is done when it reached its total_steps."""
    steps, losses = curve(records, "loss")
    _, evals = curve(records, "eval_loss")
    last = lambda key: next((r[key] for r in reversed(records) if key in r), None)
    total = last("total_steps")
    done = total is not None and bool(steps) and steps[-1] >= total
    return {
        "status": "done" if done else ("partial" if steps else "no metrics"),
        "steps": steps[-1] if steps else None,
        "loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
        "compile_seconds": _number(last("compile_seconds")),
        # Each invocation (first run, each resume) logs its own wall time.
        "train_seconds": sum(_number(r.get("train_seconds")) or 0.0 for r in records)
        if any("train_seconds" in r for r in records) else None,
    }


def find_runs(dirs: Sequence[str]) -> list[str]:
    """Each DIR that is a run workdir, or the run workdirs directly inside it (a sweep dir)."""
    runs = []
    is_run = lambda d: any(os.path.exists(os.path.join(d, f))
                           for f in ("metrics.jsonl", "config.json"))
    for d in dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{d!r} is not a directory")
        if is_run(d):
            runs.append(d)
            continue
        inside = sorted(os.path.join(d, n) for n in os.listdir(d)
                        if is_run(os.path.join(d, n)))
        if not inside:
            raise FileNotFoundError(f"{d!r} holds no run (no metrics.jsonl or config.json in it "
                                    "or in its subdirectories)")
        runs.extend(inside)
    return runs


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def infer_overrides(configs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each config, the dotted keys whose values are not the same in all of them."""
    flat = [_flatten(c) for c in configs]
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    return [{k: f.get(k) for k in differing} for f in flat]


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key -> its shortest trailing part that no other key ends with."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(o != key and (o == tail or o.endswith("." + tail)) for o in keys):
                break
        out[key] = tail
    return out


def format_value(v: Any) -> str:
    """A config value as it reads in labels, names and --config overrides."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, tuple):
        v = list(v)
    return repr(v)


def label(overrides: Mapping[str, Any], fallback: str) -> str:
    if not overrides:
        return fallback
    names = short_keys(list(overrides))
    return ", ".join(f"{names[k]}={format_value(v)}" for k, v in overrides.items())


def sort_rows(rows: list[dict[str, Any]], sort_by: str | None) -> tuple[list[dict], str]:
    """Rows by a column (default eval_loss when any run has it, else loss), ascending; a leading
    '-' sorts descending. Rows without the value go last."""
    if not sort_by:
        sort_by = "eval_loss" if any(r.get("eval_loss") is not None for r in rows) else "loss"
    key = sort_by.lstrip("-")
    columns = {c for r in rows for c in r}
    if rows and key not in columns:
        raise ValueError(f"cannot sort by {key!r}: the columns are {', '.join(sorted(columns))}")
    present = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]
    present.sort(key=lambda r: (isinstance(r[key], str), r[key]), reverse=sort_by.startswith("-"))
    return present + missing, sort_by


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return format_value(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                 headers: Mapping[str, str]) -> str:
    cells = [[headers.get(c, c) for c in columns]]
    cells += [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(s.ljust(w) for s, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else
                        (repr(r[c]) if isinstance(r[c], float) else format_value(r[c]))
                        for c in columns])


def style_step_axes(ax: Any, title: str, ylabel: str) -> None:
    """A metric-against-step panel: title, whole-number steps, a light grid, a legend when some
    line has a label."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_curves(runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], path: str) -> None:
    """Training loss (and held-out loss, when logged) against step, one line per run."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display

    has_eval = any(curve(records, "eval_loss")[0] for _, records in runs)
    panels = [("loss", "training loss", "loss")]
    if has_eval:
        panels.append(("eval_loss", "held-out loss", "eval loss"))
    fig = Figure(figsize=(6.5 * len(panels), 4.5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, title, ylabel) in zip(axes, panels, strict=True):
        for i, (name, records) in enumerate(runs):
            steps, values = curve(records, metric)
            if steps:
                ax.plot(steps, values, label=name, color=f"C{i % 10}",
                        marker="o" if metric == "eval_loss" or len(steps) < 20 else None,
                        markersize=3)
        style_step_axes(ax, title, ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summarize(runs: Sequence[tuple[str, Mapping[str, Any]]], out_dir: str,
              sort_by: str | None = None) -> str:
    """runs: (workdir, overrides) pairs. Writes OUT/summary.csv and OUT/curves.png; returns the
    table text."""
    names = [os.path.basename(os.path.normpath(d)) for d, _ in runs]
    if len(set(names)) < len(names):  # runs of different sweeps may share a point name
        names = [os.path.normpath(d) for d, _ in runs]
    keys = list(dict.fromkeys(k for _, o in runs for k in o))
    rows, records_of = [], []
    for name, (workdir, overrides) in zip(names, runs, strict=True):
        records = read_records(workdir)
        rows.append({"run": name, **{k: overrides.get(k) for k in keys},
                     **metrics_row(records)})
        records_of.append((label(overrides, name), records))
    rows, sort_by = sort_rows(rows, sort_by)
    columns = ["run", *keys] + [c for c in METRIC_COLUMNS
                                if c in ("status", "steps", "loss")
                                or any(r.get(c) is not None for r in rows)]
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, columns, os.path.join(out_dir, "summary.csv"))
    plot_curves(records_of, os.path.join(out_dir, "curves.png"))
    table = format_table(rows, columns, short_keys(keys))
    return (f"{table}\n\nsorted by {sort_by}; wrote {os.path.join(out_dir, 'summary.csv')} "
            f"and {os.path.join(out_dir, 'curves.png')}")


def summarize_dirs(dirs: Sequence[str], out_dir: str | None = None,
                   sort_by: str | None = None) -> str:
    """`lvlm summarize`: overrides are what differs between the runs' config.json files."""
    runs = find_runs(dirs)
    overrides = infer_overrides([_read_config(d) for d in runs])
    if out_dir is None:
        out_dir = dirs[0] if len(dirs) == 1 else os.path.commonpath(
            [os.path.abspath(d) for d in dirs])
    return summarize(list(zip(runs, overrides, strict=True)), out_dir, sort_by)


def _read_config(workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
