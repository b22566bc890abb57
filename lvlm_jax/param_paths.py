"""The one selection mechanism: regexes over '/'-joined parameter paths.

Freezing, learning-rate multipliers, weight-decay masks, LoRA targets and partial checkpoint
loading all select parameters the same way: a path such as `decoder/stack/layers/mlp/up_proj/kernel`
is matched with `re.fullmatch` against the configured patterns; the first rule that matches wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax


def key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_of(keypath: Sequence[Any]) -> str:
    """'/'-joined names of a jax key path (flax boxes contribute no name)."""
    parts = [key_str(k) for k in keypath]
    return "/".join(p for p in parts if p not in ("value",))


def tree_paths(tree: Any) -> Any:
    """A tree of the same structure whose leaves are their own '/'-joined paths."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: path_of(kp), tree)


def flat_paths(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_of(kp): leaf for kp, leaf in leaves}


def as_patterns(patterns: str | Iterable[str] | None) -> list[str]:
    if patterns is None or patterns == "":
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def compile_patterns(patterns: str | Iterable[str] | None) -> list[re.Pattern]:
    out = []
    for p in as_patterns(patterns):
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"invalid parameter regex {p!r}: {e}") from None
    return out


def matches(path: str, patterns: Sequence[re.Pattern]) -> bool:
    return any(p.fullmatch(path) for p in patterns)


def mask_tree(tree: Any, patterns: str | Iterable[str] | None) -> Any:
    """A tree of bools: True where the path matches one of the patterns."""
    compiled = compile_patterns(patterns)
    return jax.tree_util.tree_map_with_path(lambda kp, _: matches(path_of(kp), compiled), tree)


def label_tree(tree: Any, rules: Mapping[str, Any] | Sequence[tuple[str, Any]],
               default: Any) -> Any:
    """A tree of labels: the value of the first (regex, label) rule whose regex matches."""
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    compiled = [(re.compile(p), label) for p, label in items]

    def label(kp, _):
        path = path_of(kp)
        for pattern, value in compiled:
            if pattern.fullmatch(path):
                return value
        return default

    return jax.tree_util.tree_map_with_path(label, tree)


def unmatched_patterns(tree: Any, patterns: str | Iterable[str] | None) -> list[str]:
    """Patterns that select nothing: almost always a typo worth failing on."""
    paths = list(flat_paths(tree))
    return [p for p in as_patterns(patterns) if not any(re.fullmatch(p, x) for x in paths)]
