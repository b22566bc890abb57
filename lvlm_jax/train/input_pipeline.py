"""Builds the training input named by the `data` config section: the tokenizer, the grain
pipeline of this process's share of every global batch, and the model config it implies."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from data_pipelines.arrayrecord_source import ArrayRecordSource
from data_pipelines.loader import SkipStats, SyntheticSource, demo_tokenizer, make_dataset
from data_pipelines.mixture import make_mixture_dataset, open_mixture, parse_mixture
from data_pipelines.skips import has_skip_counts, skip_counts
from data_pipelines.synthetic_highres import HighResSource
from data_pipelines.tokenizer import TextTokenizer, open_tokenizer
from lvlm_jax.models import VLMConfig, vlm_config
from lvlm_jax.train.media_batch import MediaBatch, flat_crops, media_options


def cache_dir() -> str:
    path = os.environ.get("LVLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                      "lvlm_jax"))
    os.makedirs(path, exist_ok=True)
    return path


RUN_TOKENIZER = "tokenizer"  # the run's tokenizer, saved in its workdir
VOCAB_RECORD = "vocab.json"  # what the vocabulary is made of, beside it


def load_tokenizer(data_cfg: Any, workdir: str | None = None) -> TextTokenizer:
    """The tokenizer a training run saved in `workdir` (the ids it trained with), else
    data.tokenizer (a SentencePiece .model, a tokenizer.json, or a checkpoint folder holding
    one: data_pipelines.tokenizer.open_tokenizer), else the demo's (trained once and cached)."""
    if workdir and os.path.isdir(os.path.join(workdir, RUN_TOKENIZER)):
        return open_tokenizer(os.path.join(workdir, RUN_TOKENIZER))
    if data_cfg.tokenizer:
        return open_tokenizer(data_cfg.tokenizer)
    return demo_tokenizer(cache_dir())


def resolve_model_config(cfg: Any, tokenizer: TextTokenizer) -> VLMConfig:
    """The model config with the tokenizer's <image> id filled in and a vocabulary covering the
    tokenizer. A model.language.vocab_size below the tokenizer's grows to it (a checkpoint that
    `checkpoint.init_from` loads then gets new embedding and LM-head rows:
    lvlm_jax/checkpoints/vocab_resize.py); a larger one (a padded vocabulary, as Qwen2's) stays."""
    model_cfg = vlm_config(cfg.model.to_dict())
    if model_cfg.image_token_id < 0:
        model_cfg = dataclasses.replace(model_cfg, image_token_id=tokenizer.image_id)
    if tokenizer.vocab_size > model_cfg.language.vocab_size:
        language = dataclasses.replace(model_cfg.language, vocab_size=tokenizer.vocab_size)
        model_cfg = dataclasses.replace(model_cfg, language=language)
    return model_cfg


def save_run_tokenizer(cfg: Any, model_cfg: VLMConfig, workdir: str) -> dict[str, Any]:
    """Saves the configured tokenizer, with the tokens added to it, to workdir/tokenizer (where
    generate, eval and later stages read it) and writes workdir/vocab.json: its size and added
    tokens, the model's vocab_size, and the rows a `checkpoint.init_from` run lacked, which
    start as transformers' resize_token_embeddings starts them. Returns the record."""
    from lvlm_jax.checkpoints.export import MODEL_CONFIG, read_model_config
    from lvlm_jax.checkpoints.vocab_resize import NEW_ROWS

    tokenizer = load_tokenizer(cfg.data)
    tokenizer.save(os.path.join(workdir, RUN_TOKENIZER))
    record: dict[str, Any] = {
        "tokenizer": cfg.data.tokenizer or "the demo's",
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "added_tokens": tokenizer.added_tokens(),
        "image_id": model_cfg.image_token_id,
        "config_vocab_size": vlm_config(cfg.model.to_dict()).language.vocab_size,
        "model_vocab_size": model_cfg.language.vocab_size,
    }
    source = cfg.checkpoint.init_from
    if source and os.path.isfile(os.path.join(source, MODEL_CONFIG)):
        rows = read_model_config(source).language.vocab_size
        if rows < model_cfg.language.vocab_size:
            record["init_from"] = {"path": source, "vocab_size": rows,
                                   "new_rows": [rows, model_cfg.language.vocab_size],
                                   "new_rows_init": NEW_ROWS}
    with open(os.path.join(workdir, VOCAB_RECORD), "w") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    return record


def image_size(cfg: Any, model_cfg: VLMConfig) -> int:
    return cfg.data.image_size or model_cfg.vision.image_size


