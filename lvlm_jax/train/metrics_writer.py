"""Writes metrics to the workdir: metrics.jsonl (one object per logged step or eval) and
TensorBoard events under tb/ (scalars, and images of rendered eval examples). Only process 0
writes."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def _plain(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray, jax.Array)):
        v = np.asarray(v).item() if np.ndim(v) == 0 else np.asarray(v).tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter

                    self._tb = SummaryWriter(os.path.join(workdir, "tb"))
                except ImportError:  # TensorBoard events are optional; JSONL always exists
                    self._tb = None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """uint8 [H, W, 3] images as TensorBoard image summaries, one per tag."""
        if self._tb is None:
            return
        for tag, image in images.items():
            self._tb.add_image(tag, np.asarray(image), step, dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
