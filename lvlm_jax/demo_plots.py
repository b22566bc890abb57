"""The `lvlm demo` figures: each stage's loss curve, and images with the model's answers."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lvlm_jax.summarize import curve, read_records, style_step_axes

MATCH_COLOR, MISMATCH_COLOR = "#1a7f37", "#cf222e"


def plot_loss_curves(workdir: str, stages: Sequence[str], out_path: str,
                     metrics: Mapping[str, str] | None = None) -> str:
    """Training loss against step, one panel per stage, read from WORKDIR/<stage>/metrics.jsonl;
    `metrics[stage]` plots another logged metric for that stage (an RL stage's loss mixes
    policy and value terms of any sign: its reward says more). A stage without that file or
    without such records gets a panel that says so. Returns out_path."""
    if not stages:
        raise ValueError("plot_loss_curves needs at least one stage")
    columns = min(len(stages), 4)
    rows = math.ceil(len(stages) / columns)
    fig = _figure((4.0 * columns, 3.3 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for i, (ax, stage) in enumerate(zip(axes, stages, strict=False)):
        path = os.path.join(workdir, stage, "metrics.jsonl")
        metric = (metrics or {}).get(stage, "loss")
        steps, values = curve(read_records(os.path.join(workdir, stage)), metric)
        if steps:
            ax.plot(steps, values, color=f"C{i % 10}", marker="o" if len(steps) < 20 else None,
                    markersize=3)
            # From scratch the first loss is ~ln(vocab), 10-100x the rest: a log axis keeps
            # the rest of the curve readable.
            if min(values) > 0 and max(values) > 10 * min(values):
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, f"no {metric} records" if os.path.exists(path)
                    else "no metrics.jsonl", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
        style_step_axes(ax, stage, metric)
        if not steps:
            ax.set_xticks([])  # the 0..1 of an empty axis would read as data
            ax.set_yticks([])
    for ax in axes[len(stages):]:
        ax.set_axis_off()
    return _save(fig, out_path)


def plot_examples(examples: Sequence[Mapping[str, Any]], out_path: str, columns: int = 4) -> str:
    """A grid of example images: the question above each, `answer: X / reference: Y` below in
    green when they match (stripped, lowercased), else red. Each example has `image` (uint8
    HxWx3), `question`, `answer` (the model's) and `reference`. Returns out_path."""
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    columns = max(min(columns, len(examples)), 1)
    rows = max(math.ceil(len(examples) / columns), 1)
    # About 2.6 inches a cell at 100 dpi: a 64x64 image is drawn ~4x larger.
    fig = _figure((2.6 * columns, 3.3 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, ex in zip(axes, examples, strict=False):
        # Nearest keeps the pixels of a tiny synthetic image sharp instead of blurring them.
        ax.imshow(np.asarray(ex["image"]), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(_wrap(str(ex["question"]), 30), fontsize=8)
        ok = answers_match(ex["answer"], ex["reference"])
        ax.set_xlabel(_wrap(f"answer: {_shown(ex['answer'], 40)} / "
                            f"reference: {_shown(ex['reference'], 30)}", 30),
                      fontsize=8, color=MATCH_COLOR if ok else MISMATCH_COLOR)
        for spine in ax.spines.values():
            spine.set_edgecolor(MATCH_COLOR if ok else MISMATCH_COLOR)
    for ax in axes[len(examples):]:
        ax.set_axis_off()
    if not examples:
        axes[0].text(0.5, 0.5, "no examples", ha="center", va="center", color="gray")
    return _save(fig, out_path)


def answers_match(answer: Any, reference: Any) -> bool:
    """The comparison the figure colours by: equal after stripping and lowercasing."""
    return str(answer).strip().lower() == str(reference).strip().lower()


def _shown(text: Any, width: int) -> str:
    # A long generated answer is cut so the reference after it stays in view.
    return textwrap.shorten(str(text), width, placeholder=" ...") or "(empty)"


def _wrap(text: str, width: int, max_lines: int = 3) -> str:
    # Long questions must not push the grid apart.
    return "\n".join(textwrap.wrap(text, width, max_lines=max_lines, placeholder=" ...") or [""])


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, out_path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100, format="png")
    return out_path
