"""The optimizer as a readable optax chain, built from the `optimizer` config section.

    clip_by_global_norm
    -> multi_transform by parameter group (selected by regexes over parameter paths):
         frozen:        set_to_zero          (no optimizer state, never changes, no weight decay)
         lr x m groups: adamw / adafactor / sgd with the schedule scaled by m and a decay mask

Weight decay skips norms, biases and embeddings by default (`wd_exclude`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lvlm_jax.param_paths import as_patterns, label_tree, mask_tree, unmatched_patterns

FROZEN = "frozen"
DEFAULT_WD_EXCLUDE = (r".*(norm|layernorm|layer_norm\d?|ln_\w+)/(scale|bias)", r".*/bias",
                      r".*embed_tokens/embedding", r".*position_embedding",
                      r".*class_embedding", r".*_gate", r".*/queries", r".*/probe")


def make_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Warmup (steps or a fraction of training) then cosine / linear / constant / rsqrt."""
    lr = float(cfg["learning_rate"])
    warmup = cfg.get("warmup_steps", 0) or 0
    if isinstance(warmup, float) and warmup < 1:
        warmup = int(round(warmup * total_steps))
    warmup = int(warmup)
    kind = cfg.get("schedule", "cosine")
    decay_steps = max(total_steps - warmup, 1)
    end = lr * float(cfg.get("end_lr_fraction", 0.0))
    if kind == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif kind == "linear":
        main = optax.linear_schedule(lr, end, decay_steps)
    elif kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "rsqrt":
        timescale = max(warmup, 1)
        main = lambda step: lr * jnp.sqrt(timescale / (step + timescale))  # noqa: E731
    else:
        raise ValueError(f"unknown optimizer.schedule {kind!r}; expected cosine, linear, "
                         "constant or rsqrt")
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _base(cfg: Mapping[str, Any], schedule: optax.Schedule,
          wd_mask: Any) -> optax.GradientTransformation:
    name = cfg.get("name", "adamw")
    wd = float(cfg.get("weight_decay", 0.0))
    if name == "adamw":
        return optax.adamw(schedule, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                           eps=cfg.get("eps", 1e-8), weight_decay=wd, mask=wd_mask)
    if name == "adafactor":
        return optax.chain(
            optax.adafactor(schedule, weight_decay_rate=None, multiply_by_parameter_scale=False),
            optax.add_decayed_weights(wd, wd_mask) if wd else optax.identity(),
        )
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(wd, wd_mask) if wd else optax.identity(),
                           optax.sgd(schedule, momentum=cfg.get("momentum", 0.0) or None))
    raise ValueError(f"unknown optimizer.name {name!r}; expected adamw, adafactor or sgd")


def param_labels(params: Any, cfg: Mapping[str, Any]) -> Any:
    """Each parameter's group: 'frozen', or 'lr_x{multiplier}'."""
    rules: list[tuple[str, str]] = [(p, FROZEN) for p in as_patterns(cfg.get("freeze"))]
    for pattern, mult in dict(cfg.get("lr_multipliers") or {}).items():
        rules.append((pattern, f"lr_x{float(mult)}"))
    return label_tree(params, rules, "lr_x1.0")


def check_patterns(params: Any, cfg: Mapping[str, Any]) -> None:
    """A freeze / multiplier pattern that matches no parameter is a typo: say so, early."""
    for field in ("freeze", "lr_multipliers"):
        pats = as_patterns(cfg.get(field)) if field == "freeze" else list(
            dict(cfg.get(field) or {}))
        bad = unmatched_patterns(params, pats)
        if bad:
            raise ValueError(f"optimizer.{field} pattern {bad[0]!r} matches no parameter")


def make_optimizer(cfg: Mapping[str, Any], params: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain and the base learning-rate schedule (for logging)."""
    check_patterns(params, cfg)
    schedule = make_schedule(cfg, total_steps)
    labels = param_labels(params, cfg)
    wd_mask = jax.tree.map(lambda x: not x, mask_tree(params, cfg.get("wd_exclude",
                                                                      DEFAULT_WD_EXCLUDE)))
    groups: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    for label in set(jax.tree.leaves(labels)) - {FROZEN}:
        mult = float(label.removeprefix("lr_x"))
        scaled = (lambda s, m: (lambda step: s(step) * m))(schedule, mult)
        groups[label] = _base(cfg, scaled, wd_mask)
    parts = []
    if cfg.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(float(cfg["grad_clip_norm"])))
    parts.append(optax.multi_transform(groups, labels))
    return optax.chain(*parts), schedule


def trainable_mask(params: Any, cfg: Mapping[str, Any]) -> Any:
    """True for every parameter the optimizer updates."""
    return jax.tree.map(lambda label: label != FROZEN, param_labels(params, cfg))
