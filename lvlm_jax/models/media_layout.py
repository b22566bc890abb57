"""Flattened media of a batch: crops of all rows in one budgeted array, and where each token reads.

The images and video frames of a whole batch (0 to N per row, any-res tiles included) travel as
one array of crops `[groups, crops, S, S, 3]`: the batch's rows are split into `groups` equal
runs of consecutive rows (one per batch shard, so a shard's crops sit beside its rows) and each
group's crops fill a static budget, the rest zeros. The vision tower runs on exactly that budget,
never on `rows x max images`. The model then builds, per group, a table of LM-ready rows:

    [crops * T projected crop tokens | crops * Tp pooled crop tokens (video pooler) | newline]

and every token of the row reads `taps` rows of its group's table with weights (`slots`,
`weights` [batch, seq, taps]; slot -1: a text token). One tap is a gather (any-res packing, plain
images); four are a bilinear shrink (OneVision's anyres_max_N, its video pooling).

This module is host-side numpy: `media_plan` gives one image's or clip's rows, `build_layout`
places a batch's plans at its rows' placeholder tokens. `MediaLayout` is the pytree the model
takes in `pixel_values`'s place (models/vlm.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from lvlm_jax.models.anyres import _bilinear_taps, pack_plan


class MediaLayout(NamedTuple):
    """What the model takes instead of [b, n, h, w, c] pixels for flattened media."""

    pixels: Any  # [groups, crops, S, S, 3]: uint8 from the loader, normalised floats in the model
    slots: Any  # int32 [batch, seq, taps]: table rows each token reads; -1 = text token
    weights: Any  # float32 [batch, seq, taps]


class BudgetError(ValueError):
    """A batch's media need more crops than its group's budget."""


@dataclasses.dataclass(frozen=True)
class Media:
    """One image or clip of a row, as the host knows it before the model runs.

    kind "image": `grid` = (rows, cols) of any-res tiles (None: one crop, no tiles) and the
    original `image_size` (h, w) the un-padding needs; crops = 1 + rows * cols.
    kind "video": `frames` crops, one per frame."""

    kind: str = "image"
    grid: tuple[int, int] | None = None
    image_size: tuple[int, int] | None = None
    frames: int = 0

    @property
    def crops(self) -> int:
        if self.kind == "video":
            return self.frames
        return 1 if self.grid is None else 1 + self.grid[0] * self.grid[1]


@dataclasses.dataclass(frozen=True)
class TableShape:
    """Rows of one group's table: crop c's token k is row c*T + k, its pooled token k is row
    crops*T + c*Tp + k, and the last row is the learned image_newline."""

    crops: int
    tokens: int
    pooled_tokens: int = 0

    @property
    def newline_row(self) -> int:
        return self.crops * (self.tokens + self.pooled_tokens)

    @property
    def length(self) -> int:
        return self.newline_row + 1


def table_shape(cfg: Any, crops: int) -> TableShape:
    """The table of a VLMConfig `cfg` with `crops` crops per group."""
    tokens = cfg.vision.num_tokens
    pooled = 0
    if cfg.video_pool == "average":
        side = _side(tokens) // cfg.video_pool_stride
        pooled = side * side
    return TableShape(crops, tokens, pooled)


def media_taps(cfg: Any) -> int:
    """Taps per token the model's media need: 4 when a bilinear shrink can occur, else 1."""
    return 4 if cfg.max_num_patches or cfg.video_pool == "bilinear" else 1


def num_media_tokens(cfg: Any, media: Media) -> int:
    """Placeholder tokens `media` takes in input_ids (what HF's processors put there)."""
    return len(media_plan(cfg, media, 0, table_shape(cfg, media.crops))[0])


def _side(tokens: int) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens per crop do not form a square map (a CLS token kept?)")
    return side


def media_plan(cfg: Any, media: Media, first_crop: int, table: TableShape
               ) -> tuple[np.ndarray, np.ndarray]:
    """(index, weight) [tokens, taps]: the table rows `media` reads, its first crop at
    `first_crop` of its group; in the order of HF's LLaVA-NeXT / -Video / OneVision features."""
    t = table.tokens
    if media.kind == "video":
        return _video_plan(cfg, media.frames, first_crop, table)
    if media.kind != "image":
        raise ValueError(f"unknown media kind {media.kind!r}")
    if media.grid is None:
        index = (first_crop * t + np.arange(t))[:, None]
        if cfg.image_newline:  # HF's single-crop branch: the crop's tokens, then one newline
            index = np.concatenate([index, [[table.newline_row]]])
        return index.astype(np.int32), np.ones(index.shape, np.float32)
    plan = pack_plan(media.grid, media.image_size, _side(t), cfg.max_num_patches or None,
                     offset=first_crop * t)
    index = np.where(plan.newline[:, None], table.newline_row, plan.index)
    weight = np.where(plan.newline[:, None], np.eye(1, plan.index.shape[1]), plan.weight)
    if not cfg.image_newline:  # tiles without a learned newline: its tokens are dropped
        index, weight = index[~plan.newline], weight[~plan.newline]
    return index.astype(np.int32), weight.astype(np.float32)


