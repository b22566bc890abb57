"""HF processor outputs (any-res pixel_values + image_sizes, pixel_values_videos) -> a MediaLayout.

LlavaNextProcessor and LlavaOnevisionProcessor return every image's crops padded to the batch's
largest crop count, `[images, crops, 3, S, S]`, with the original `image_sizes` [images, 2] from
which the real count follows (the best grid of `image_grid_pinpoints`); video processors return
`[videos, frames, 3, S, S]`. Images and clips are in order over the batch, as their placeholders
in `input_ids` are. This module finds which placeholders each belongs to and builds the one-group
`models.media_layout.MediaLayout` the model takes, holding exactly the real crops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines.anyres import grid_shape
from lvlm_jax.models.media_layout import (
    Media,
    MediaLayout,
    build_layout,
    num_media_tokens,
    place_crops,
)


def _nhwc(crops: np.ndarray) -> np.ndarray:
    return np.asarray(crops, np.float32).transpose(0, 2, 3, 1)


def _check_crop(cfg: Any, shape: Sequence[int], what: str) -> None:
    size = cfg.vision.image_size
    if tuple(shape[-3:]) != (3, size, size):
        raise ValueError(f"{what} must end in [3, {size}, {size}] (channels first, the vision "
                         f"tower's crop size), got shape {tuple(shape)}")


def image_media(cfg: Any, pixel_values: Any, image_sizes: Any = None,
                batch_num_images: Any = None) -> list[tuple[Media, np.ndarray]]:
    """(Media, crops [k, S, S, 3]) of each image of HF's `pixel_values`, in order.

    Any-res models need `image_sizes`: image i keeps the 1 + rows * cols crops its size tiles
    into (the rest is padding, as for transformers). OneVision's `batch_num_images` (images
    per row) marks rows of several images, whose images keep their global view alone, as
    transformers does."""
    if pixel_values is None:
        if image_sizes is not None:
            raise ValueError("image_sizes were given without pixel_values")
        return []
    pixels = np.asarray(pixel_values)
    _check_crop(cfg, pixels.shape, "pixel_values")
    if pixels.ndim == 4:  # one crop per image
        if cfg.image_grid_pinpoints:
            raise ValueError("an any-res model takes pixel_values [images, crops, 3, H, W] with "
                             f"image_sizes, as its HF processor returns them; got {pixels.shape}")
        return [(Media(), _nhwc(p[None])) for p in pixels]
    if pixels.ndim != 5:
        raise ValueError(f"pixel_values must be [images, crops, 3, H, W], got {pixels.shape}")
    if image_sizes is None or not cfg.image_grid_pinpoints:
        raise ValueError("5-d pixel_values need image_sizes and a model with "
                         "image_grid_pinpoints (LLaVA-NeXT / OneVision)")
    sizes = np.asarray(image_sizes).reshape(-1, 2) if np.size(image_sizes) else np.zeros((0, 2))
    if len(sizes) != len(pixels):
        raise ValueError(f"image_sizes has {len(sizes)} entries for {len(pixels)} images")
    patch = [True] * len(pixels)
    if batch_num_images is not None:
        counts = [int(n) for n in np.asarray(batch_num_images).reshape(-1)]
        if sum(counts) != len(pixels):
            raise ValueError(f"batch_num_images {counts} sums to {sum(counts)}, but "
                             f"pixel_values holds {len(pixels)} images")
        patch = [n == 1 for n in counts for _ in range(n)]
    out = []
    for i, (p, (h, w), tiled) in enumerate(zip(pixels, sizes.tolist(), patch, strict=True)):
        if not tiled:
            out.append((Media(), _nhwc(p[:1])))
            continue
        grid = grid_shape((int(h), int(w)), cfg.image_grid_pinpoints, cfg.vision.image_size)
        media = Media(grid=grid, image_size=(int(h), int(w)))
        if media.crops > len(p):
            raise ValueError(f"image {i} of size {h}x{w} (image_sizes) tiles into 1 + "
                             f"{grid[0]}x{grid[1]} = {media.crops} crops, but pixel_values "
                             f"holds {len(p)} per image")
        out.append((media, _nhwc(p[:media.crops])))
    return out


def video_media(cfg: Any, pixel_values_videos: Any) -> list[tuple[Media, np.ndarray]]:
    """(Media, frames [f, S, S, 3]) of each clip of HF's `pixel_values_videos`."""
    if pixel_values_videos is None:
        return []
    if cfg.video_token_id < 0:
        raise ValueError("pixel_values_videos were given to a model without a video token")
    clips = np.asarray(pixel_values_videos)
    if clips.ndim != 5:
        raise ValueError(f"pixel_values_videos must be [videos, frames, 3, H, W], got "
                         f"{clips.shape}")
    _check_crop(cfg, clips.shape, "pixel_values_videos")
    return [(Media(kind="video", frames=len(c)), _nhwc(c)) for c in clips]


