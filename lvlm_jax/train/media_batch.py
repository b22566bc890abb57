"""Flat media batches (data.media="flat"): the loader's rows of crops and media descriptors ->
the model's MediaLayout fields, one crop budget per batch shard.

The batch's rows are split into G groups (G = the batch shards of the mesh, data x fsdp), each
a run of consecutive rows whose crops sit in one [max_crops / G] budget beside them:
`pixel_values` uint8 [G, C, S, S, 3], `crop_valid` [G, C], and per token the table rows it
reads, `image_slots` int32 / `image_weights` f32 [B, T, taps] (models/media_layout.py). A row
whose crops do not fit what its group has left is emptied (no tokens, no loss), logged and
counted as "over crop budget", so every lane keeps its place. The map runs in the grain
pipeline on this process's rows, so each process builds exactly its own groups.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import grain
import numpy as np

from data_pipelines.loader import MAX_PIXELS, SkipStats
from data_pipelines.media import COLUMNS, KIND_VIDEO, OVER_BUDGET, MediaOptions, crops_of
from lvlm_jax.models.media_layout import Media, build_layout, num_media_tokens, place_crops

FIELDS = ("image_slots", "image_weights", "crop_valid")  # beside pixel_values
TEXT_FIELDS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")

log = logging.getLogger(__name__)


def flat_crops(cfg: Any) -> int:
    """data.max_crops, the crops of a flat global batch (0: batch_size x max_images)."""
    d = cfg.data
    return d.get("max_crops", 0) or d.batch_size * d.max_images


def to_media(row: np.ndarray) -> Media:
    """One descriptor row of data_pipelines/media.py -> models.media_layout.Media."""
    kind, grid_rows, grid_cols, height, width, frames = (int(v) for v in row)
    if kind == KIND_VIDEO:
        return Media("video", frames=frames)
    if grid_rows:
        return Media("image", grid=(grid_rows, grid_cols), image_size=(height, width))
    return Media("image")


def media_token_count(model_cfg: Any, row: np.ndarray) -> int:
    """Placeholder tokens of one descriptor row under `model_cfg` (picklable via partial)."""
    return num_media_tokens(model_cfg, to_media(row))


def media_options(model_cfg: Any, crops_per_group: int, num_frames: int,
                  image_mode: str = "pad") -> MediaOptions:
    """What the encoder needs to make flat examples for `model_cfg`."""
    v = model_cfg.vision
    return MediaOptions(
        crop_size=v.image_size, token_count=functools.partial(media_token_count, model_cfg),
        pinpoints=tuple(model_cfg.image_grid_pinpoints), patch_size=v.patch_size,
        num_frames=num_frames, image_mode=image_mode, max_pixels=MAX_PIXELS,
        max_crops=crops_per_group)


class MediaBatch(grain.transforms.Map):
    """A batch of flat rows (`crops`, `media` lists) -> MediaLayout fields (module docstring).

    `rows_per_group` consecutive rows share a group of `crops_per_group` crops; `media_ids`
    are the placeholder ids (image, video) whose tokens read the table."""

    def __init__(self, model_cfg: Any, *, rows_per_group: int, crops_per_group: int,
                 media_ids: tuple[int, ...], stats: SkipStats | None = None):
        self.model_cfg = model_cfg
        self.rows_per_group = rows_per_group
        self.crops_per_group = crops_per_group
        self.media_ids = tuple(media_ids)
        self.stats = stats if stats is not None else SkipStats()

    def map(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {k: np.array(batch[k]) for k in TEXT_FIELDS}
        b = len(out["input_ids"])
        if b % self.rows_per_group:
            raise ValueError(f"{b} rows do not split into groups of {self.rows_per_group}")
        size = self.model_cfg.vision.image_size
        rows_media, rows_crops, used = [], [], 0
        for r in range(b):
            if r % self.rows_per_group == 0:
                used = 0
            media = np.asarray(batch["media"][r], np.int32).reshape(-1, len(COLUMNS))
            media = media[media[:, 0] > 0]  # packing pads with kind-0 rows
            k = int(crops_of(media).sum())
            if used + k > self.crops_per_group:
                reason = (f"{OVER_BUDGET}: row {r} needs {k} crops, its group has "
                          f"{self.crops_per_group - used} of {self.crops_per_group} left")
                log.warning("emptying batch row %d: %s", r, reason)
                self.stats.add_skipped(f"batch row {r}", reason)
                for name in TEXT_FIELDS:
                    out[name][r] = 0
                media, k = media[:0], 0
            used += k
            rows_media.append([to_media(m) for m in media])
            rows_crops.append([np.asarray(batch["crops"][r][:k], np.uint8)] if k else [])
        groups = b // self.rows_per_group
        mask = np.isin(out["input_ids"], self.media_ids) & (out["segment_ids"] > 0)
        slots, weights, _ = build_layout(self.model_cfg, mask, rows_media,
                                         crops_per_group=self.crops_per_group, groups=groups)
        pixels, valid = place_crops(rows_crops, crops_per_group=self.crops_per_group,
                                    groups=groups, crop_shape=(size, size, 3))
        out.update(pixel_values=pixels, image_slots=slots, image_weights=weights,
                   crop_valid=valid)
        return out
