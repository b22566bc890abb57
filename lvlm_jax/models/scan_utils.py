"""Converts parameters between the scanned layout (one stacked `layers` entry with a leading
layer axis) and the unscanned one (`layers_0`, `layers_1`, ...), so either can load the other."""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import numpy as np

STACKED_NAMES = ("layers", "groups")


def stack_layers(tree: Any, names: tuple[str, ...] = STACKED_NAMES) -> Any:
    """Unscanned -> scanned: {'layers_0': t0, 'layers_1': t1} becomes {'layers': stack(t0, t1)}."""
    if not isinstance(tree, dict):
        return tree
    out: dict[str, Any] = {}
    groups: dict[str, dict[int, Any]] = {}
    for key, value in tree.items():
        m = re.fullmatch(r"(.+)_(\d+)", key)
        if m and m.group(1) in names:
            groups.setdefault(m.group(1), {})[int(m.group(2))] = value
        else:
            out[key] = stack_layers(value, names)
    for name, items in groups.items():
        ordered = [stack_layers(items[i], names) for i in range(len(items))]
        out[name] = _tree_stack(ordered)
    return out


def unstack_layers(tree: Any, names: tuple[str, ...] = STACKED_NAMES) -> Any:
    """Scanned -> unscanned: the inverse of `stack_layers`."""
    if not isinstance(tree, dict):
        return tree
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key in names and isinstance(value, dict):
            n = _leading_dim(value)
            for i in range(n):
                out[f"{key}_{i}"] = unstack_layers(_tree_index(value, i), names)
        else:
            out[key] = unstack_layers(value, names)
    return out


def _tree_stack(trees: list[Any]) -> Any:
    if isinstance(trees[0], dict):
        return {k: _tree_stack([t[k] for t in trees]) for k in trees[0]}
    stack = np.stack if isinstance(trees[0], np.ndarray) else jnp.stack
    return stack(trees)


def _tree_index(tree: Any, i: int) -> Any:
    if isinstance(tree, dict):
        return {k: _tree_index(v, i) for k, v in tree.items()}
    return tree[i]


def _leading_dim(tree: Any) -> int:
    while isinstance(tree, dict):
        tree = next(iter(tree.values()))
    return tree.shape[0]
