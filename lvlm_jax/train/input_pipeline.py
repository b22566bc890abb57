"""Builds the training input named by the `data` config section: the tokenizer, the grain
pipeline of this process's share of every global batch, and the model config it implies."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import jax

from data_pipelines.arrayrecord_source import ArrayRecordSource
from data_pipelines.loader import SyntheticSource, demo_tokenizer, make_dataset
from data_pipelines.tokenizer import Tokenizer
from lvlm_jax.models import VLMConfig, vlm_config


def cache_dir() -> str:
    path = os.environ.get("LVLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                      "lvlm_jax"))
    os.makedirs(path, exist_ok=True)
    return path


def load_tokenizer(data_cfg: Any) -> Tokenizer:
    """The configured sentencepiece model, or the demo's (trained once and cached)."""
    if data_cfg.tokenizer:
        return Tokenizer(data_cfg.tokenizer)
    return demo_tokenizer(cache_dir())


def resolve_model_config(cfg: Any, tokenizer: Tokenizer) -> VLMConfig:
    """The model config with the tokenizer's <image> id filled in and the vocabulary checked."""
    model_cfg = vlm_config(cfg.model.to_dict())
    if model_cfg.image_token_id < 0:
        model_cfg = dataclasses.replace(model_cfg, image_token_id=tokenizer.image_id)
    if tokenizer.vocab_size > model_cfg.language.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but "
                         f"model.language.vocab_size is {model_cfg.language.vocab_size}")
    return model_cfg


def image_size(cfg: Any, model_cfg: VLMConfig) -> int:
    return cfg.data.image_size or model_cfg.vision.image_size


def make_source(cfg: Any, model_cfg: VLMConfig, split: str = "train"):
    d = cfg.data
    if d.source == "synthetic":
        return SyntheticSource(d.kind, d.num_examples, seed=cfg.seed,
                               image_size=image_size(cfg, model_cfg), split=split)
    if d.source == "arrayrecord":
        if not d.path:
            raise ValueError("data.source='arrayrecord' needs data.path=DIR "
                             "(the shards written by `lvlm data convert`)")
        try:
            source = ArrayRecordSource(d.path, split=split)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.path={d.path!r}: {e}") from e
        # A kind mismatch would otherwise surface as every record skipped as malformed.
        if source.kind is not None and source.kind != d.kind:
            raise ValueError(f"data.path={d.path!r} holds {source.kind!r} records but "
                             f"data.kind is {d.kind!r}")
        return source
    raise ValueError(f"data.source={d.source!r} is not available yet; "
                     "use 'synthetic' or 'arrayrecord'")


def make_eval_batches(cfg: Any, model_cfg: VLMConfig):
    """A function returning a fresh pass over the held-out split (no shuffle, one epoch)."""
    d = cfg.data
    tokenizer = load_tokenizer(d)
    source = make_source(cfg, model_cfg, split="eval")
    if hasattr(source, "n"):
        source.n = min(source.n, cfg.evals.num_examples)
    batch = min(d.batch_size, cfg.evals.num_examples)

    def batches():
        return make_dataset(
            source, kind=d.kind, tokenizer=tokenizer, template=d.template, seq_len=d.seq_len,
            image_size=image_size(cfg, model_cfg), image_tokens=model_cfg.image_tokens,
            max_images=d.max_images, batch_size=batch, seed=cfg.seed, shuffle=False,
            num_epochs=1)

    return batches


def make_input(cfg: Any, workdir: str | None = None
               ) -> tuple[Iterator[dict], VLMConfig, int]:
    """(iterator of this process's batches, resolved model config, dataset size)."""
    del workdir
    d = cfg.data
    tokenizer = load_tokenizer(d)
    model_cfg = resolve_model_config(cfg, tokenizer)
    source = make_source(cfg, model_cfg)
    n_proc = jax.process_count()
    dataset = make_dataset(
        source, kind=d.kind, tokenizer=tokenizer, template=d.template, seq_len=d.seq_len,
        image_size=image_size(cfg, model_cfg), image_tokens=model_cfg.image_tokens,
        max_images=d.max_images, batch_size=d.batch_size // n_proc, seed=cfg.seed,
        shuffle=d.shuffle, shard_index=jax.process_index(), shard_count=n_proc)
    return iter(dataset), model_cfg, len(source)
