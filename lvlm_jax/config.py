"""Experiment configs: loading `--config=FILE[:ARG]`, `--config.a.b=value` overrides on a locked
ConfigDict, the shared defaults every experiment starts from, and durations."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict


def base_config() -> ConfigDict:
    """The sections and defaults every experiment has; files override what they need."""
    c = ConfigDict()
    c.stage = "sft"
    c.seed = 0
    c.model = ConfigDict({
        "vision": {"preset": "tiny"},
        "language": {"preset": "tiny"},
        "connector": {"kind": "projector", "projector": "mlp2x_gelu"},
        "image_token_id": -1,  # -1: the tokenizer's <image> id
        "prefix_lm": False,
    })
    c.data = ConfigDict({
        "source": "synthetic",  # synthetic | arrayrecord (data.path) | tfds (data.tfds)
        "path": "",
        "tfds": "",
        "kind": "conversation",  # caption | conversation
        "template": "vicuna_v1",
        "num_examples": 4096,  # synthetic set size
        "seq_len": 128,
        "batch_size": 32,
        "image_size": 0,  # 0: the vision tower's
        "max_images": 1,
        "image_mean": (0.5, 0.5, 0.5),
        "image_std": (0.5, 0.5, 0.5),
        "tokenizer": "",  # a sentencepiece .model; empty: the demo tokenizer
        "shuffle": True,
        "worker_count": 0,
    })
    c.optimizer = ConfigDict({
        "name": "adamw",
        "learning_rate": 1e-3,
        "schedule": "cosine",
        "warmup_steps": 0.03,  # a fraction of training, or a number of steps
        "end_lr_fraction": 0.0,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "grad_clip_norm": 1.0,
        "freeze": None,  # regex (or list of regexes) over parameter paths; None: the stage's
        "lr_multipliers": (),  # ((regex, multiplier), ...)
    })
    c.mesh = ConfigDict({"ici": {"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1},
                         "dcn": {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1},
                         "rules": "fsdp_tp"})
    c.train = ConfigDict({
        "total_steps": 0,
        "epochs": 0.0,
        "examples": 0,
        "grad_accum": 1,
        "loss_chunk": 128,
        "max_nonfinite_steps": 5,
        "log_every": 10,
        "progress": True,
    })
    c.checkpoint = ConfigDict({
        "every_steps": 0,  # 0: only at the end (and on SIGTERM)
        "every_minutes": 0.0,
        "keep": 3,
        "init_from": "",  # another run's workdir: its latest params start this run
        "init_from_include": None,  # regexes selecting which of them (None: all)
        "best_metric": "eval_loss",  # the best checkpoint by it is kept beside the last K
        "best_mode": "min",
    })
    c.evals = ConfigDict({
        "every_steps": 0,  # held-out loss every N steps (0: never), logged as eval_loss
        "num_examples": 256,
    })
    return c


def total_steps(cfg: ConfigDict, dataset_size: int | None = None) -> int:
    """Training length from steps, epochs or examples (exactly one should be set)."""
    t = cfg.train
    batch = cfg.data.batch_size
    given = [n for n, v in (("total_steps", t.total_steps), ("epochs", t.epochs),
                            ("examples", t.examples)) if v]
    if len(given) != 1:
        raise ValueError("set exactly one of train.total_steps, train.epochs, train.examples "
                         f"(got {', '.join(given) or 'none'})")
    if t.total_steps:
        return int(t.total_steps)
    if t.examples:
        return max(1, int(t.examples) // batch)
    if dataset_size is None:
        raise ValueError("train.epochs needs a dataset of known size")
    return max(1, int(round(float(t.epochs) * dataset_size / batch)))


def load_config_file(spec: str) -> ConfigDict:
    """`path/to/file.py[:arg]` -> the file's get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(
        f"_lvlm_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} has no get_config(arg=None)")
    cfg = module.get_config(arg or None)
    if not isinstance(cfg, ConfigDict):
        raise ValueError(f"{path}:get_config must return an ml_collections.ConfigDict")
    return cfg


def _parse_value(text: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"--config.{key}: expected true/false, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ValueError(f"--config.{key}: cannot parse {text!r} as "
                         f"{type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
        if value.is_integer():
            return int(value)
    if current is not None and not isinstance(value, type(current)) and not (
            isinstance(current, (ConfigDict, dict)) and isinstance(value, dict)):
        if not (isinstance(current, (list, tuple)) and isinstance(value, (list, tuple))):
            raise ValueError(f"--config.{key}: expected {type(current).__name__}, "
                             f"got {text!r}")
    return value


def valid_keys(cfg: ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        out.append(prefix + k)
        if isinstance(v, ConfigDict):
            out.extend(valid_keys(v, prefix + k + "."))
    return out


def apply_override(cfg: ConfigDict, key: str, text: str) -> None:
    """Sets cfg.<key> from text, typed like the current value; an unknown key fails naming it."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            where = ".".join(parts[:i + 1])
            import difflib

            same_depth = [k for k in valid_keys(cfg) if k.count(".") == key.count(".")]
            close = difflib.get_close_matches(key, same_depth, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"unknown config key {where!r}{hint}")
        if i == len(parts) - 1:
            current = node[part]
            value = _parse_value(text, current, key)
            with node.unlocked():
                node[part] = value
        else:
            node = node[part]


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separates `--config.a.b=v` (or `--config.a.b v`) from the other arguments."""
    rest, overrides = [], []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" in body:
                k, v = body.split("=", 1)
            elif i + 1 < len(argv):
                k, v = body, argv[i + 1]
                i += 1
            else:
                raise ValueError(f"{arg} needs a value")
            overrides.append((k, v))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ConfigDict:
    cfg = load_config_file(spec)
    cfg.lock()
    for k, v in overrides:
        apply_override(cfg, k, v)
    return cfg


def to_json(cfg: ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
