"""Video clips on the host: frames sampled uniformly from a file, its bytes or a frame folder."""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class VideoError(ValueError):
    """A clip that cannot give the frames asked: missing, undecodable, too short, empty."""


def sample_indices(total: int, num_frames: int) -> np.ndarray:
    """The `num_frames` frame indices of a `total`-frame clip, spread evenly from frame 0:
    floor(i * total / num_frames), as HF's video processors sample (video_utils'
    default_sample_indices_fn, used by LLaVA-NeXT-Video and OneVision with num_frames set)."""
    if num_frames < 1:
        raise VideoError(f"num_frames must be at least 1, got {num_frames}")
    if num_frames > total:
        raise VideoError(f"clip has {total} frames, {num_frames} asked")
    return np.arange(num_frames, dtype=np.int64) * total // num_frames


def _name(source: Any) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return repr(os.fspath(source))


def read_frames(source: Any, num_frames: int) -> np.ndarray:
    """uint8 [num_frames, H, W, 3] sampled uniformly (`sample_indices`) from `source`: a video
    file's path, its bytes (as ArrayRecord shards carry it), or a folder of frame images (in
    natural name order: frame_2 before frame_10). Raises VideoError naming the problem."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _read_video(bytes(source), num_frames, _name(source))
    path = os.fspath(source)
    if os.path.isdir(path):
        return _read_folder(path, num_frames)
    if not os.path.isfile(path):
        raise VideoError(f"video {path!r} does not exist")
    return _read_video(path, num_frames, repr(path))


def count_frames(source: Any) -> int:
    """The frames of a video file or its bytes, checking that it decodes (its first frame);
    a cheap probe for converters. Raises VideoError."""
    if not isinstance(source, (bytes, bytearray, memoryview)) and not os.path.isfile(source):
        raise VideoError(f"video {_name(source)} does not exist")
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with _open(data, _name(source)) as container:
        total = _total_frames(container, _name(source))
        with _decode_errors(_name(source)):
            container.seek(0)
            if next(container.decode(video=0), None) is None:
                raise VideoError(f"video {_name(source)} has no decodable frames")
    return total


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {getattr(error, 'strerror', None) or error}"


def _open(data: Any, name: str) -> Any:
    import av

    try:
        container = av.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"video {name} cannot be decoded ({_reason(e)})") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"video {name} has no video stream (not a video, or cut short)")
    return container


@contextlib.contextmanager
def _decode_errors(name: str) -> Iterator[None]:
    """PyAV's decoding errors as one VideoError naming the clip."""
    import av

    try:
        yield
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"video {name} cannot be decoded ({_reason(e)})") from e


def _total_frames(container: Any, name: str) -> int:
    """The stream's frame count from its header, else from its packets (no decoding)."""
    stream = container.streams.video[0]
    if stream.frames > 0:
        return int(stream.frames)
    with _decode_errors(name):
        total = sum(1 for p in container.demux(stream) if p.size)
    return total


def _decode(data: Any, name: str, wanted: np.ndarray) -> tuple[list[np.ndarray], int]:
    """(the frames at the sorted indices `wanted`, the frames decoded to reach them or all)."""
    picked: list[np.ndarray] = []
    want, last, seen = set(wanted.tolist()), int(wanted[-1]), 0
    with _open(data, name) as container, _decode_errors(name):
        for frame in container.decode(video=0):
            if seen in want:
                picked.append(frame.to_ndarray(format="rgb24"))
            seen += 1
            if seen > last:
                break
    return picked, seen


def _sample(total: int, num_frames: int, name: str) -> np.ndarray:
    try:
        return sample_indices(total, num_frames)
    except VideoError as e:
        raise VideoError(f"video {name}: {e}") from None


def _read_video(data: Any, num_frames: int, name: str) -> np.ndarray:
    with _open(data, name) as container:
        total = _total_frames(container, name)
    frames, seen = _decode(data, name, _sample(total, num_frames, name))
    if len(frames) < num_frames:
        # The header promised more frames than decode (`seen` is then all there are): sample
        # again over those.
        if seen == 0:
            raise VideoError(f"video {name} has no decodable frames")
        frames, _ = _decode(data, name, _sample(seen, num_frames, name))
    return np.stack(frames).astype(np.uint8, copy=False)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def frame_files(folder: str) -> list[str]:
    """The frame images of a folder, in natural name order."""
    names = [n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)
             and not n.startswith(".")]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _read_folder(folder: str, num_frames: int) -> np.ndarray:
    files = frame_files(folder)
    if not files:
        raise VideoError(f"video folder {folder!r} has no frame images "
                         f"({', '.join(FRAME_EXTENSIONS)})")
    indices = _sample(len(files), num_frames, f"folder {folder!r}")
    frames = []
    for i in indices:
        try:
            with Image.open(files[i]) as img:
                frames.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        except (OSError, SyntaxError, ValueError) as e:
            raise VideoError(f"frame {files[i]!r} is not a readable image "
                             f"({type(e).__name__})") from e
        if frames[-1].shape != frames[0].shape:
            raise VideoError(f"frames of {folder!r} differ in size: {files[indices[0]]!r} is "
                             f"{frames[0].shape[1]}x{frames[0].shape[0]}, {files[i]!r} "
                             f"{frames[-1].shape[1]}x{frames[-1].shape[0]}")
    return np.stack(frames)


def frames_to_crops(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [n, H, W, 3] -> uint8 [n, size, size, 3] as HF's LlavaNextVideo video processor
    prepares frames by default: the shortest edge resized to `size` (bicubic, the long edge
    int(size * long / short)), then a centre crop of size x size (offsets int((d - size) / 2)).
    Normalisation happens on the device."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise VideoError(f"frames must be uint8 [n, H, W, 3], got {frames.dtype} "
                         f"{list(frames.shape)}")
    n, height, width, _ = frames.shape
    if min(height, width) < 1:
        raise VideoError(f"degenerate frame size {height}x{width}")
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    new_h, new_w = (new_long, size) if height > width else (size, new_long)
    top, left = int((new_h - size) / 2), int((new_w - size) / 2)
    out = np.empty((n, size, size, 3), np.uint8)
    for i, frame in enumerate(frames):
        img = Image.fromarray(frame)
        if (new_w, new_h) != (width, height):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        out[i] = np.asarray(img)[top:top + size, left:left + size]
    return out
