"""Params-only checkpoints for inference (`model_config.json` + an orbax `params/` tree), and
`lvlm export` from a training workdir to them or to a Hugging Face folder."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lvlm_jax.models import VLMConfig, vlm_config

MODEL_CONFIG = "model_config.json"


def check_empty_output(out: str) -> None:
    """Refuses to write into a folder that already holds files: nothing on disk is lost."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"output {out!r} already exists and is not empty; "
                              "choose a new folder")


def write_model_config(model_cfg: VLMConfig, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, MODEL_CONFIG), "w") as f:
        json.dump(dataclasses.asdict(model_cfg), f, indent=2, sort_keys=True)


def read_model_config(directory: str) -> VLMConfig:
    path = os.path.join(directory, MODEL_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory!r} is not an lvlm_jax checkpoint (no {MODEL_CONFIG})")
    with open(path) as f:
        return vlm_config(json.load(f))


def check_same_model(workdir: str, model_cfg: VLMConfig) -> None:
    """Fails, naming the first difference, when `workdir` holds checkpoints of another model."""
    path = os.path.join(workdir, MODEL_CONFIG)
    has_ckpt = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
        n.isdigit() for n in os.listdir(os.path.join(workdir, "checkpoints")))
    if not (has_ckpt and os.path.exists(path)):
        return
    with open(path) as f:
        saved = json.load(f)
    new = json.loads(json.dumps(dataclasses.asdict(model_cfg)))

    def diff(a, b, prefix="model"):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                d = diff(a.get(k), b.get(k), f"{prefix}.{k}")
                if d:
                    return d
            return None
        return None if a == b else f"{prefix}: checkpoint has {a!r}, this config has {b!r}"

    d = diff(saved, new)
    if d:
        raise ValueError(f"{workdir} holds checkpoints of a different model ({d}); use a new "
                         "workdir or the same model config")


def save_params_only(model_cfg: VLMConfig, params: Any, out: str) -> None:
    check_empty_output(out)
    write_model_config(model_cfg, out)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(os.path.abspath(out), "params"),
                   jax.tree.map(np.asarray, params))
        ckptr.wait_until_finished()


def load_params_only(directory: str) -> tuple[VLMConfig, Any]:
    model_cfg = read_model_config(directory)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(directory), "params"))
    return model_cfg, jax.tree.map(np.asarray, params)


MODEL_KEYS = {"vision", "connector", "decoder", "image_newline"}  # what HF exports hold


def export_checkpoint(workdir: str, fmt: str, out: str, step: int | None = None) -> str:
    """A training workdir's latest (or `step`) params -> `out` as 'params' or 'hf'."""
    from lvlm_jax.checkpoints.manager import restore_params

    if fmt not in ("params", "hf"):
        raise ValueError(f"unknown export format {fmt!r}; expected 'params' or 'hf'")
    check_empty_output(out)
    from lvlm_jax.train.lora import merge

    model_cfg = read_model_config(workdir)
    params, step = restore_params(workdir, step)
    params = merge(params)  # a LoRA run exports W + alpha/r * A @ B and no "lora" subtree
    if fmt == "params":
        save_params_only(model_cfg, params, out)
        return f"exported step {step} of {workdir} as {fmt} to {out}"
    from lvlm_jax.checkpoints.hf import export_hf

    heads = sorted(set(params) - MODEL_KEYS)
    if "reward_head" in heads:
        raise ValueError(f"{workdir} holds a reward model: HF's VLM classes have no "
                         "place for its reward_head; export it with --format=params")
    # A policy trained by PPO carries its value head: HF gets the policy alone.
    export_hf(model_cfg, {k: v for k, v in params.items() if k in MODEL_KEYS}, out)
    # The tokenizer the run trained with (its added <image>/<video> included) goes along, so
    # the export's ids are the run's: AutoTokenizer reads it from the same folder.
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    if os.path.isdir(tokenizer_dir):
        for name in sorted(os.listdir(tokenizer_dir)):
            shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out, name))
    dropped = f" (without {', '.join(heads)})" if heads else ""
    return f"exported step {step} of {workdir} as {fmt} to {out}{dropped}"


def import_to_params_only(hf_dir: str, out: str) -> str:
    """`lvlm import`: an HF folder -> a params-only checkpoint of ours."""
    from lvlm_jax.checkpoints.hf import import_hf

    check_empty_output(out)
    model_cfg, params = import_hf(hf_dir)
    model_cfg = model_cfg if isinstance(model_cfg, VLMConfig) else vlm_config(model_cfg)
    save_params_only(model_cfg, params, out)
    n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    return f"imported {hf_dir} ({n / 1e6:.1f}M parameters) to {out}"
