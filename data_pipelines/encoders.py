"""Record encoders: one record of each kind -> fixed-length numpy example(s), or BadRecord."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.images import ImageTooLarge, prepare_image
from data_pipelines.media import (
    OVER_BUDGET,
    MediaError,
    MediaOptions,
    empty_media,
    expand_placeholders,
    image_media,
    video_media,
)
from data_pipelines.templates import IMAGE_MARK, TextTokenizer, render
from data_pipelines.tokenizer_base import VIDEO_MARK

KINDS = ("caption", "conversation", "preference", "prompt")
# The loader's pixel limit: PIL's decompression-bomb threshold, the one `lvlm data convert`
# checks too.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
PAIR_SIDES = ("chosen", "rejected")
_PAIR_TEXT = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


class BadRecord(ValueError):
    """A record that cannot become a training example; it is skipped and counted."""


def checked_image(image: Any, size: int, mode: str = "pad",
                  out: np.ndarray | None = None) -> np.ndarray:
    """prepare_image (into `out` if given), or BadRecord for an image that cannot be read or has
    more than MAX_PIXELS pixels (read from the header first, so a decompression bomb is never
    decoded)."""
    try:
        return prepare_image(image, size, mode, max_pixels=MAX_PIXELS, out=out)
    except ImageTooLarge as e:
        raise BadRecord(str(e)) from e
    except Image.DecompressionBombError as e:  # PIL's own refusal, past twice its limit
        raise BadRecord(f"image too large: {e}") from e
    except FileNotFoundError as e:
        raise BadRecord(f"missing image: {e}") from e
    except (OSError, TypeError, ValueError) as e:
        if isinstance(e, BadRecord):
            raise
        raise BadRecord(f"unreadable image: {e!r}") from e


def example_spec(seq_len: int, image_size: int, max_images: int = 1) -> dict[str, tuple]:
    """Shape and dtype of every field of one example (prepend the batch size for a batch)."""
    return {
        "input_ids": ((seq_len,), np.int32),
        "targets": ((seq_len,), np.int32),
        "loss_mask": ((seq_len,), np.float32),
        "segment_ids": ((seq_len,), np.int32),
        "positions": ((seq_len,), np.int32),
        "pixel_values": ((max_images, image_size, image_size, 3), np.uint8),
    }


def _images(record: dict[str, Any]) -> list[Any]:
    images = record.get("images")
    if images is None:  # LLaVA's JSON names one image "image"
        images = [record["image"]] if record.get("image") is not None else []
    return list(images)


def _conversation(record: dict[str, Any], kind: str) -> tuple[list[dict], list[Any]]:
    if kind == "caption":
        image, caption = record["image"], record["caption"]
        return [{"from": "human", "value": IMAGE_MARK}, {"from": "gpt", "value": caption}], [image]
    return list(record["conversations"]), _images(record)


def encode_example(
    record: dict[str, Any],
    *,
    kind: str,
    tokenizer: TextTokenizer,
    template: str,
    seq_len: int,
    image_size: int,
    image_tokens: int,
    max_images: int = 1,
    image_mode: str = "pad",
    media: MediaOptions | None = None,
) -> dict[str, np.ndarray]:
    """One record -> one fixed-length example (see `example_spec`); raises BadRecord.

    `targets[i]` is `input_ids[i + 1]` (0 at the last real position) and `loss_mask[i]` says whether
    it is supervised. Too-long text is cut from the end, never inside an image's token block; the
    images whose blocks were cut away are zeroed. A preference record gives a pair (see
    `encode_preference`), a rollout prompt a prompt (see `encode_prompt`). With `media`, a
    caption or conversation becomes a flat example (see `encode_flat_example`).
    """
    if media is not None:
        if kind not in ("caption", "conversation"):
            raise ValueError(f"flat media (data.media='flat') take caption and conversation "
                             f"records, not {kind!r}")
        return encode_flat_example(record, kind=kind, tokenizer=tokenizer, template=template,
                                   seq_len=seq_len, media=media)
    if kind == "prompt":
        return encode_prompt(
            record, tokenizer=tokenizer, template=template, seq_len=seq_len,
            image_size=image_size, image_tokens=image_tokens, max_images=max_images,
            image_mode=image_mode)
    if kind == "preference":
        return encode_preference(
            record, tokenizer=tokenizer, template=template, seq_len=seq_len,
            image_size=image_size, image_tokens=image_tokens, max_images=max_images,
            image_mode=image_mode)
    try:
        turns, images = _conversation(record, kind)
        ids, mask = render(
            "plain" if kind == "caption" else template, turns, tokenizer, image_tokens
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BadRecord(f"malformed record: {e!r}") from e
    starts = np.flatnonzero(ids == tokenizer.image_id)[::image_tokens]
    if len(starts) != len(images):
        marks = f"{len(starts)} {IMAGE_MARK} marks"
        raise BadRecord(f"wrong image count: {marks} for {len(images)} images")
    if len(images) > max_images:
        raise BadRecord(f"too many images: {len(images)} > max_images={max_images}")

    keep = min(len(ids), seq_len)
    for start in starts:
        if start < keep < start + image_tokens:
            keep = int(start)
    ids, mask = ids[:keep], mask[:keep]
    if not mask[1:].any():
        raise BadRecord(f"no supervised token fits in seq_len={seq_len}")

    example = {
        name: np.zeros(shape, dtype)
        for name, (shape, dtype) in example_spec(seq_len, image_size, max_images).items()
    }
    for j, image in enumerate(images):
        # An image whose token block was cut away is still checked, and stays zero.
        kept = starts[j] + image_tokens <= keep
        checked_image(image, image_size, image_mode,
                      out=example["pixel_values"][j] if kept else None)
    example["input_ids"][:keep] = ids
    example["targets"][: keep - 1] = ids[1:]
    example["loss_mask"][: keep - 1] = mask[1:]
    example["segment_ids"][:keep] = 1
    example["positions"][:keep] = np.arange(keep)
    return example


def preference_spec(seq_len: int, image_size: int, max_images: int = 1) -> dict[str, tuple]:
    """Fields of one preference example: chosen_* and rejected_* text fields, shared pixels."""
    spec = example_spec(seq_len, image_size, max_images)
    out = {f"{side}_{name}": spec[name] for side in PAIR_SIDES for name in _PAIR_TEXT}
    out["pixel_values"] = spec["pixel_values"]
    return out


def encode_preference(
    record: dict[str, Any], *, tokenizer: TextTokenizer, template: str, seq_len: int,
    image_size: int, image_tokens: int, max_images: int = 1, image_mode: str = "pad",
) -> dict[str, np.ndarray]:
    """`{id, images, prompt, chosen, rejected}` -> a pair of examples (see `preference_spec`).

    Each side is the prompt as the user turn and its response as the assistant turn, encoded
    like a conversation (images checked as there): the loss mask covers the response (and its
    end-of-turn) only. Both sides share the prompt, the images and so `pixel_values`. Never
    packed: a pair is compared row by row.
    """
    try:
        prompt = record["prompt"]
        replies = {side: record[side] for side in PAIR_SIDES}
        if not all(isinstance(t, str) for t in (prompt, *replies.values())):
            raise TypeError("prompt, chosen and rejected must be strings")
        images = _images(record)
    except (KeyError, TypeError) as e:
        raise BadRecord(f"malformed record: {e!r}") from e
    out: dict[str, np.ndarray] = {}
    for side, reply in replies.items():
        turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]
        example = encode_example(
            {"images": images, "conversations": turns}, kind="conversation",
            tokenizer=tokenizer, template=template, seq_len=seq_len, image_size=image_size,
            image_tokens=image_tokens, max_images=max_images, image_mode=image_mode)
        for name in _PAIR_TEXT:
            out[f"{side}_{name}"] = example[name]
        # Images precede both replies, so both sides keep the same ones.
        out.setdefault("pixel_values", example["pixel_values"])
    return out


def prompt_spec(seq_len: int, image_size: int, max_images: int = 1) -> dict[str, tuple]:
    """Fields of one rollout prompt: the prompt left-padded to seq_len (for generation), its
    segment ids, the images, and the reference answer's ids right-padded (all pad when none)."""
    spec = example_spec(seq_len, image_size, max_images)
    return {"prompt_ids": spec["input_ids"], "prompt_segment_ids": spec["segment_ids"],
            "pixel_values": spec["pixel_values"], "reference_ids": spec["input_ids"]}


