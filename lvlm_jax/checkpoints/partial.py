"""Partial loading for stage chaining: take another run's parameters whole, or only those
whose paths match regexes (vision only, LM only, connector only), and say what happened."""

from __future__ import annotations

from typing import Any

import numpy as np

from lvlm_jax.checkpoints.vocab_resize import NEW_ROWS, grow_vocab
from lvlm_jax.param_paths import compile_patterns, flat_paths, matches


def merge_params(own: Any, loaded: Any, include: Any = None) -> tuple[Any, str]:
    """`own` with every selected parameter replaced by `loaded`'s.

    Returns the merged tree and a one-line report of what was loaded, what was missing (in
    `own` but not in `loaded`) and what was unexpected (in `loaded` but not in `own`). An
    embedding or LM head with fewer vocabulary rows than `own`'s grows (vocab_resize.py, named
    in the report); any other shape mismatch fails naming the parameter and both shapes.
    """
    import jax

    patterns = compile_patterns(include)
    mine, theirs = flat_paths(own), flat_paths(loaded)
    selected = {p for p in mine if not patterns or matches(p, patterns)}
    loaded_paths, missing, grown = [], [], []
    for path in sorted(selected):
        if path not in theirs:
            missing.append(path)
            continue
        a, b = mine[path], theirs[path]
        if tuple(a.shape) != tuple(np.shape(b)):
            # An embedding or LM head with fewer vocabulary rows grows; anything else fails.
            theirs[path] = grow_vocab(path, b, tuple(a.shape))
            grown.append(f"{path} {tuple(np.shape(b))} -> {tuple(a.shape)}")
        loaded_paths.append(path)
    unexpected = sorted(p for p in theirs if p not in mine and (not patterns
                                                                 or matches(p, patterns)))
    take = set(loaded_paths)

    def pick(kp, x):
        from lvlm_jax.param_paths import path_of

        path = path_of(kp)
        if path not in take:
            return x
        value = theirs[path]
        # Arrays already on their devices (restored onto this run's shardings) stay there.
        return value.astype(x.dtype) if isinstance(value, jax.Array) else (
            np.asarray(value).astype(x.dtype))

    merged = jax.tree_util.tree_map_with_path(pick, own)
    report = (f"loaded {len(loaded_paths)} parameters, missing {len(missing)}"
              + (f" ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
                 if missing else "")
              + f", unexpected {len(unexpected)}"
              + (f" ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
                 if unexpected else "")
              + (f"; grew to the model's vocabulary: {', '.join(grown)} (new rows: {NEW_ROWS})"
                 if grown else ""))
    return merged, report
