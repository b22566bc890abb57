"""Packing of encoded examples into fixed-length rows: several samples a row, first fit.

A packed row holds samples one after another: `segment_ids` number them 1..k (0 = padding),
`positions` restart at 0 in each, and a sample's targets end with its own last token, so no
token predicts or attends across samples (see lvlm_jax/models/attention.py MaskInfo). A row's
images are its samples' images in order, at most `max_images`: the model gives the k-th image
block of a row the k-th image. A sample whose tokens or images do not fit in any open row
starts new rows. A flat example (data.media="flat": `crops` and `media` instead of
`pixel_values`, data_pipelines/media.py) packs the same way: a row's media are its samples'
media in order, its crops at most `max_crops` (a batch group's budget).

grain's FirstFitPackIterDataset does the packing (it is deterministic and checkpointable: its
state is its parent's at the last emitted rows); this module trims examples to their real
length and renames its output to the loader's fields.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from data_pipelines.media import FIELDS as MEDIA_FIELDS

MODES = ("none", "first_fit")
TEXT_FIELDS = ("input_ids", "targets", "loss_mask")
FLAT_FIELDS = MEDIA_FIELDS  # a flat example's media, already only those it keeps


def trim_example(example: dict[str, np.ndarray], image_id: int,
                 image_tokens: int) -> dict[str, np.ndarray]:
    """A padded example -> its real tokens and the images whose blocks it holds."""
    length = int(np.count_nonzero(example["segment_ids"]))
    ids = example["input_ids"][:length]
    images = int(np.count_nonzero(ids == image_id)) // max(image_tokens, 1)
    out = {name: example[name][:length] for name in TEXT_FIELDS}
    if "media" in example:
        out.update({name: example[name] for name in FLAT_FIELDS})
        return out
    out["pixel_values"] = example["pixel_values"][:images]
    return out


class _Trim(grain.transforms.Map):
    def __init__(self, image_id: int, image_tokens: int):
        self.image_id, self.image_tokens = image_id, image_tokens

    def map(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return trim_example(example, self.image_id, self.image_tokens)


class _Rename(grain.transforms.Map):
    """grain names the packing of field F `F_segment_ids` and `F_positions`; every text field
    has the same layout, so the input ids' become the row's."""

    def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        media = FLAT_FIELDS if "media" in packed else ("pixel_values",)
        out = {name: packed[name] for name in (*TEXT_FIELDS, *media)}
        out["segment_ids"] = packed["input_ids_segment_ids"]
        out["positions"] = packed["input_ids_positions"]
        return out


def pack_first_fit(examples: grain.IterDataset, *, seq_len: int, max_images: int,
                   image_id: int, image_tokens: int, num_bins: int,
                   max_crops: int = 0) -> grain.IterDataset:
    """Encoded examples (see loader.example_spec) -> packed rows of the same fields and shapes.

    `num_bins` rows are open at a time; samples go into the first with room for both their
    tokens and their images, and when one fits nowhere all open rows are emitted. With
    `max_crops`, flat examples: a row holds at most that many crops (and media), zero-padded.
    """
    if num_bins < 1:
        raise ValueError(f"packing needs at least one open row, got num_bins={num_bins}")
    lengths = {name: seq_len for name in TEXT_FIELDS}
    if max_crops:
        lengths.update({name: max_crops for name in FLAT_FIELDS})
    else:
        lengths["pixel_values"] = max_images
    packed = grain.experimental.FirstFitPackIterDataset(
        examples.map(_Trim(image_id, image_tokens)), length_struct=lengths,
        num_packing_bins=num_bins, shuffle_bins=False)
    return packed.map(_Rename())


def unpack_row(row: dict[str, np.ndarray], image_id: int,
               image_tokens: int) -> list[dict[str, Any]]:
    """The samples of one packed row, trimmed (the inverse of packing; for tests and debugging)."""
    samples, image = [], 0
    for segment in range(1, int(row["segment_ids"].max(initial=0)) + 1):
        where = row["segment_ids"] == segment
        sample = {name: row[name][where] for name in (*TEXT_FIELDS, "positions")}
        n = int(np.count_nonzero(sample["input_ids"] == image_id)) // max(image_tokens, 1)
        sample["pixel_values"] = row["pixel_values"][image:image + n]
        image += n
        samples.append(sample)
    return samples
