"""Image transforms for the input pipeline: decode to uint8 RGB, pad to square, resize."""

from __future__ import annotations

import functools
import io
import math
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
    if (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape == (size, size, 3)):
        # Already what PIL would return (no resize at the same size): skip the two copies
        # through PIL, most of an eval batch's host time on small images.
        if out is None:
            return img.copy()
        out[...] = img
        return out
    # Kept in PIL throughout: full-size numpy copies made up a third of the loader's time.
    pil = _rgb_image(img, max_pixels)
    width, height = pil.size
    if mode == "pad" and width > height:
        # PIL resamples horizontally into a uint8 image, then vertically. Run the horizontal pass
        # over the image rows only: on a pad row it gives exactly `fill` (the fixed-point weights
        # sum to 1 within far less than half a level), so the result is the same, ~20% sooner.
        if width != size:
            pil = pil.resize((size, height), Image.Resampling.BICUBIC)
        # Output rows that read padding only are `fill`; when a shorter canvas (a0 and a1 pad
        # rows fewer) resized to size - b0 - b1 rows gives the others bit for bit, the vertical
        # pass skips them.
        top = (width - height) // 2
        a0, b0, a1, b1 = _pad_rows_left_out(width, size, top, width - height - top)
        canvas = Image.new("RGB", (size, width - a0 - a1), tuple(fill))
        canvas.paste(pil, (0, top - a0))
        if b0 or b1:
            kept = canvas.resize((size, size - b0 - b1), Image.Resampling.BICUBIC)
            out = np.empty((size, size, 3), np.uint8) if out is None else out
            out[:b0] = fill
            out[b0 : size - b1] = np.asarray(kept)
            out[size - b1 :] = fill
            return out
        pil = canvas
    elif mode == "pad" and width < height:
        # Tall images: the same cut, on the columns (both passes run over fewer of them).
        left = (height - width) // 2
        a0, b0, a1, b1 = _pad_rows_left_out(height, size, left, height - width - left)
        canvas = Image.new("RGB", (height - a0 - a1, height), tuple(fill))
        canvas.paste(pil, (left - a0, 0))
        if b0 or b1:
            # One pass per call: on a narrow canvas PIL 13 may run the vertical pass first (seen
            # at 80x640), while the square canvas's resize runs the horizontal one first, and
            # the uint8 rounding between the passes makes the order matter.
            kept = canvas.resize((size - b0 - b1, height), Image.Resampling.BICUBIC)
            if height != size:
                kept = kept.resize((size - b0 - b1, size), Image.Resampling.BICUBIC)
            out = np.empty((size, size, 3), np.uint8) if out is None else out
            out[:, :b0] = fill
            out[:, b0 : size - b1] = np.asarray(kept)
            out[:, size - b1 :] = fill
            return out
        pil = canvas
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BICUBIC)
    if out is None:
        return np.array(pil, dtype=np.uint8)
    # np.asarray views the bytes PIL packs its RGBX rows into; np.array would copy them again.
    out[...] = np.asarray(pil)
    return out


@functools.lru_cache(maxsize=256)
def _pad_rows_left_out(side: int, size: int, top: int, bottom: int) -> tuple[int, int, int, int]:
    """(a0, b0, a1, b1) for a bicubic resize of `side` rows, the first `top` and last `bottom`
    of them padding, to `size` rows: output rows [0, b0) and [size - b1, size) read padding only,
    and the rows [a0, side - a1) resized alone to size - b0 - b1 rows give the others bit for bit.
    (0, 0, 0, 0) when there is no such cut.

    Checked on PIL's own fixed-point taps (_bicubic_taps): a row's taps must equal the full
    resize's, or both must read padding only (then the row is exactly `fill`: the weights sum to
    1 within far less than half a level). The cut keeps the scale exactly (a / b == side / size)
    and each filter centre is a single product, (y + 0.5) * scale, in both resizes, so a build
    that fuses multiply-adds (arm64) computes the same centres; only its filter polynomial may
    round differently in the last bit, which moves a 22-bit tap only for a weight within ~1e-9
    of a rounding edge."""
    if side <= size:
        return 0, 0, 0, 0
    g = math.gcd(side, size)
    p, q = side // g, size // g
    full = _bicubic_taps(side, size)

    def pad_only(first: int, taps: tuple[int, ...]) -> bool:
        return first + len(taps) <= top or first >= side - bottom

    k0 = k1 = 0
    while (k0 + 1) * q < size and pad_only(*full[(k0 + 1) * q - 1]):
        k0 += 1
    while (k1 + 1) * q < size and pad_only(*full[size - (k1 + 1) * q]):
        k1 += 1
    while k0 + k1 > 0:
        a0, b0, a1, b1 = k0 * p, k0 * q, k1 * p, k1 * q
        n = size - b0 - b1
        if n > 0 and (side - a0 - a1) / n == side / size:
            cut = _bicubic_taps(side - a0 - a1, n)
            if all((first + a0, taps) == full[y + b0]
                   or (pad_only(first + a0, taps) and pad_only(*full[y + b0]))
                   for y, (first, taps) in enumerate(cut)):
                return a0, b0, a1, b1
        k0, k1 = (k0 - 1, k1) if k0 >= k1 else (k0, k1 - 1)
    return 0, 0, 0, 0


@functools.lru_cache(maxsize=64)
def _bicubic_taps(in_size: int, out_size: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """Per output row, the first input row and the fixed-point weights (22 fraction bits) of
    PIL's bicubic resize of in_size rows to out_size: Resample.c's precompute_coeffs and
    normalize_coeffs_8bpc, step for step, in doubles as there."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support, ss = 2.0 * filterscale, 1.0 / filterscale

    def bicubic(x: float) -> float:
        x = -x if x < 0.0 else x
        if x < 1.0:
            return ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1
        if x < 2.0:
            return (((x - 5) * x + 8) * x - 4) * -0.5
        return 0.0

    rows = []
    for y in range(out_size):
        centre = (y + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        count = min(int(centre + support + 0.5), in_size) - first
        weights = [bicubic((x + first - centre + 0.5) * ss) for x in range(count)]
        total = 0.0
        for w in weights:
            total += w
        weights = [w / total for w in weights] if total != 0.0 else weights
        rows.append((first, tuple(int(w * (1 << 22) + (-0.5 if w < 0 else 0.5)) for w in weights)))
    return tuple(rows)


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
