"""A frame file (or its bytes) straight to backbone input, in bounded memory.

:func:`prepare_frame` is what :class:`patchsearch.data.ImageDataset` (hence ``query``,
``build``, ``evaluate``) runs per frame: open with the allowed formats only and check
the pixel budget from the header (:func:`patchsearch.frameinfo.open_frame`), decode,
check the pixel values, and bring the frame to the geometry's input
(:class:`patchsearch.geometry.Geometry`) without any frame-sized copy beyond the decoded
frame itself:

* a frame at least 6 times the input along an axis is reduced as early as its format
  allows: JPEG frames are decoded at 1/2, 1/4 or 1/8 scale (``draft``), every other
  format is box-averaged by an integer factor right after decoding
  (``Image.reduce`` in bands of rows; a numpy block mean for 16-bit and float frames),
  keeping at least 3 frame pixels per input pixel, then resampled once to the input
  (bilinear, antialiased) from the exact frame box;
* more-than-8-bit frames are checked and scaled to 8 bits (:func:`patchsearch.data.load_image`'s
  fixed rule) band by band, at the reduced resolution;
* in crop mode only the part of the frame under the centre crop is converted and
  resampled: a 16 x 120000 frame is never upscaled whole first.

Frames smaller than that go the way they always went (8-bit RGB, then
:meth:`Geometry.frame_tensor`), so the backbone input of ordinary frames is unchanged.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .errors import InputError
from .frameinfo import DEFAULT_MAX_PIXELS, FrameInfo, open_frame, reduce_factors

HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_BAND_PIXELS = 1 << 20  # rows are converted in bands of about this many pixels
_CROP_BLOWUP = 8  # crop mode: crop first when the resized frame would exceed 8 x resize^2


class PixelValueError(InputError):
    """A frame holds pixel values it cannot be judged with.

    Attributes:
        reason: ``"non_finite_pixels"`` (NaN or infinite samples in a float frame) or
            ``"out_of_range_pixels"`` (negative, above 1.0 in a float frame, or above the
            camera's full scale ``2 ** bit_depth - 1``).
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def error_reason(exc: BaseException) -> str:
    """The ``reason`` a frame that raised ``exc`` is reported ERROR with: ``too_large``,
    ``unsupported_format``, ``non_finite_pixels``, ``out_of_range_pixels`` or ``unreadable``."""
    from .errors import FrameTooLargeError, UnsupportedFormatError

    if isinstance(exc, FrameTooLargeError):
        return "too_large"
    if isinstance(exc, UnsupportedFormatError):
        return "unsupported_format"
    return getattr(exc, "reason", None) or "unreadable"


def peak_of(mode: str, bit_depth: int | None) -> float:
    """The full-scale value of a more-than-8-bit frame: 1.0 for float (mode ``F``) frames,
    ``2 ** bit_depth - 1`` (bit depth 16 when None) for integer ones."""
    return 1.0 if mode == "F" else float(2 ** (bit_depth or 16) - 1)


def _bands(height: int, width: int, step: int = 1):
    """Row bands [y0, y1) of about _BAND_PIXELS pixels, each a multiple of ``step`` rows."""
    rows = max(step, (_BAND_PIXELS // max(width, 1)) // step * step)
    for y0 in range(0, height, rows):
        yield y0, min(height, y0 + rows)


def check_values(block: np.ndarray, mode: str, peak: float, name: str) -> None:
    """Raise :class:`PixelValueError` naming ``name`` if ``block`` (samples of a frame of
    ``mode``) holds NaN/inf, negative values, or values above ``peak``."""
    if mode == "F" and not np.isfinite(block).all():
        raise PixelValueError(f"{name}: the frame holds NaN or infinite pixel values; it cannot be judged",
                              "non_finite_pixels")
    lo, hi = float(block.min()), float(block.max())
    if lo < 0 or hi > peak:
        what = "float frames hold 0..1" if mode == "F" else f"the camera's full scale is {peak:.0f}"
        raise PixelValueError(f"{name}: pixel values {lo:g}..{hi:g} are out of range ({what}; set the bit depth "
                              f"the camera delivers)", "out_of_range_pixels")


def high_bit_to_l(img: Image.Image, bit_depth: int | None, name: str, box=None, factors=(1, 1)) -> Image.Image:
    """A decoded more-than-8-bit frame (mode ``I;16*``, ``I`` or ``F``) -> 8-bit ``L`` image.

    Every sample is checked (:func:`check_values`); then the region ``box`` (left, top,
    right, bottom; whole frame by default) is box-averaged by ``factors`` (fx, fy) (a
    partial block at the right/bottom edge averages the pixels it has) and scaled by
    ``value * 255 / peak`` (:func:`peak_of`), rounded. Works in bands of rows: no
    frame-sized temporary.
    """
    w, h = img.size
    peak = peak_of(img.mode, bit_depth)
    for y0, y1 in _bands(h, w):
        check_values(np.asarray(img.crop((0, y0, w, y1))), img.mode, peak, name)
    left, top, right, bottom = box or (0, 0, w, h)
    fx, fy = factors
    out = np.empty((math.ceil((bottom - top) / fy), math.ceil((right - left) / fx)), np.uint8)
    for y0, y1 in _bands(bottom - top, right - left, fy):
        a = np.asarray(img.crop((left, top + y0, right, top + y1)), dtype=np.float64)
        if fx > 1 or fy > 1:
            rows, cols = np.arange(0, a.shape[0], fy), np.arange(0, a.shape[1], fx)
            count = np.outer(np.diff(np.append(rows, a.shape[0])), np.diff(np.append(cols, a.shape[1])))
            a = np.add.reduceat(np.add.reduceat(a, rows, axis=0), cols, axis=1) / count
        out[y0 // fy:y0 // fy + len(a)] = np.clip(np.rint(a * (255.0 / peak)), 0, 255)
    return Image.fromarray(out, mode="L")


def to_rgb8(img: Image.Image, bit_depth: int | None, name: str) -> Image.Image:
    """A decoded frame -> 8-bit RGB of the same size: grayscale, palette and alpha
    (dropped) images converted, more-than-8-bit ones by :func:`high_bit_to_l`."""
    if img.mode in HIGH_BIT_MODES:
        return high_bit_to_l(img, bit_depth, name).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    return img.convert("RGB")


def _reduced_rgb(img: Image.Image, bit_depth: int | None, name: str, box, factors) -> Image.Image:
    """The region ``box`` of a decoded frame, box-averaged by ``factors``, as 8-bit RGB."""
    if img.mode in HIGH_BIT_MODES:
        return high_bit_to_l(img, bit_depth, name, box, factors).convert("RGB")
    left, top, right, bottom = box
    fx, fy = factors
    mode = "L" if img.mode in ("L", "1") else "RGB"
    out = Image.new(mode, (math.ceil((right - left) / fx), math.ceil((bottom - top) / fy)))
    for y0, y1 in _bands(bottom - top, right - left, fy):
        band = img.crop((left, top + y0, right, top + y1))
        if band.mode == "1":  # Image.reduce takes neither 1-bit nor palette images
            band = band.convert("L")
        elif band.mode != mode:  # palette (with its transparency), alpha, CMYK, ... -> RGB, band by band
            band = to_rgb8(band, bit_depth, name)
        out.paste(band.reduce((fx, fy)) if fx > 1 or fy > 1 else band, (0, y0 // fy))
    return out.convert("RGB")


def _crop_resize(geometry, w: int, h: int) -> tuple[int, int]:
    """(new_w, new_h) the whole frame would be resized to in crop mode (torchvision
    Resize(int) arithmetic, as :meth:`Geometry.crop_box`)."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(geometry.resize * long / short)
    return (geometry.resize, new_long) if w <= h else (new_long, geometry.resize)


def _input_tensor(rgb: Image.Image, geometry):
    """8-bit RGB already at the input size (W, H) -> normalised (T, 3, th, tw) tiles."""
    import torch
    from torchvision.transforms import v2

    from .frameinfo import IMAGENET_MEAN, IMAGENET_STD

    t = v2.functional.pil_to_tensor(rgb)
    t = v2.functional.normalize(v2.functional.to_dtype(t, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
    return torch.stack([t[:, top:bottom, left:right] for top, left, bottom, right in geometry.tile_boxes()])


def prepare_frame(source, geometry, bit_depth: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                  name: str | None = None):
    """Decode a frame into backbone input for ``geometry`` (see the module docstring).

    Args:
        source: a path, the encoded bytes, or a binary file object.
        geometry: the index's :class:`~patchsearch.geometry.Geometry`.
        bit_depth: the camera's bit depth for frames of more than 8 bits
            (:func:`patchsearch.data.load_image`).
        max_pixels: the pixel budget, width x height, checked from the header.
        name: what messages call the frame (default: the path, or "image").

    Returns:
        (float32 tensor (T, 3, th, tw) as :meth:`Geometry.frame_tensor` returns it,
        (width, height) of the frame as stored).

    Raises:
        UnsupportedFormatError, FrameTooLargeError: see :func:`patchsearch.data.probe_frame`.
        PixelValueError: NaN, infinite or out-of-range pixel values (``reason`` says which).
        InputError: empty, truncated or undecodable frame, too small. Messages name the frame.
    """
    img, info, name = open_frame(source, max_pixels, name)
    w, h = info.width, info.height
    try:
        with img:
            fx, fy = reduce_factors(info, geometry)
            scale = 1
            if info.format == "JPEG" and min(fx, fy) >= 2:
                drafted = img.draft(img.mode, (w // fx, h // fy))
                if drafted is not None:
                    scale = round(w / drafted[1][2])
            img.load()
            dw, dh = img.size
            if scale > 1:  # what is left to reduce after the JPEG decoder's scaling
                fx, fy = max(1, fx // scale), max(1, fy // scale)
            crop_first = geometry.mode == "crop" and math.prod(_crop_resize(geometry, w, h)) > \
                _CROP_BLOWUP * geometry.resize ** 2
            if scale == 1 and fx == fy == 1 and not crop_first:
                return geometry.frame_tensor(to_rgb8(img, bit_depth, name)), (w, h)
            # frame box -> decoded (drafted) pixels: x / scale; -> reduced pixels: / (fx, fy)
            fl, ft, fr, fb = geometry.crop_box(w, h)
            sx = sy = 1 / scale
            box = (max(0, math.floor(fl * sx) - 2), max(0, math.floor(ft * sy) - 2),
                   min(dw, math.ceil(fr * sx) + 2), min(dh, math.ceil(fb * sy) + 2))
            rgb = _reduced_rgb(img, bit_depth, name, box, (fx, fy))
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{name}: cannot decode image ({exc})") from None
    exact = ((fl * sx - box[0]) / fx, (ft * sy - box[1]) / fy, (fr * sx - box[0]) / fx, (fb * sy - box[1]) / fy)
    H, W = geometry.input_size
    if geometry.mode == "frame" and geometry.turned((w, h)):  # resize, then turn counter-clockwise
        rgb = rgb.resize((H, W), Image.BILINEAR, box=exact).transpose(Image.Transpose.ROTATE_90)
    else:
        rgb = rgb.resize((W, H), Image.BILINEAR, box=exact)
    return _input_tensor(rgb, geometry), (w, h)
