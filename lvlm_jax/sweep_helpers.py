"""Building blocks of sweep files: grids, zipped axes and seeded random search over config keys.

Each helper takes axes as keyword arguments named by config path and returns a list of override
dicts, one per run. Config paths contain dots, so pass them by unpacking a dict:

    product(**{"optimizer.learning_rate": [1e-3, 3e-3], "optimizer.weight_decay": [0.0, 0.1]})

Lists of points combine with `+` (a union of sweeps) and `cross` (every pair, merged).
"""

from __future__ import annotations

import builtins
import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Point = dict[str, Any]


def _check_axes(axes: Mapping[str, Any], what: str) -> None:
    if not axes:
        raise ValueError(f"{what}() needs at least one axis")
    for key, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"{what}(): axis {key!r} must be a list of values, got {values!r}")
        if not values:
            raise ValueError(f"{what}(): axis {key!r} has no values")


def product(**axes: Sequence[Any]) -> list[Point]:
    """Every combination of the axes' values (the last axis varies fastest)."""
    _check_axes(axes, "product")
    keys = list(axes)
    return [dict(builtins.zip(keys, combo, strict=True))
            for combo in itertools.product(*(axes[k] for k in keys))]


def zip(**axes: Sequence[Any]) -> list[Point]:  # shadows the builtin: sweep files say zip()
    """The i-th point takes the i-th value of every axis; all axes must be equally long."""
    _check_axes(axes, "zip")
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"zip(): axes have different lengths {lengths}")
    n = next(iter(lengths.values()))
    return [{k: v[i] for k, v in axes.items()} for i in range(n)]


def loguniform(low: float, high: float) -> Callable[[random.Random], float]:
    """A distribution for `choice`: log-uniform on [low, high] (learning rates, decays)."""
    if not 0 < low < high:
        raise ValueError(f"loguniform() needs 0 < low < high, got {low}, {high}")
    return lambda rng: math.exp(rng.uniform(math.log(low), math.log(high)))


def uniform(low: float, high: float) -> Callable[[random.Random], float]:
    """A distribution for `choice`: uniform on [low, high]."""
    if not low < high:
        raise ValueError(f"uniform() needs low < high, got {low}, {high}")
    return lambda rng: rng.uniform(low, high)


def choice(n: int, seed: int, **axes: Sequence[Any] | Callable[[random.Random], Any]
           ) -> list[Point]:
    """Random search: `n` points, each axis drawn independently from its list of values (or from
    a distribution such as `loguniform`). The same seed gives the same points."""
    if n < 1:
        raise ValueError(f"choice() needs n >= 1, got {n}")
    if not axes:
        raise ValueError("choice() needs at least one axis")
    lists = {k: v for k, v in axes.items() if not callable(v)}
    if lists:
        _check_axes(lists, "choice")
    rng = random.Random(seed)
    # Floats drawn from distributions are rounded to 4 significant digits: run names and
    # command lines stay short, and no search is that sensitive.
    draw = lambda v: float(f"{v(rng):.4g}") if callable(v) else rng.choice(list(v))
    return [{k: draw(v) for k, v in axes.items()} for _ in range(n)]


def cross(*sweeps: Sequence[Point]) -> list[Point]:
    """Every combination of one point from each sweep, merged (keys must not overlap)."""
    out = []
    for combo in itertools.product(*sweeps):
        merged: Point = {}
        for p in combo:
            overlap = set(merged) & set(p)
            if overlap:
                raise ValueError(f"cross(): sweeps share the keys {sorted(overlap)}")
            merged.update(p)
        out.append(merged)
    return out
