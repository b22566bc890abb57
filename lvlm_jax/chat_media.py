"""The images and clips of a `lvlm generate` prompt as flattened media: any-res tiles, sampled
video frames, the placeholder runs HF's processors put in input_ids, and the model's MediaLayout.

A prompt is rendered with one placeholder per `<image>` / `<video>` mark; each is then expanded
to the tokens its image or clip takes (models/media_layout.num_media_tokens), image_token_id or
video_token_id, so the ids are laid out as the HF processors of LLaVA-NeXT(-Video) / OneVision
lay them out.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines.anyres import AnyresError, num_image_tokens, tile_image
from data_pipelines.images import prepare_image, to_rgb_uint8
from data_pipelines.templates import IMAGE_MARK
from data_pipelines.tokenizer_base import VIDEO_MARK
from lvlm_jax.models.media_layout import (
    Media,
    MediaLayout,
    build_layout,
    num_media_tokens,
    place_crops,
)
from lvlm_jax.models.vlm import normalize_pixels

MARKS = re.compile(f"{re.escape(IMAGE_MARK)}|{re.escape(VIDEO_MARK)}")
DEFAULT_NUM_FRAMES = 8


class BadInput(ValueError):
    """Input the user can fix; the CLI prints the message on one line and exits with code 2."""


@dataclasses.dataclass(frozen=True)
class PromptMedia:
    """A prompt's images and clips, each a (descriptor, uint8 crops [k, S, S, 3]) pair, in the
    order they were given; the k-th `<image>` mark takes images[k], the k-th `<video>` videos[k]."""

    images: tuple[tuple[Media, np.ndarray], ...] = ()
    videos: tuple[tuple[Media, np.ndarray], ...] = ()


def uses_layout(cfg: Any, n_videos: int = 0) -> bool:
    """Whether the model takes its images as flattened media (any-res tiles, a learned newline)
    or the prompt has a clip; other models keep the [1, images, S, S, 3] pixels."""
    return bool(cfg.image_grid_pinpoints or cfg.image_newline or n_videos)


def check_videos(paths: Sequence[str], num_frames: int | None = None) -> None:
    """Fails on a clip that is missing or does not decode (or is shorter than `num_frames`),
    before anything slow is loaded."""
    from data_pipelines import video

    if num_frames is not None and num_frames < 1:
        raise BadInput(f"num_frames must be at least 1, got {num_frames}")
    for path in paths:
        try:
            if os.path.isdir(path):
                total = len(video.frame_files(path))
                if not total:
                    raise video.VideoError(f"video folder {path!r} has no frame images")
            else:
                total = video.count_frames(path)
            if num_frames is not None and total < num_frames:
                raise video.VideoError(f"video {path!r}: clip has {total} frames, "
                                       f"{num_frames} asked")
        except video.VideoError as e:
            raise BadInput(str(e)) from None


def _image(cfg: Any, path: str, crop_size: int, image_mode: str) -> tuple[Media, np.ndarray]:
    if not cfg.image_grid_pinpoints:
        return Media(), prepare_image(path, crop_size, image_mode)[None]
    pixels = to_rgb_uint8(path)  # turned upright by its EXIF, as tile_image would
    try:  # asked first: it refuses a too-elongated image before any pixel is resized
        num_image_tokens(pixels.shape[:2], cfg.image_grid_pinpoints, crop_size,
                         cfg.vision.patch_size)
        tiles = tile_image(pixels, cfg.image_grid_pinpoints, crop_size)
    except AnyresError as e:
        raise BadInput(f"image {path!r} cannot be tiled for this model: {e}") from None
    return Media(grid=tiles.grid, image_size=tiles.image_size), tiles.crops


def read_media(cfg: Any, image_paths: Sequence[str], video_paths: Sequence[str], *,
               crop_size: int, image_mode: str = "pad", num_frames: int = DEFAULT_NUM_FRAMES
               ) -> PromptMedia:
    """Image files (tiled when the model is any-res) and clips (`num_frames` frames each) ->
    PromptMedia. Image files are assumed checked (chat.check_image_files); a clip that cannot
    give its frames, or a model without video, raises BadInput."""
    from data_pipelines import video

    if video_paths and cfg.video_token_id < 0:
        raise BadInput("this model takes no video (its model.video_token_id is unset)")
    if (image_paths or video_paths) and cfg.connector.kind != "projector":
        raise BadInput(f"any-res images and video need a projector connector, not "
                       f"{cfg.connector.kind!r}")
    images = tuple(_image(cfg, p, crop_size, image_mode) for p in image_paths)
    videos = []
    for path in video_paths:
        try:
            frames = video.read_frames(path, num_frames)
        except video.VideoError as e:
            raise BadInput(str(e)) from None
        videos.append((Media(kind="video", frames=num_frames),
                       video.frames_to_crops(frames, crop_size)))
    return PromptMedia(images, tuple(videos))


def with_media_marks(prompt: str, n_images: int, n_videos: int = 0) -> str:
    """The prompt with one `<image>` per image and one `<video>` per clip prepended, unless it
    places them itself (then each kind's marks must match its count)."""
    images, videos = prompt.count(IMAGE_MARK), prompt.count(VIDEO_MARK)
    if images == 0 and videos == 0:
        marks = IMAGE_MARK * n_images + VIDEO_MARK * n_videos
        return marks + ("\n" if marks else "") + prompt
    for mark, have, given, what in ((IMAGE_MARK, images, n_images, "image(s)"),
                                    (VIDEO_MARK, videos, n_videos, "video(s)")):
        if have != given:
            raise BadInput(f"the prompt has {have} {mark} marks but {given} {what} were given")
    return prompt


def mark_kinds(conversation: Sequence[dict[str, str]]) -> list[str]:
    """"image" / "video" for each media mark of the conversation, in order."""
    return ["video" if m == VIDEO_MARK else "image"
            for turn in conversation for m in MARKS.findall(str(turn["value"]))]


def one_placeholder_each(conversation: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation with every `<video>` written as `<image>`, so the template renders one
    image placeholder per mark of either kind."""
    return [dict(t, value=str(t["value"]).replace(VIDEO_MARK, IMAGE_MARK))
            for t in conversation]


def expand_placeholders(cfg: Any, ids: np.ndarray, placeholder_id: int, kinds: Sequence[str],
                        media: PromptMedia) -> tuple[np.ndarray, np.ndarray, list[Media]]:
    """ids rendered with one `placeholder_id` per mark (of `kinds`) -> (ids with each mark's
    run of image_token_id / video_token_id, the mask of those runs, the marks' Media in
    order)."""
    where = np.flatnonzero(ids == placeholder_id)
    if len(where) != len(kinds):
        raise BadInput(f"the rendered prompt has {len(where)} media placeholders for "
                       f"{len(kinds)} marks")
    pending = {"image": iter(media.images), "video": iter(media.videos)}
    out, mask, order, start = [], [], [], 0
    for at, kind in zip(where, kinds, strict=True):
        descriptor, _ = next(pending[kind])
        n = num_media_tokens(cfg, descriptor)
        token = cfg.video_token_id if kind == "video" else cfg.image_token_id
        out += [ids[start:at], np.full(n, token, ids.dtype)]
        mask += [np.zeros(at - start, bool), np.ones(n, bool)]
        order.append(descriptor)
        start = at + 1
    out.append(ids[start:])
    mask.append(np.zeros(len(ids) - start, bool))
    return np.concatenate(out), np.concatenate(mask), order


def media_layout(cfg: Any, placeholder_mask: np.ndarray, order: Sequence[Media],
                 media: PromptMedia, kinds: Sequence[str], mean: Sequence[float],
                 std: Sequence[float]) -> MediaLayout:
    """The MediaLayout of one prompt row (`placeholder_mask` [1, t]): its crops in one group
    whose budget is exactly the crops it has, normalised for the vision tower."""
    pending = {"image": iter(media.images), "video": iter(media.videos)}
    crops = [next(pending[k])[1] for k in kinds]
    budget = max(sum(m.crops for m in order), 1)
    slots, weights, _ = build_layout(cfg, placeholder_mask, [list(order)],
                                     crops_per_group=budget)
    pixels, _ = place_crops([crops], crops_per_group=budget)
    pixels = normalize_pixels(pixels, mean, std)
    return MediaLayout(np.asarray(pixels), slots, weights)
