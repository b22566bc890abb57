"""LLaVA-NeXT any-res on the host: the best grid from pinpoints, tiles plus a global view, and
the number of image tokens one image expands to (as HF's LlavaNextProcessor counts them)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from data_pipelines.images import to_rgb_uint8

Pinpoints = Sequence[Sequence[int]]


class AnyresError(ValueError):
    """An image any-res cannot tile: a degenerate size, or an aspect ratio so far beyond the
    grids' that un-padding leaves no row (or column) of tile features."""


class Tiles(NamedTuple):
    crops: np.ndarray  # uint8 [1 + rows * cols, crop, crop, 3]: global view, row-major tiles
    image_size: tuple[int, int]  # the original (height, width)
    grid: tuple[int, int]  # (rows, cols) of tiles


def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise AnyresError(f"degenerate image size {height}x{width} (height x width): any-res "
                          "needs at least one pixel each way")
    return height, width


def select_best_grid(image_size: Sequence[int], pinpoints: Pinpoints) -> tuple[int, int]:
    """The (height, width) resolution of `pinpoints` an image of `image_size` (h, w) is tiled at.

    LLaVA-NeXT's rule (HF's select_best_resolution): the most effective pixels, min(area of the
    image scaled to fit, original area), and among ties the least wasted canvas; the first
    pinpoint wins a full tie."""
    height, width = _check_size(image_size)
    best, best_effective, best_wasted = None, 0, math.inf
    for target_h, target_w in pinpoints:
        scale = min(target_w / width, target_h / height)
        # int() truncates as HF does: the pixels the resized image really has.
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_h * target_w - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(target_h), int(target_w)), effective, wasted
    if best is None:
        raise ValueError(f"no usable pinpoint in {list(pinpoints)}")
    return best


def grid_shape(image_size: Sequence[int], pinpoints: Pinpoints, crop_size: int) -> tuple[int, int]:
    """(rows, cols) of crop_size tiles the image is cut into."""
    _check_pinpoints(pinpoints, crop_size)
    target_h, target_w = select_best_grid(image_size, pinpoints)
    return target_h // crop_size, target_w // crop_size


def _check_pinpoints(pinpoints: Pinpoints, crop_size: int) -> None:
    bad = [list(p) for p in pinpoints if len(p) != 2 or min(p) < crop_size
           or p[0] % crop_size or p[1] % crop_size]
    if not pinpoints or bad:
        raise ValueError(f"image_grid_pinpoints must be (height, width) multiples of the crop "
                         f"size {crop_size}; got {bad or list(pinpoints)}")


def fitted_size(image_size: Sequence[int], target: Sequence[int]) -> tuple[int, int]:
    """(h, w) of the image resized to fit `target` with its aspect ratio kept (HF's
    get_patch_output_size: the limiting side fills the target, the other is rounded up)."""
    height, width = _check_size(image_size)
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def tile_image(image: Any, pinpoints: Pinpoints, crop_size: int) -> Tiles:
    """uint8 crops of one image: the whole image resized to crop_size (the global view, first),
    then the tiles of the image resized into the best pinpoint and centred on a black canvas.

    Pixels are those of HF's LlavaNextImageProcessor(Pil) before rescale/normalize, bit for bit:
    PIL bicubic on uint8 RGB, zero fill, the odd pixel of padding at the bottom/right. `image` is
    anything images.to_rgb_uint8 takes, or a PIL image. An image too elongated for the grids is
    refused by num_image_tokens (ask it first: it needs no pixels)."""
    if isinstance(image, Image.Image):
        image_size = _check_size((image.height, image.width))
        pil = image.convert("RGB")
    else:
        array = to_rgb_uint8(image)
        image_size = _check_size(array.shape[:2])  # before PIL, which fails obscurely on 0 px
        pil = Image.fromarray(array)
    rows, cols = grid_shape(image_size, pinpoints, crop_size)
    target_h, target_w = rows * crop_size, cols * crop_size
    new_h, new_w = fitted_size(image_size, (target_h, target_w))
    canvas = np.zeros((target_h, target_w, 3), np.uint8)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = np.asarray(
        pil.resize((new_w, new_h), Image.Resampling.BICUBIC))
    crops = np.empty((1 + rows * cols, crop_size, crop_size, 3), np.uint8)
    # The global view stretches the whole image to a square, as HF does (no padding).
    crops[0] = np.asarray(pil.resize((crop_size, crop_size), Image.Resampling.BICUBIC))
    crops[1:] = (canvas.reshape(rows, crop_size, cols, crop_size, 3)
                 .transpose(0, 2, 1, 3, 4).reshape(rows * cols, crop_size, crop_size, 3))
    return Tiles(crops, image_size, (rows, cols))


def unpadded_feature_shape(image_size: Sequence[int], grid: Sequence[int],
                           tokens_per_side: int) -> tuple[int, int]:
    """(rows, cols) of the tiles' feature map once the padding rows (or columns) are cut.

    HF's processor arithmetic (_get_unpadded_features), which the model's unpad_image mirrors:
    the same padding comes off both ends, so an odd leftover keeps one padded row."""
    height, width = _check_size(image_size)
    cur_h, cur_w = grid[0] * tokens_per_side, grid[1] * tokens_per_side
    if width / height > cur_w / cur_h:
        # round(, 7) then truncate, as HF: drops float noise like 23.999999999 before int().
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= (cur_h - new_h) // 2 * 2
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= (cur_w - new_w) // 2 * 2
    return cur_h, cur_w


def capped_feature_shape(shape: Sequence[int], tokens_per_side: int,
                         max_num_patches: int | None) -> tuple[int, int]:
    """The feature map's (rows, cols) after OneVision's anyres_max_N cap: a map holding more than
    ~N tiles' worth of tokens (ratio > 1.1) is bilinearly shrunk by that ratio in the model."""
    rows, cols = shape
    if max_num_patches is None:
        return rows, cols
    ratio = math.sqrt(rows * cols / (max_num_patches * tokens_per_side ** 2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def num_image_tokens(image_size: Sequence[int], pinpoints: Pinpoints, crop_size: int,
                     patch_size: int, vision_feature_select_strategy: str = "default",
                     num_additional_image_tokens: int = 0,
                     max_num_patches: int | None = None) -> int:
    """How many `<image>` placeholders HF's LlavaNextProcessor puts in input_ids for one image
    of `image_size` (h, w): the global view's tokens, then the un-padded tile feature map with
    one image_newline per row.

    The arguments are the processor's: `num_additional_image_tokens` counts a CLS token, and
    "default" drops one (so a CLIP tower with CLS passes 1 and "default"). `max_num_patches` is
    OneVision's anyres_max_N (LlavaOnevisionProcessor with vision_aspect_ratio="anyres_max_N").
    Raises AnyresError for an image no tile feature row (or column) survives un-padding."""
    image_size = _check_size(image_size)
    side = crop_size // patch_size
    grid = grid_shape(image_size, pinpoints, crop_size)
    rows, cols = unpadded_feature_shape(image_size, grid, side)
    if rows < 1 or cols < 1:
        best = select_best_grid(image_size, pinpoints)
        raise AnyresError(
            f"image {image_size[0]}x{image_size[1]} (height x width) is too far beyond the "
            f"grids' aspect ratios: fitted into {best[0]}x{best[1]}, its {grid[0] * side}x"
            f"{grid[1] * side} tile feature map keeps {rows}x{cols} after un-padding")
    rows, cols = capped_feature_shape((rows, cols), side, max_num_patches)
    base = side * side + num_additional_image_tokens
    if vision_feature_select_strategy == "default":
        base -= 1
    return base + rows * cols + rows