def make_source(cfg: Any, model_cfg: VLMConfig, split: str = "train"):
    d = cfg.data
    if d.source == "synthetic":
        return SyntheticSource(d.kind, d.num_examples, seed=cfg.seed,
                               image_size=image_size(cfg, model_cfg), split=split,
                               description_noise=d.description_noise,
                               describe_share=d.describe_share)
    if d.source == "synthetic_highres":
        if d.kind != "conversation":
            raise ValueError("data.source='synthetic_highres' holds conversation records; "
                             f"data.kind is {d.kind!r}")
        return HighResSource(d.num_examples, seed=cfg.seed, split=split)
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
    if d.source == "tfds":
        return _tfds_source(cfg, split)
    raise ValueError(f"data.source={d.source!r} is not a source; "
                     "use 'synthetic', 'synthetic_highres', 'arrayrecord' or 'tfds' (or set "
                     "data.mixture)")


def _tfds_source(cfg: Any, split: str):
    from data_pipelines.tfds_source import TfdsSource  # tensorflow_datasets loads slowly

    d = cfg.data
    if not d.tfds:
        raise ValueError("data.source='tfds' needs data.tfds=NAME[:VERSION] (a dataset prepared "
                         "in data.tfds_dir with file_format='array_record')")
    tfds_split = d.tfds_split if split == "train" else d.tfds_eval_split
    if split != "train" and "[" not in tfds_split:  # evals read only their first examples
        tfds_split = f"{tfds_split}[:{cfg.evals.num_examples}]"
    # TfdsSource checks data.kind against the dataset's feature layout.
    return TfdsSource(d.tfds, split=tfds_split, data_dir=d.tfds_dir or None, kind=d.kind)


def _mixture_dataset(cfg: Any, model_cfg: VLMConfig, **kwargs: Any):
    """(the batches of data.mixture, the number of records of its sources)."""
    d = cfg.data
    parts = open_mixture(
        parse_mixture(d.mixture), split="train", default_kind=d.kind,
        num_examples=d.num_examples, seed=cfg.seed, image_size=image_size(cfg, model_cfg),
        tfds_dir=d.tfds_dir, tfds_split=d.tfds_split)
    return make_mixture_dataset(parts, **kwargs), sum(len(source) for source, _, _ in parts)