def _video_plan(cfg: Any, frames: int, first_crop: int, table: TableShape
                ) -> tuple[np.ndarray, np.ndarray]:
    t, side = table.tokens, _side(table.tokens)
    crops = first_crop + np.arange(frames)
    if cfg.video_pool == "average":  # LLaVA-NeXT-Video: pooled before the projector
        rows = table.crops * t + crops[:, None] * table.pooled_tokens + np.arange(
            table.pooled_tokens)
        index = rows.reshape(-1, 1)
        return index.astype(np.int32), np.ones(index.shape, np.float32)
    if cfg.video_pool == "bilinear":  # OneVision: bilinear to ceil(side/2), then one newline
        out = math.ceil(side / 2)
        i0, i1, w1 = _bilinear_taps(side, out)
        ys, wy = np.stack([i0, i1], -1), np.stack([1 - w1, w1], -1)
        # taps (y0, x0), (y0, x1), (y1, x0), (y1, x1), as anyres.pack_plan orders them
        tok = (ys[:, None, :, None] * side + ys[None, :, None, :]).reshape(out * out, 4)
        w = (wy[:, None, :, None] * wy[None, :, None, :]).reshape(out * out, 4)
        index = (crops[:, None, None] * t + tok[None]).reshape(-1, 4)
        weight = np.tile(w, (frames, 1))
        index = np.concatenate([index, [[table.newline_row, 0, 0, 0]]])
        weight = np.concatenate([weight, [[1, 0, 0, 0]]])
        return index.astype(np.int32), weight.astype(np.float32)
    index = (crops[:, None] * t + np.arange(t)).reshape(-1, 1)  # frames as plain images
    return index.astype(np.int32), np.ones(index.shape, np.float32)


def build_layout(cfg: Any, media_mask: np.ndarray, rows_media: Sequence[Sequence[Media]], *,
                 crops_per_group: int, groups: int = 1, taps: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slots, weights [b, t, taps], crop_of [b] first crop of each row in its group).

    `media_mask` [b, t] marks the placeholder tokens (image and video ids); row r's are filled,
    in order, with the plans of `rows_media[r]`, whose crops are numbered within r's group
    (rows r // (b / groups)). Raises BudgetError when a group's crops exceed the budget and
    ValueError when a row's placeholders do not match its media."""
    b, t = media_mask.shape
    if b % groups:
        raise ValueError(f"batch {b} does not split into {groups} groups")
    taps = media_taps(cfg) if taps is None else taps
    table = table_shape(cfg, crops_per_group)
    slots = np.full((b, t, taps), -1, np.int32)
    weights = np.zeros((b, t, taps), np.float32)
    first = np.zeros(b, np.int32)
    per_group = b // groups
    used = 0
    for r in range(b):
        if r % per_group == 0:
            used = 0
        first[r] = used
        plans = []
        for m in rows_media[r]:
            plans.append(media_plan(cfg, m, used, table))
            used += m.crops
        if used > crops_per_group:
            raise BudgetError(f"group {r // per_group} needs {used} crops, over its budget of "
                              f"{crops_per_group}")
        where = np.flatnonzero(media_mask[r])
        n = sum(len(p[0]) for p in plans)
        if n != len(where):
            raise ValueError(f"row {r} has {len(where)} media placeholder tokens but its "
                             f"{len(rows_media[r])} images/clips take {n}")
        if plans:
            index = np.concatenate([p[0] for p in plans])
            weight = np.concatenate([p[1] for p in plans])
            if index.shape[1] > taps:
                raise ValueError(f"a plan needs {index.shape[1]} taps, the layout has {taps}")
            slots[r, where, :index.shape[1]] = index
            weights[r, where, :index.shape[1]] = weight
            slots[r, where, index.shape[1]:] = index[:, :1]  # spare taps: weight 0
    return slots, weights, first


def place_crops(rows_crops: Sequence[Sequence[np.ndarray]], *, crops_per_group: int,
                groups: int = 1, crop_shape: Sequence[int] | None = None,
                dtype: Any = np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [groups, crops_per_group, *crop], valid [groups, crops_per_group]): each row's
    crops (a list of [k, S, S, 3] arrays, one per image / clip) after those of the rows before
    it in its group, as `build_layout` numbers them."""
    b = len(rows_crops)
    per_group = b // groups
    shape = tuple(crop_shape) if crop_shape is not None else next(
        np.shape(c)[1:] for row in rows_crops for c in row)
    pixels = np.zeros((groups, crops_per_group, *shape), dtype)
    valid = np.zeros((groups, crops_per_group), bool)
    for r, row in enumerate(rows_crops):
        g = r // per_group
        used = int(valid[g].sum())
        for c in row:
            k = len(c)
            if used + k > crops_per_group:
                raise BudgetError(f"group {g} needs more than {crops_per_group} crops")
            pixels[g, used:used + k] = c
            valid[g, used:used + k] = True
            used += k
    return pixels, valid


def merge_media(embeds: jax.Array, table: jax.Array, slots: jax.Array,
                weights: jax.Array) -> jax.Array:
    """embeds [b, t, d] with every media token replaced by its weighted table rows.

    table [groups, rows, d]; slots/weights [b, t, taps]. One tap is a plain gather (bit for bit
    the table's rows); with more, a weighted sum in the table's dtype."""
    import jax.numpy as jnp

    g, _, d = table.shape
    b, t, taps = slots.shape
    idx = jnp.maximum(slots, 0).reshape(g, (b // g) * t * taps)
    rows = jnp.take_along_axis(table, idx[..., None], axis=1).reshape(b, t, taps, d)
    if taps == 1:
        feats = rows[:, :, 0]
    else:
        feats = (weights.astype(table.dtype)[..., None] * rows).sum(axis=2)
    return jnp.where((slots[..., 0] >= 0)[..., None], feats.astype(embeds.dtype), embeds)