def assign_rows(cfg: Any, input_ids: np.ndarray, images: list, videos: list
                ) -> tuple[list[list[Media]], list[list[np.ndarray]]]:
    """Each row's media (and crops) in the order of its placeholders: images and clips are
    taken in batch order, each filling as many placeholders as it has tokens."""
    queues = {"image": list(images), "video": list(videos)}
    used = {"image": 0, "video": 0}
    rows_media, rows_crops = [], []
    for r, row in enumerate(input_ids):
        kinds = np.where(row == cfg.image_token_id, 1, 0)
        if cfg.video_token_id >= 0:
            kinds = np.where(row == cfg.video_token_id, 2, kinds)
        kinds = kinds[kinds > 0]
        media, crops, i = [], [], 0
        while i < len(kinds):
            kind = "image" if kinds[i] == 1 else "video"
            if used[kind] == len(queues[kind]):
                raise ValueError(f"row {r} has more {kind} placeholders than the "
                                 f"{len(queues[kind])} {kind}s given fill")
            m, c = queues[kind][used[kind]]
            used[kind] += 1
            n = num_media_tokens(cfg, m)
            run = int(np.argmax(np.append(kinds[i:], 0) != kinds[i]))  # same-kind tokens left
            if run < n:
                raise ValueError(f"row {r}: {kind} {used[kind] - 1} takes {n} placeholder "
                                 f"tokens, but the row's run of {kind} placeholders has {run} "
                                 "left (image_sizes, frame counts and input_ids disagree)")
            media.append(m)
            crops.append(c)
            i += n
        rows_media.append(media)
        rows_crops.append(crops)
    for kind, queue in queues.items():
        if used[kind] != len(queue):
            raise ValueError(f"{len(queue)} {kind}s were given but input_ids hold placeholders "
                             f"for {used[kind]}")
    return rows_media, rows_crops


def hf_media_layout(cfg: Any, input_ids: Any, pixel_values: Any = None, image_sizes: Any = None,
                    pixel_values_videos: Any = None, batch_num_images: Any = None
                    ) -> MediaLayout | None:
    """The one-group MediaLayout of a batch given as HF's processors give it (float pixels,
    already normalised); None for a text-only batch."""
    ids = np.asarray(input_ids)
    images = image_media(cfg, pixel_values, image_sizes, batch_num_images)
    videos = video_media(cfg, pixel_values_videos)
    rows_media, rows_crops = assign_rows(cfg, ids, images, videos)
    total = sum(m.crops for row in rows_media for m in row)
    if total == 0:
        return None
    mask = ids == cfg.image_token_id
    if cfg.video_token_id >= 0:
        mask |= ids == cfg.video_token_id
    slots, weights, _ = build_layout(cfg, mask, rows_media, crops_per_group=total)
    size = cfg.vision.image_size
    pixels, _ = place_crops(rows_crops, crops_per_group=total, crop_shape=(size, size, 3),
                            dtype=np.float32)
    return MediaLayout(pixels, slots, weights)
