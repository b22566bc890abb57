"""LLaVA-NeXT any-res feature packing: a host-side gather plan, applied under jit.

One image's tile features [1 + rows * cols, side * side, d] (the global view first) become HF's
`pack_image_features` sequence: the global view's tokens, then the tiles' feature map with the
padding rows (or columns) cut (HF's `unpad_image`), OneVision's anyres_max_N shrink when it
applies, and the learned `image_newline` after each row. Which feature goes where depends on the
image's original size, so the host computes it once per image (`pack_plan`: gather indices,
bilinear weights, newline and validity masks, padded to a static length) and `pack_features`
applies it inside jit with static shapes. The un-padding arithmetic mirrors
data_pipelines/anyres.py's token count (models/ imports no data code); tests tie the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class PackPlan(NamedTuple):
    """Where each of `length` output tokens comes from. Rows index features.reshape(-1, d)."""

    index: np.ndarray  # int32 [L, taps]: source rows (taps = 1, or 4 for a bilinear shrink)
    weight: np.ndarray  # float32 [L, taps]: their weights (all 1 with one tap)
    newline: np.ndarray  # bool [L]: the token is image_newline
    valid: np.ndarray  # bool [L]: False on the padding past `length`
    length: int  # the real number of tokens (HF's feature_lens entry)


def unpad_bounds(image_size: Sequence[int], rows: int, cols: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): the slice of a [rows, cols] feature map HF's unpad_image keeps
    for an image of original `image_size` (h, w); the same padding comes off both ends."""
    height, width = image_size
    if width / height > cols / rows:
        # round(, 7) before int() as HF: 23.999999999 must stay 24.
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return pad, rows - pad, 0, cols
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return 0, rows, pad, cols - pad


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w1) per output index of torch's interpolate(mode="bilinear", align_corners=False)
    along one axis, bit for bit as the CPU kernel of torch 2.x here computes them (checked on
    one-hot inputs)."""
    scale = np.float32(in_size) / np.float32(out_size)
    # scale * (i + 0.5) - 0.5 rounded once to float32, as the fused multiply-add torch's build
    # uses: rounding the product first moves a weight by an ulp of the source coordinate.
    src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, w1


def pack_plan(grid: Sequence[int], image_size: Sequence[int], tokens_per_side: int,
              max_num_patches: int | None = None, length: int | None = None,
              offset: int = 0) -> PackPlan:
    """The gather plan of one image tiled `grid` = (rows, cols), original `image_size` (h, w).

    Source rows count from `offset` (the image's first crop times side**2, when several images'
    crops share one flattened array). `length` pads the plan to a static budget (default: its
    own length). `max_num_patches` is OneVision's anyres_max_N (None: LLaVA-NeXT, no cap)."""
    side = tokens_per_side
    grid_rows, grid_cols = int(grid[0]), int(grid[1])
    height, width = int(image_size[0]), int(image_size[1])
    if height < 1 or width < 1 or grid_rows < 1 or grid_cols < 1:
        raise ValueError(f"degenerate image size {height}x{width} or grid {grid_rows}x{grid_cols}")
    full_h, full_w = grid_rows * side, grid_cols * side
    top, bottom, left, right = unpad_bounds((height, width), full_h, full_w)
    rows, cols = bottom - top, right - left
    if rows < 1 or cols < 1:
        raise ValueError(f"image {height}x{width} keeps no tile features after un-padding its "
                         f"{full_h}x{full_w} feature map (aspect ratio beyond the grid's)")

    # Feature map position (y, x) -> source row: tile (y // side, x // side), token
    # (y % side, x % side), after the global view's side**2 rows.
    def source(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        tile = 1 + (y // side) * grid_cols + x // side
        return offset + tile * side * side + (y % side) * side + x % side

    ratio = (math.sqrt(rows * cols / (max_num_patches * side * side))
             if max_num_patches is not None else 0.0)
    if ratio > 1.1:
        out_h, out_w = int(rows // ratio), int(cols // ratio)
        y0, y1, wy = _bilinear_taps(rows, out_h)
        x0, x1, wx = _bilinear_taps(cols, out_w)
        ys, xs = top + np.stack([y0, y1], -1), left + np.stack([x0, x1], -1)  # [out, 2]
        wys, wxs = np.stack([1 - wy, wy], -1), np.stack([1 - wx, wx], -1)
        # Taps ordered (y0, x0), (y0, x1), (y1, x0), (y1, x1) for every output pixel.
        taps = source(ys[:, None, :, None], xs[None, :, None, :]).reshape(out_h, out_w, 4)
        weights = (wys[:, None, :, None] * wxs[None, :, None, :]).reshape(out_h, out_w, 4)
    else:
        out_h, out_w = rows, cols
        taps = source(np.arange(top, bottom)[:, None], np.arange(left, right)[None, :])[..., None]
        weights = np.ones(taps.shape, np.float32)
    n_taps = taps.shape[-1]
    # The global view's tokens first; spare taps read row `offset` at weight 0.
    base_index = np.full((side * side, n_taps), offset)
    base_index[:, 0] += np.arange(side * side)
    base_weight = np.zeros((side * side, n_taps), np.float32)
    base_weight[:, 0] = 1
    # Then the map with a newline column after each row, flattened row-major.
    map_index = np.concatenate([taps, np.full((out_h, 1, n_taps), offset)], axis=1)
    map_weight = np.concatenate([weights, np.zeros((out_h, 1, n_taps), np.float32)], axis=1)
    map_newline = np.zeros((out_h, out_w + 1), bool)
    map_newline[:, -1] = True
    index = np.concatenate([base_index, map_index.reshape(-1, n_taps)])
    weight = np.concatenate([base_weight, map_weight.reshape(-1, n_taps)])
    newline = np.concatenate([np.zeros(side * side, bool), map_newline.reshape(-1)])

    real = len(index)
    length = real if length is None else length
    if real > length:
        raise ValueError(f"image {height}x{width} packs to {real} tokens, over the budget {length}")
    pad = length - real
    return PackPlan(
        index=np.pad(index, ((0, pad), (0, 0)), constant_values=offset).astype(np.int32),
        weight=np.pad(weight, ((0, pad), (0, 0))).astype(np.float32),
        newline=np.pad(newline, (0, pad)), valid=np.arange(length) < real, length=real)


def pack_features(features: jax.Array, image_newline: jax.Array, index: jax.Array,
                  weight: jax.Array, newline: jax.Array, valid: jax.Array) -> jax.Array:
    """[L, d] packed tokens from crop features [..., tokens, d] and a plan's arrays (jit-able:
    shapes are static, values traced). Padding past the plan's length is zeros.

    With one tap this is a pure gather (bit for bit HF's); four taps are the bilinear shrink,
    w0 * a + w1 * b + w2 * c + w3 * d in the features' dtype."""
    rows = features.reshape(-1, features.shape[-1])
    if index.shape[-1] == 1:
        gathered = rows[index[:, 0]]
    else:
        # A plain weighted sum, not a matmul: no precision setting can change it.
        gathered = (weight.astype(rows.dtype)[..., None] * rows[index]).sum(axis=1)
    out = jnp.where(newline[:, None], image_newline.astype(rows.dtype)[None, :], gathered)
    return jnp.where(valid[:, None], out, jnp.zeros_like(out))


def pack_image_features(features: jax.Array, grid: Sequence[int], image_size: Sequence[int],
                        image_newline: jax.Array, max_num_patches: int | None = None) -> jax.Array:
    """One image's packed tokens [length, d], HF's pack_image_features for that image."""
    side = math.isqrt(features.shape[1])
    if side * side != features.shape[1] or features.shape[0] != 1 + grid[0] * grid[1]:
        raise ValueError(f"features {features.shape} do not fit a {grid[0]}x{grid[1]} grid plus "
                         "a global view of square token maps")
    # Padded to the longest any image on this grid packs to: one compiled program per grid.
    budget = side * side + grid[0] * side * (grid[1] * side + 1)
    plan = pack_plan(grid, image_size, side, max_num_patches, length=budget)
    packed = _pack_features_jit(features, image_newline, plan.index, plan.weight, plan.newline,
                                plan.valid)
    return packed[:plan.length]


_pack_features_jit = jax.jit(pack_features)