def make_eval_batches(cfg: Any, model_cfg: VLMConfig):
    """A function returning a fresh pass over the held-out split (no shuffle, one epoch)."""
    d = cfg.data
    tokenizer = load_tokenizer(d)
    source = make_source(cfg, model_cfg, split="eval")
    if hasattr(source, "n"):
        source.n = min(source.n, cfg.evals.num_examples)
    batch = min(d.batch_size, cfg.evals.num_examples)
    # Flat media: host-local batches in one group, with the training budget's share of crops.
    media = flat_media(cfg, model_cfg, tokenizer, groups=1, batch_size=batch,
                       crops=-(-flat_crops(cfg) * batch // d.batch_size))

    def batches():
        return make_dataset(
            source, kind=d.kind, tokenizer=tokenizer, template=d.template, seq_len=d.seq_len,
            image_size=image_size(cfg, model_cfg), image_tokens=text_image_tokens(model_cfg),
            max_images=d.max_images, batch_size=batch, seed=cfg.seed, shuffle=False,
            num_epochs=1, image_mode=d.get("image_mode", "pad"), **media)

    return batches


def text_image_tokens(model_cfg: VLMConfig) -> int:
    """Placeholders per image in the token stream: the encoder's token count, or one marker for
    a cross-attention model, whose image features never enter the stream."""
    return max(model_cfg.image_tokens, 1)


def make_input(cfg: Any, workdir: str | None = None
               ) -> tuple[Iterator[dict], VLMConfig, int]:
    """(iterator of this process's rows of every global batch, resolved model config, dataset
    size)."""
    del workdir
    d = cfg.data
    tokenizer = load_tokenizer(d)
    model_cfg = resolve_model_config(cfg, tokenizer)
    stats = SkipStats()
    common = dict(
        tokenizer=tokenizer, template=d.template, seq_len=d.seq_len,
        image_size=image_size(cfg, model_cfg), image_tokens=text_image_tokens(model_cfg),
        image_mode=d.get("image_mode", "pad"),
        max_images=d.max_images, batch_size=d.batch_size, seed=cfg.seed,
        shuffle=d.shuffle, rows=process_rows(cfg),
        worker_count=d.worker_count, packing=d.packing, max_skip_fraction=d.max_skip_fraction,
        min_skip_records=d.skip_budget_after, stats=stats)
    check_packing(cfg, model_cfg)
    common.update(flat_media(cfg, model_cfg, tokenizer, stats))
    if d.mixture:
        dataset, size = _mixture_dataset(cfg, model_cfg, **common)
        return iter(dataset), model_cfg, size
    source = make_source(cfg, model_cfg)
    dataset = make_dataset(source, kind=d.kind, **common)
    return iter(dataset), model_cfg, len(source)


def media_groups(cfg: Any) -> int:
    """The crop groups of a flat batch: the batch shards (data x fsdp) of the run's mesh."""
    from lvlm_jax import sharding

    return sharding.batch_axis_size(sharding.make_mesh(cfg.mesh.to_dict()))


def flat_media(cfg: Any, model_cfg: VLMConfig, tokenizer: TextTokenizer,
               stats: SkipStats | None = None, groups: int | None = None,
               batch_size: int | None = None, crops: int | None = None) -> dict[str, Any]:
    """make_dataset's `media` and `batch_map` for data.media="flat" ({} for "padded"): batches
    of `batch_size` rows (data.batch_size) in `groups` groups (the mesh's batch shards) sharing
    `crops` crops (data.max_crops); fails with a message naming the setting that does not fit.
    """
    d = cfg.data
    if d.media not in ("padded", "flat"):
        raise ValueError(f"data.media must be 'padded' or 'flat', got {d.media!r}")
    if d.media == "padded":
        if model_cfg.image_grid_pinpoints:
            raise ValueError("any-res tiling (model.image_grid_pinpoints) needs "
                             "data.media='flat'")
        return {}
    why = ("data.mixture" if d.mixture
           else f"data.kind={d.kind!r}" if d.kind not in ("caption", "conversation")
           else f"a {model_cfg.connector.kind!r} connector"
           if model_cfg.connector.kind != "projector"
           else f"data.image_size={d.image_size}"
           if d.image_size not in (0, model_cfg.vision.image_size) else None)
    if why:
        raise ValueError(f"data.media='flat' does not work with {why} (it takes caption and "
                         "conversation records, a projector, and crops of the vision tower's "
                         "size)")
    groups = media_groups(cfg) if groups is None else groups
    crops = flat_crops(cfg) if crops is None else crops
    batch_size = d.batch_size if batch_size is None else batch_size
    if crops % groups or batch_size % groups:
        raise ValueError(f"data.max_crops={crops} and data.batch_size={batch_size} must "
                         f"split evenly over the {groups} batch shards (data x fsdp)")
    try:
        video_ids = tuple(i for i in (tokenizer.video_id,) if i is not None)
    except ValueError:  # a tokenizer without <video>: image records only
        video_ids = ()
    # Packed rows each keep to their share of the group's crops, so none is ever emptied;
    # unpacked rows share the group's budget (a row of 3 images beside text-only rows).
    sample_crops = crops // batch_size if d.packing == "first_fit" else crops // groups
    if sample_crops < 1:
        raise ValueError(f"data.packing='first_fit' gives each row data.max_crops / "
                         f"data.batch_size crops: {crops} / {batch_size} is none")
    return {"media": media_options(model_cfg, sample_crops, d.num_frames,
                                   d.get("image_mode", "pad")),
            "batch_map": MediaBatch(model_cfg, rows_per_group=batch_size // groups,
                                    crops_per_group=crops // groups,
                                    media_ids=(tokenizer.image_id, *video_ids), stats=stats)}


def process_rows(cfg: Any) -> list[int]:
    """The rows of every global batch that this process's devices hold on the run's mesh."""
    from data_pipelines.lanes import local_rows
    from lvlm_jax import sharding

    if jax.process_count() == 1:  # every row; the mesh (and its batch split) is loop.plan's
        return list(range(cfg.data.batch_size))
    mesh = sharding.make_mesh(cfg.mesh.to_dict())  # loop.plan checks the batch splits on it
    return local_rows(sharding.batch_sharding(mesh, 1), cfg.data.batch_size)


def check_packing(cfg: Any, model_cfg: VLMConfig) -> None:
    """Packing needs a model that keeps samples apart by segment ids alone: a prefix-LM's prefix,
    an instruction-aware resampler's prompt and cross-attention's media ids are per row."""
    if cfg.data.packing == "none":
        return
    conn = model_cfg.connector
    why = ("model.prefix_lm" if model_cfg.prefix_lm
           else "an instruction-aware resampler" if getattr(conn, "instruction_aware", False)
           else "a cross-attention connector" if conn.kind == "cross_attention" else None)
    if why:
        raise ValueError(f"data.packing={cfg.data.packing!r} does not work with {why} (it reads "
                         "whole rows, not segments); use data.packing='none'")


def data_metrics(batches: Any) -> dict[str, float]:
    """`data/skipped` (bad records skipped so far, all processes) and `data/skipped_fraction`
    (of the records read), from the iterator state; {} for an iterator that keeps no counts."""
    get_state = getattr(batches, "get_state", None)
    if get_state is None:
        return {}
    state = get_state()
    if not isinstance(state, dict):
        return {}
    if not has_skip_counts(state):
        return {}
    read, skipped = skip_counts(state)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        read, skipped = (int(x) for x in np.sum(multihost_utils.process_allgather(
            np.array([read, skipped], np.int64)), axis=0))
    # A packing lane's state is its parent's at the last rows it emitted: it may have read none.
    return {"data/skipped": skipped, "data/skipped_fraction": skipped / read if read else 0.0}
