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
        # synthetic | synthetic_highres (one small shape in a large image: any-res's task) |
        # arrayrecord (data.path) | tfds (data.tfds)
        "source": "synthetic",
        "path": "",
        # tfds: NAME[/CONFIG][:VERSION] of a dataset prepared in tfds_dir with
        # file_format="array_record" (our LLaVA builder: lvlm_llava/llava, data_pipelines/
        # tfds_llava.py; catalogue image+captions sets such as coco_captions: data.kind=caption)
        "tfds": "",
        "tfds_dir": "",  # TFDS data_dir; empty: TFDS's default (~/tensorflow_datasets)
        "tfds_split": "train",  # any TFDS split string, e.g. "train[:95%]"
        "tfds_eval_split": "validation",  # read by the held-out evals
        # A weighted mixture replaces data.source when set: ((SPEC, WEIGHT), ...) with SPEC one of
        # "synthetic[:KIND]", "arrayrecord:DIR" (alias "path:DIR"), "tfds:NAME[:VERSION]", e.g.
        # (("arrayrecord:/data/llava665k", 0.7), ("tfds:coco_captions", 0.3)). Examples are drawn
        # in proportion to the weights (weight 0 drops a source), each source encoded as its own
        # kind (caption | conversation); deterministic and checkpointable. Evals read data.source.
        "mixture": (),
        "kind": "conversation",  # caption | conversation | preference
        "template": "vicuna_v1",
        "num_examples": 4096,  # synthetic set size
        # synthetic set: the share of free descriptions in conversations that also name one
        # absent object (noisy instruction data, the hallucinations preference tuning removes)
        "description_noise": 0.0,
        # synthetic set: the share of conversations that are one free description (the rest
        # ask 1-3 questions)
        "describe_share": 0.2,
        "seq_len": 128,
        "batch_size": 32,
        "image_size": 0,  # 0: the vision tower's
        "max_images": 1,
        # How a batch carries its images: "padded" ([batch, max_images, S, S, 3]) or "flat"
        # (lvlm_jax/models/media_layout.py: the batch's crops, any-res tiles and video frames
        # included, in one budget of max_crops, split evenly over the batch shards; rows hold 0
        # to N images and/or a video). Any-res tiling is on when model.image_grid_pinpoints is
        # set (flat only).
        "media": "padded",
        "max_crops": 0,  # flat: crops per global batch (0: batch_size x max_images)
        "num_frames": 8,  # flat: frames sampled from each video
        "image_mean": (0.5, 0.5, 0.5),
        "image_std": (0.5, 0.5, 0.5),
        "tokenizer": "",  # a sentencepiece .model; empty: the demo tokenizer
        "shuffle": True,
        "worker_count": 0,  # grain worker processes (0: load in the training process)
        # none: one sample a row, padded | first_fit: several a row (data_pipelines/packing.py);
        # never for preference pairs
        "packing": "none",
        # Bad records are skipped, logged and counted (data/skipped in metrics.jsonl); the run
        # fails once more than this fraction of the records read were skipped, counted from
        # skip_budget_after records on (so a few bad records early on do not end a run).
        "max_skip_fraction": 0.05,
        "skip_budget_after": 200,
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
        # [first, last]: a jax.profiler trace of these steps goes to WORKDIR/profile/
        "profile_steps": (),
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
        # evaluators (lvlm_jax/evals/evaluators.py): eval_loss, vqa, caption, pope, chair,
        # multiple_choice, and the released benchmarks of lvlm_jax/evals/benchmarks/ (vqav2,
        # textvqa, docvqa, infovqa, chartqa, scienceqa, mmbench, mmmu, pope, coco_captions),
        # read from data_dir/<task>/; run every N steps and at the end (0: never) and by
        # `lvlm eval`
        "tasks": ("eval_loss",),
        "every_steps": 0,
        "num_examples": 256,  # per task (POPE: split over its three splits); 0: every one
        "data_dir": "",  # the benchmarks' released files, each in DATA_DIR/<task>/
        # a benchmark's prompt template ({question}, {options}, ... of its records); empty:
        # the one its paper's eval used (lvlm_jax/evals/benchmarks/<task>.py)
        "prompts": {name: "" for name in (
            "vqav2", "textvqa", "docvqa", "infovqa", "chartqa", "scienceqa", "mmbench", "mmmu",
            "pope", "coco_captions")},
        "benchmark_max_new_tokens": 0,  # 0: each benchmark's own
        "max_new_tokens": 16,
        "batch_size": 32,
        "num_rendered": 4,  # examples per task drawn into TensorBoard images
        # records per task (JSONL or ArrayRecord); empty: the synthetic set's eval split
        "paths": {"vqa": "", "caption": "", "pope": "", "chair": "", "multiple_choice": ""},
        "chair_vocabulary": "",  # JSON {name: [synonyms]}; empty: COCO's 80 (synthetic: its own)
    })
    # DPO (train/stages/dpo.py): beta scales the policy/reference log-ratio; larger keeps the
    # policy closer to the reference. sft_weight > 0 adds that times the chosen responses'
    # per-token NLL (RPO), so the chosen answers do not lose likelihood.
    c.dpo = ConfigDict({"beta": 0.1, "sft_weight": 0.0})
    # PPO and GRPO (train/stages/ppo.py, grpo.py) sample responses to data.kind="prompt"
    # records before every step. reward: "rule" (1 if the normalised response equals the
    # reference, else 0), "model" (a `reward` stage run at reward_model=WORKDIR) or "both"
    # (their sum); kl_coef weighs the KL to the frozen reference; epochs: optimizer steps on
    # each rollout batch before sampling again; value_grad_to_trunk: whether PPO's value loss
    # trains the shared trunk too (False: the value head only). temperature: the policy samples
    # from softmax(logits / temperature), and its log-probs, ratios and KLs score that.
    c.ppo = ConfigDict({"max_new_tokens": 16, "temperature": 1.0, "kl_coef": 0.05,
                        "clip_eps": 0.2, "value_clip_eps": 0.2, "vf_coef": 0.1, "gamma": 1.0,
                        "lam": 0.95, "whiten_advantages": True, "reward": "rule",
                        "reward_model": "", "epochs": 1, "value_grad_to_trunk": False})
    # GRPO: group_size samples per prompt, advantages normalised within the group, no value
    # head; kl_coef (the paper's beta) weighs the k3 KL estimate in the loss.
    c.grpo = ConfigDict({"max_new_tokens": 16, "temperature": 1.0, "kl_coef": 0.04,
                         "clip_eps": 0.2, "group_size": 4, "reward": "rule",
                         "reward_model": "", "epochs": 1})
    # LoRA (lvlm_jax/train/lora.py): rank 0 = off. With rank r, adapters on the kernels matched
    # by `targets` train (and `trainable` base params); the rest of the model is frozen; each
    # adapted dense layer computes x W + alpha/r * (x A) B, W left unmerged.
    c.lora = ConfigDict({
        "rank": 0,
        "alpha": 16.0,
        "targets": (r"decoder/.*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
                    r"/kernel",),
        "trainable": (),  # regexes of base parameters that train in full beside the adapters
        "dropout": 0.0,  # only 0 is supported (not implemented)
        # True: the train step merges W + alpha/r * A @ B into every kernel on each forward,
        # as before adapters ran unmerged; only to measure against (bench/lora_aot_memory.py).
        "merge_on_forward": False,
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
        if isinstance(current, (list, tuple)) and current and all(
                isinstance(x, str) for x in current):
            # A list of names, written bare on the command line: a,b,c
            return type(current)(p.strip() for p in text.split(",") if p.strip())
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