def encode_prompt(
    record: dict[str, Any], *, tokenizer: TextTokenizer, template: str, seq_len: int,
    image_size: int, image_tokens: int, max_images: int = 1, image_mode: str = "pad",
) -> dict[str, np.ndarray]:
    """`{id, images, prompt, [reference]}` -> a prompt for sampling (see `prompt_spec`): the
    user turn then the assistant prefix. A prompt that does not fit is skipped, never cut; its
    images are checked as a conversation's are (`checked_image`)."""
    try:
        prompt, reference = record["prompt"], record.get("reference") or ""
        if not isinstance(prompt, str) or not isinstance(reference, str):
            raise TypeError("prompt and reference must be strings")
        ids, _ = render(template, [{"from": "human", "value": prompt}], tokenizer, image_tokens,
                        add_generation_prompt=True)
        images = _images(record)
    except (KeyError, TypeError, ValueError) as e:
        raise BadRecord(f"malformed record: {e!r}") from e
    if len(np.flatnonzero(ids == tokenizer.image_id)) != len(images) * image_tokens:
        raise BadRecord(f"wrong image count: {prompt.count(IMAGE_MARK)} {IMAGE_MARK} marks for "
                        f"{len(images)} images")
    if len(images) > max_images:
        raise BadRecord(f"too many images: {len(images)} > max_images={max_images}")
    ref = tokenizer.encode(reference)
    if len(ids) > seq_len or len(ref) > seq_len:
        raise BadRecord(f"prompt of {len(ids)} tokens or reference of {len(ref)} does not fit "
                        f"in seq_len={seq_len}")
    out = {name: np.zeros(shape, dtype)
           for name, (shape, dtype) in prompt_spec(seq_len, image_size, max_images).items()}
    pad = getattr(tokenizer, "pad_id", 0)
    out["prompt_ids"][:] = pad
    out["reference_ids"][:] = pad
    out["prompt_ids"][seq_len - len(ids):] = ids
    out["prompt_segment_ids"][seq_len - len(ids):] = 1
    out["reference_ids"][: len(ref)] = ref
    for j, image in enumerate(images):
        checked_image(image, image_size, image_mode, out=out["pixel_values"][j])
    return out


