"""Per-example media for flattened batches: images (any-res tiles or one crop) and video clips ->
uint8 crops, one descriptor row per image or clip, and the placeholder runs in the token stream.

An example of a "flat" pipeline carries `crops` (uint8 [k, S, S, 3], its media's crops in
order) and `media` (int32 [m, 6], one row per image or clip, columns `COLUMNS`); the batch
map on the lvlm_jax side (lvlm_jax/train/input_pipeline.py) turns a batch of them into the
model's MediaLayout. How many placeholder tokens a descriptor takes is the model's business
(models/media_layout.num_media_tokens): the caller hands it in as `MediaOptions.token_count`,
so this package stays free of lvlm_jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.anyres import AnyresError, num_image_tokens, tile_image
from data_pipelines.images import ImageTooLarge, _rgb_image, prepare_image

KIND_IMAGE, KIND_VIDEO = 1, 2
COLUMNS = ("kind", "grid_rows", "grid_cols", "height", "width", "frames")
FIELDS = ("crops", "media")  # a flat example's media fields; batches keep them as row lists
OVER_BUDGET = "over crop budget"  # the skip reason of media that cannot fit a batch's budget


class MediaError(ValueError):
    """An image or clip that cannot become crops (the encoder turns it into a BadRecord)."""


@dataclasses.dataclass(frozen=True)
class MediaOptions:
    """How a flat pipeline turns images and clips into crops.

    `token_count(row)` gives the placeholder tokens of one descriptor row (see the module
    docstring; picklable for grain workers). `pinpoints` non-empty: images are tiled any-res
    (`patch_size` sizes the tile feature map that refuses too-elongated images), else each is
    one crop made as the padded pipeline makes it (`image_mode`). A sample with more than
    `max_crops` crops (0: no limit) is refused: it could never fit its batch group."""

    crop_size: int
    token_count: Callable[[np.ndarray], int]
    pinpoints: tuple[tuple[int, int], ...] = ()
    patch_size: int = 14
    num_frames: int = 8
    image_mode: str = "pad"
    max_pixels: int | None = None
    max_crops: int = 0


def image_media(image: Any, opts: MediaOptions) -> tuple[np.ndarray, np.ndarray]:
    """(crops [k, S, S, 3], descriptor row) of one image; MediaError when it cannot be used."""
    try:
        if not opts.pinpoints:
            crop = prepare_image(image, opts.crop_size, opts.image_mode,
                                 max_pixels=opts.max_pixels)
            return crop[None], np.array([KIND_IMAGE, 0, 0, 0, 0, 0], np.int32)
        pil = _rgb_image(image, opts.max_pixels)
        size = (pil.height, pil.width)
        # Asked first: it refuses a too-elongated image before any pixel is resized.
        num_image_tokens(size, opts.pinpoints, opts.crop_size, opts.patch_size)
        tiles = tile_image(pil, opts.pinpoints, opts.crop_size)
    except AnyresError as e:
        raise MediaError(f"image beyond the any-res grids: {e}") from e
    except (ImageTooLarge, Image.DecompressionBombError) as e:
        raise MediaError(f"image too large: {e}") from e
    except FileNotFoundError as e:
        raise MediaError(f"missing image: {e}") from e
    except (OSError, TypeError, ValueError) as e:
        raise MediaError(f"unreadable image: {e!r}") from e
    row = [KIND_IMAGE, *tiles.grid, *tiles.image_size, 0]
    return tiles.crops, np.array(row, np.int32)


def video_media(source: Any, opts: MediaOptions) -> tuple[np.ndarray, np.ndarray]:
    """(crops [num_frames, S, S, 3], descriptor row) of one clip: `num_frames` frames sampled
    by data_pipelines.video.read_frames; MediaError for a clip that cannot be decoded or is
    shorter than that."""
    try:
        from data_pipelines import video as video_lib
    except ImportError as e:  # the video reader ships separately
        raise MediaError(f"cannot read videos here: {e}") from e
    try:
        frames = video_lib.read_frames(source, opts.num_frames)
    except FileNotFoundError as e:
        raise MediaError(f"missing video: {e}") from e
    except (OSError, ValueError) as e:
        # read_frames names a clip shorter than asked "N frames, M asked"
        why = "video too short" if "asked" in str(e) else "unreadable video"
        raise MediaError(f"{why}: {e}") from e
    if len(frames) < opts.num_frames:
        raise MediaError(f"video too short: {len(frames)} frames, {opts.num_frames} asked")
    crops = np.asarray(video_lib.frames_to_crops(frames[:opts.num_frames], opts.crop_size),
                       np.uint8)
    height, width = np.shape(frames)[1:3]
    return crops, np.array([KIND_VIDEO, 0, 0, height, width, len(crops)], np.int32)


def expand_placeholders(ids: np.ndarray, mask: np.ndarray, where: Sequence[int],
                        counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids/mask rendered with one placeholder per mark -> each placeholder at `where[i]`
    repeated `counts[i]` times (as HF processors expand them); also the expanded start of
    each run."""
    reps = np.ones(len(ids), np.int64)
    reps[list(where)] = counts
    starts = np.concatenate([[0], np.cumsum(reps)])[list(where)]
    return np.repeat(ids, reps), np.repeat(mask, reps), starts.astype(np.int64)


def crops_of(media: np.ndarray) -> np.ndarray:
    """Crops per descriptor row [m]: frames of a clip, 1 + tiles of an image."""
    media = np.asarray(media, np.int64).reshape(-1, len(COLUMNS))
    tiles = media[:, 1] * media[:, 2]
    return np.where(media[:, 0] == KIND_VIDEO, media[:, 5], 1 + tiles)


def empty_media(crop_size: int) -> dict[str, np.ndarray]:
    """The media fields of a text-only example."""
    return {"crops": np.zeros((0, crop_size, crop_size, 3), np.uint8),
            "media": np.zeros((0, len(COLUMNS)), np.int32)}
