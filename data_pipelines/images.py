"""Image transforms for the input pipeline: decode to uint8 RGB, pad to square, resize."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# LLaVA pads with the CLIP image mean, (0.4815, 0.4578, 0.4082) * 255, truncated as LLaVA does.
CLIP_MEAN_RGB = (122, 116, 104)
MODES = ("pad", "resize")
_ORIENTATION = 0x0112  # the EXIF tag


def to_rgb_uint8(img: Any) -> np.ndarray:
    """uint8 [H, W, 3] RGB from a uint8 array (HW, HWC with 1/3/4 channels), a PIL image,
    encoded bytes or a file path. Alpha is dropped, palette and grayscale images are expanded."""
    if isinstance(img, bytes | bytearray | memoryview | str | Path):
        source = io.BytesIO(bytes(img)) if not isinstance(img, str | Path) else img
        with Image.open(source) as opened:
            img = ImageOps.exif_transpose(opened)  # camera photos store their rotation in EXIF
            img.load()
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    array = np.asarray(img)
    if array.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image array, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an [H, W], [H, W, 1|3|4] image, got shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[:, :, :3])


def pad_to_square(img: np.ndarray, fill: tuple[int, int, int] = CLIP_MEAN_RGB) -> np.ndarray:
    """Centers the image on a square canvas of `fill` colour (LLaVA-1.5's expand2square)."""
    height, width = img.shape[:2]
    if height == width:
        return img
    side = max(height, width)
    out = np.empty((side, side, img.shape[2]), dtype=img.dtype)
    out[...] = np.asarray(fill, dtype=img.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = img
    return out


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize to [size, size] (PIL), stretching a non-square image."""
    if img.shape[:2] == (size, size):
        return img
    resized = Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


class ImageTooLarge(ValueError):
    """An encoded image whose header gives more pixels than allowed; it is never decoded."""


def prepare_image(
    img: Any, size: int, mode: str = "pad", fill: tuple[int, int, int] = CLIP_MEAN_RGB,
    max_pixels: int | None = None, out: np.ndarray | None = None,
) -> np.ndarray:
    """Any supported image -> uint8 [size, size, 3]; "pad" keeps the aspect ratio, "resize" not.

    The pixels are exactly those of `resize(pad_to_square(to_rgb_uint8(img)), size)` (tested).
    Encoded images with more than `max_pixels` pixels raise ImageTooLarge before decoding.
    `out`, a uint8 [size, size, 3] array (e.g. a slot of a batch), receives the pixels and is
    returned: one copy out of PIL instead of two.
    """
    if mode not in MODES:
        raise ValueError(f"unknown image mode {mode!r}; valid modes: {list(MODES)}")
    # Kept in PIL throughout: full-size numpy copies made up a third of the loader's time.
    pil = _rgb_image(img, max_pixels)
    width, height = pil.size
    if mode == "pad" and width > height:
        # PIL resamples horizontally into a uint8 image, then vertically. Run the horizontal pass
        # over the image rows only: on a pad row it gives exactly `fill` (the fixed-point weights
        # sum to 1 within far less than half a level), so the result is the same, ~20% sooner.
        if width != size:
            pil = pil.resize((size, height), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (size, width), tuple(fill))
        canvas.paste(pil, (0, (width - height) // 2))
        pil = canvas
    elif mode == "pad" and width < height:
        canvas = Image.new("RGB", (height, height), tuple(fill))
        canvas.paste(pil, ((height - width) // 2, 0))
        pil = canvas
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BICUBIC)
    if out is None:
        return np.array(pil, dtype=np.uint8)
    # np.asarray views the bytes PIL packs its RGBX rows into; np.array would copy them again.
    out[...] = np.asarray(pil)
    return out


def _rgb_image(img: Any, max_pixels: int | None = None) -> Image.Image:
    """A PIL RGB image of anything `to_rgb_uint8` takes, decoded and rotated the same way."""
    if isinstance(img, bytes | bytearray | memoryview | str | Path):
        source = io.BytesIO(bytes(img)) if not isinstance(img, str | Path) else img
        with Image.open(source) as opened:
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(
                    f"image too large: {width}x{height} is over {max_pixels} pixels")
            if opened.getexif().get(_ORIENTATION, 1) == 1:
                opened.load()  # no rotation: skip exif_transpose's full-size copy
                img = opened
            else:
                img = ImageOps.exif_transpose(opened)  # camera photos store their rotation
                img.load()
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    return Image.fromarray(to_rgb_uint8(img))