def vqa_prompt(record: dict[str, Any]) -> dict[str, Any]:
    """A SyntheticShapes.vqa question -> a rollout prompt whose reference is its answer."""
    return {"id": record["id"], "images": [record["image"]],
            "prompt": f"{IMAGE_MARK}\n{record['question']}", "reference": record["answer"]}


def _videos(record: dict[str, Any]) -> list[Any]:
    video = record.get("video")
    if video is None:
        return list(record.get("videos") or [])
    return list(video) if isinstance(video, list | tuple) else [video]


def _video_id(tokenizer: TextTokenizer) -> int | None:
    try:
        return tokenizer.video_id
    except ValueError:  # a tokenizer trained without <video>
        return None


def encode_flat_example(
    record: dict[str, Any], *, kind: str, tokenizer: TextTokenizer, template: str,
    seq_len: int, media: MediaOptions,
) -> dict[str, np.ndarray]:
    """A caption or conversation record with 0..N images and/or a `video` -> a fixed-length
    example plus its media: `crops` uint8 [k, S, S, 3] and `media` int32 [m, 6] (one row per
    image / clip in placeholder order; data_pipelines/media.py). Each `<image>` / `<video>`
    mark becomes `media.token_count(row)` placeholders. Too-long text is cut from the end,
    never inside a placeholder run; media cut away are dropped. Raises BadRecord."""
    try:
        turns, images = _conversation(record, kind)
        videos = _videos(record)
        ids, mask = render("plain" if kind == "caption" else template, turns, tokenizer, 1)
    except (KeyError, TypeError, ValueError) as e:
        raise BadRecord(f"malformed record: {e!r}") from e
    video_id = _video_id(tokenizer)
    is_image = ids == tokenizer.image_id
    is_video = (ids == video_id) if video_id is not None else np.zeros_like(is_image)
    if is_image.sum() != len(images):
        raise BadRecord(f"wrong image count: {int(is_image.sum())} {IMAGE_MARK} marks for "
                        f"{len(images)} images")
    if is_video.sum() != len(videos):
        raise BadRecord(f"wrong video count: {int(is_video.sum())} {VIDEO_MARK} marks for "
                        f"{len(videos)} videos")
    where = np.flatnonzero(is_image | is_video)
    pending = {True: iter(images), False: iter(videos)}
    crops, rows = [], []
    try:
        for at in where:
            item = next(pending[bool(is_image[at])])
            c, row = (image_media if is_image[at] else video_media)(item, media)
            crops.append(c)
            rows.append(row)
    except MediaError as e:
        raise BadRecord(str(e)) from e
    total = sum(len(c) for c in crops)
    if media.max_crops and total > media.max_crops:
        raise BadRecord(f"{OVER_BUDGET}: {total} crops, the budget of a batch group is "
                        f"{media.max_crops} (data.max_crops / batch shards)")
    counts = [int(media.token_count(row)) for row in rows]
    ids, mask, starts = expand_placeholders(ids, mask, where, counts)
    keep = min(len(ids), seq_len)
    for start, n in zip(starts, counts, strict=True):
        if start < keep < start + n:
            keep = int(start)
    kept = sum(1 for start, n in zip(starts, counts, strict=True) if start + n <= keep)
    ids, mask = ids[:keep], mask[:keep]
    if not mask[1:].any():
        raise BadRecord(f"no supervised token fits in seq_len={seq_len}")
    spec = example_spec(seq_len, media.crop_size)
    example = {name: np.zeros(shape, dtype) for name, (shape, dtype) in spec.items()
               if name != "pixel_values"}
    example["input_ids"][:keep] = ids
    example["targets"][: keep - 1] = ids[1:]
    example["loss_mask"][: keep - 1] = mask[1:]
    example["segment_ids"][:keep] = 1
    example["positions"][:keep] = np.arange(keep)
    example.update(empty_media(media.crop_size))
    if kept:
        example["crops"] = np.concatenate(crops[:kept])
        example["media"] = np.stack(rows[:kept])
    return example
