"""Pictures a person can read: heatmaps on a fixed scale, overlays with region boxes,
and raw anomaly maps on disk.

The colour scale is anchored on the calibrated pixel threshold t, never normalised per
image, so one colour means one map value on every frame: a good part stays calm and a
defect stands out. With v = amap / t::

    v <= 0.5     dark blue      (fully transparent in the overlay: the frame shows)
    0.65         blue
    0.75         cyan
    0.875        yellow
    1.0          red            (the threshold: from here a pixel is defective)
    vmax / t     dark red       (default vmax = 2 t; beyond it the colour stays)

colours linearly interpolated in between (a jet-like ramp squeezed into [0.5 t, t]).
All writes are atomic: a temporary file in the target folder, then ``os.replace``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin

from .errors import InputError
from .files import atomic_write

# (v = amap / threshold, RGB); the last stop moves to vmax / threshold.
_STOPS = ((0.5, (0, 0, 128)), (0.65, (0, 90, 255)), (0.75, (0, 220, 255)),
          (0.875, (255, 230, 0)), (1.0, (255, 0, 0)), (2.0, (170, 0, 0)))
TRANSPARENT_BELOW = 0.5          # overlay alpha ramps from 0 at 0.5 t to full at t
BOX_COLOUR = (255, 0, 255)       # magenta: not on the heat ramp
BOX_WIDTH = 2                    # pixels, drawn inside the bbox
PNG_SCALE = 1000.0               # 16-bit raw maps store round(value * scale)
_PNG_SCALE_KEY = "patchsearch_scale"


def _ratio_map(amap, pixel_threshold: float) -> np.ndarray:
    amap = np.asarray(amap, dtype=np.float64)
    if amap.ndim != 2:
        raise InputError(f"anomaly map must be 2-D (H, W), got shape {amap.shape}")
    if np.isnan(amap).any():
        raise InputError("anomaly map contains NaN; the frame cannot be rendered")
    if not (math.isfinite(pixel_threshold) and pixel_threshold > 0):
        raise InputError(f"pixel threshold must be a finite number > 0, got {pixel_threshold}")
    return amap / pixel_threshold


def heatmap_rgb(amap, pixel_threshold: float, vmax: float | None = None) -> np.ndarray:
    """The anomaly map in colour on the fixed, threshold-anchored scale (module docstring).

    Args:
        amap: float (H, W) anomaly map (L2 distances, the map's own units).
        pixel_threshold: calibrated pixel threshold t (> 0), drawn red.
        vmax: map value drawn dark red, > t; default 2 t.

    Returns:
        uint8 (H, W, 3) RGB.

    Raises:
        InputError: amap not 2-D or holds NaN, threshold not > 0, vmax <= threshold.
    """
    v = _ratio_map(amap, pixel_threshold)
    top = 2.0 if vmax is None else vmax / pixel_threshold
    if not top > 1.0:
        raise InputError(f"vmax ({vmax}) must be above the pixel threshold ({pixel_threshold})")
    xp = [x for x, _ in _STOPS[:-1]] + [top]
    colours = np.array([c for _, c in _STOPS], dtype=np.float64)
    rgb = np.stack([np.interp(v, xp, colours[:, ch]) for ch in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def overlay(image_rgb, amap, pixel_threshold: float, regions=None, alpha: float = 0.5) -> np.ndarray:
    """The frame with the heatmap blended in where the map matters, and region boxes.

    Per pixel the heatmap's opacity is alpha * clip((v - 0.5) / 0.5, 0, 1) ** 2, v = amap / t:
    0 up to half the threshold (the frame is unchanged there), rising slowly (a quarter
    of ``alpha`` at 0.75 t, so a good part stays calm) to ``alpha`` from the threshold up.

    Args:
        image_rgb: uint8 (H, W, 3) frame.
        amap: float (H, W) anomaly map at the frame's resolution.
        pixel_threshold: calibrated pixel threshold t (> 0).
        regions: optional list of dicts from :func:`patchsearch.regions.defect_regions`
            (their "bbox" [x0, y0, x1, y1], x1/y1 exclusive, frame pixels); each is
            outlined BOX_WIDTH pixels wide, inside the box, in BOX_COLOUR.
        alpha: opacity of the heatmap at and above the threshold, in [0, 1].

    Returns:
        uint8 (H, W, 3), a new array.

    Raises:
        InputError: shapes or dtypes do not fit, amap holds NaN, alpha out of [0, 1].
    """
    image = np.asarray(image_rgb)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"frame must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if np.shape(amap) != image.shape[:2]:
        raise InputError(f"anomaly map {np.shape(amap)} does not match the frame {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    v = _ratio_map(amap, pixel_threshold)
    weight = alpha * np.clip((v - TRANSPARENT_BELOW) / (1.0 - TRANSPARENT_BELOW), 0.0, 1.0)[..., None] ** 2
    heat = heatmap_rgb(amap, pixel_threshold).astype(np.float64)
    blended = np.rint((1.0 - weight) * image + weight * heat).astype(np.uint8)
    if not regions:
        return blended
    canvas = Image.fromarray(blended)
    draw = ImageDraw.Draw(canvas)
    for region in regions:
        x0, y0, x1, y1 = region["bbox"]
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=BOX_COLOUR, width=BOX_WIDTH)
    return np.asarray(canvas).copy()


def _atomic_write(path, write) -> None:
    """Call write(binary file) on an in-memory buffer, then :func:`patchsearch.files.atomic_write` it."""
    buf = io.BytesIO()
    write(buf)
    atomic_write(path, buf.getvalue())


def save_png(path, image_rgb) -> None:
    """Write a uint8 (H, W, 3) RGB image (e.g. :func:`overlay`) as PNG, atomically."""
    image = Image.fromarray(np.asarray(image_rgb, dtype=np.uint8))
    _atomic_write(path, lambda f: image.save(f, format="PNG"))


def write_raw_map(path, amap, png_scale: float = PNG_SCALE) -> None:
    """Write an anomaly map for later analysis, atomically; the format follows the suffix.

    ``.npy``: float32, exact (NaN and inf kept). ``.png``: 16-bit grayscale holding
    round(value * png_scale) clipped to [0, 65535]; with the default scale 1000 that is
    0.001 steps (error <= 0.0005) up to 65.535. The scale is stored in the PNG's text
    chunk ``patchsearch_scale``, which :func:`read_raw_map` uses.

    Raises:
        InputError: not 2-D, an unknown suffix, or NaN in a map bound for PNG.
    """
    amap = np.asarray(amap, dtype=np.float32)
    if amap.ndim != 2:
        raise InputError(f"anomaly map must be 2-D (H, W), got shape {amap.shape}")
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        _atomic_write(path, lambda f: np.save(f, amap, allow_pickle=False))
    elif suffix == ".png":
        if np.isnan(amap).any():
            raise InputError("anomaly map contains NaN; a PNG cannot hold it (use .npy)")
        if not (math.isfinite(png_scale) and png_scale > 0):
            raise InputError(f"png_scale must be a finite number > 0, got {png_scale}")
        counts = np.clip(np.rint(amap.astype(np.float64) * png_scale), 0, 65535).astype(np.uint16)
        info = PngImagePlugin.PngInfo()
        info.add_text(_PNG_SCALE_KEY, repr(float(png_scale)))
        image = Image.fromarray(counts)
        _atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))
    else:
        raise InputError(f"raw map path must end in .npy or .png, got {path}")


def read_raw_map(path) -> np.ndarray:
    """Read a map written by :func:`write_raw_map`: float32 (H, W) in map units.

    Raises:
        InputError: an unknown suffix, or a PNG without the ``patchsearch_scale`` text.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32, copy=False)
    if suffix != ".png":
        raise InputError(f"raw map path must end in .npy or .png, got {path}")
    with Image.open(path, formats=["PNG"]) as image:
        scale = image.text.get(_PNG_SCALE_KEY) if hasattr(image, "text") else None
        if scale is None:
            raise InputError(f"{path} is not a patchsearch raw map (no {_PNG_SCALE_KEY} text chunk)")
        counts = np.asarray(image)
    return (counts.astype(np.float64) / float(scale)).astype(np.float32)
