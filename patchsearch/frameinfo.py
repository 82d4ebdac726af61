"""What a frame is, from its header alone: format allow-list, pixel budget, decode cost.

:func:`probe_frame` opens a frame with Pillow restricted to :data:`ALLOWED_FORMATS` and
reads only its header (no pixel is decoded), so a service can refuse a frame that is too
large or of a format it does not take before spending memory on it, and size a decode
semaphore with :func:`decode_cost_bytes`. Re-exported by :mod:`patchsearch.data`.
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .errors import FrameTooLargeError, InputError, UnsupportedFormatError

# Pillow format names a camera or a frame grabber delivers. Nothing that calls out to an
# external program (EPS/PS/PDF go to Ghostscript) nor rarely used, rarely audited decoders.
# "PPM" is Pillow's plugin for the Netpbm family (PBM, PGM, PPM, PFM).
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM"})
# Default pixel budget (width x height): 8192 x 8192, above any 65-megapixel area camera.
DEFAULT_MAX_PIXELS = 8192 * 8192
MIN_IMAGE_SIDE = 16
# ImageNet per-channel mean and std (RGB, on [0, 1] values): the backbones' input normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_NORM = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}  # as a manifest records it

# Bytes one decoded pixel takes in Pillow's own storage (multi-band 8-bit modes take 4).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_SAMPLE_BITS = {"1": 1, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 32, "F": 32}
# What other formats look like, for a useful message (they are never handed to Pillow).
_SIGNATURES = ((b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"),
               (b"GIF8", "GIF"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"),
               (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"), (b"<?xml", "XML/SVG"), (b"<svg", "SVG"),
               (b"\xd7\xcd\xc6\x9a", "WMF"), (b"\x01\x00\x00\x00", "EMF"))
_ALLOWED_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"RIFF")


@dataclass(frozen=True)
class FrameInfo:
    """A frame's header.

    Attributes:
        format: Pillow format name, one of :data:`ALLOWED_FORMATS` (a multi-picture JPEG
            is ``"JPEG"``).
        width, height: pixels.
        mode: Pillow mode (``"L"``, ``"RGB"``, ``"I;16"``, ``"F"``, ...).
        bits: bits per sample as stored (1, 8, 16 or 32).
        bands: samples per pixel.
        bytes_per_pixel: what one decoded pixel takes in memory (Pillow keeps multi-band
            8-bit images at 4 bytes a pixel).
    """

    format: str
    width: int
    height: int
    mode: str
    bits: int
    bands: int
    bytes_per_pixel: int

    @property
    def pixels(self) -> int:
        """width x height."""
        return self.width * self.height


def _sniff(head: bytes) -> str | None:
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    return None


def _allowed_names() -> str:
    return ", ".join(sorted(ALLOWED_FORMATS))


def _source(source, name: str | None):
    """(file object or path for Image.open, name for messages, first bytes)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InputError(f"{name or 'image'}: empty file (0 bytes)")
        return io.BytesIO(data), name or "image", data[:16]
    if isinstance(source, (str, os.PathLike)):
        name = name or str(source)
        try:
            with open(source, "rb") as f:
                head = f.read(16)
        except FileNotFoundError:
            raise InputError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{name}: is a folder, not an image") from None
        except OSError as exc:
            raise InputError(f"{name}: cannot be read ({exc.strerror or exc})") from None
        if not head:
            raise InputError(f"{name}: empty file (0 bytes)")
        return source, name, head
    pos = source.tell()  # a binary file object
    head = source.read(16)
    source.seek(pos)
    if not head:
        raise InputError(f"{name or 'image'}: empty file (0 bytes)")
    return source, name or getattr(source, "name", None) or "image", head


def open_frame(source, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None):
    """Open a frame (header only) restricted to :data:`ALLOWED_FORMATS` and check it.

    Returns (an open, not yet loaded PIL image, :class:`FrameInfo`, name); the caller
    closes the image. See :func:`probe_frame` for ``source`` and the errors.
    """
    fp, name, head = _source(source, name)
    limit = int(max_pixels)
    try:
        img = Image.open(fp, formats=sorted(ALLOWED_FORMATS))
    except UnidentifiedImageError:
        other = _sniff(head)
        if other:
            raise UnsupportedFormatError(f"{name}: {other} frames are not accepted (allowed formats: "
                                         f"{_allowed_names()})") from None
        if head.startswith(_ALLOWED_MAGIC) or re.match(rb"P[1-7fF]\s", head):
            raise InputError(f"{name}: not a readable image (corrupt or truncated header)") from None
        raise UnsupportedFormatError(f"{name}: not a readable image in an accepted format (allowed formats: "
                                     f"{_allowed_names()})") from None
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(found.group(1))} pixels" if found else "more pixels than Pillow opens"
        raise FrameTooLargeError(f"{name}: image has {pixels}, larger than the {limit} pixel limit "
                                 f"(max_pixels)", name, 0, 0, limit) from None
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{name}: cannot decode image ({exc})") from None
    try:
        info = _info(img, name)
        if info.pixels > limit:
            raise FrameTooLargeError(f"{name}: image is {info.width}x{info.height} = {info.pixels} pixels, larger "
                                     f"than the {limit} pixel limit (max_pixels)", name, info.width, info.height,
                                     limit)
        if min(info.width, info.height) < MIN_IMAGE_SIDE:
            raise InputError(f"{name}: image is {info.width}x{info.height}, smaller than {MIN_IMAGE_SIDE} "
                             f"pixels a side")
    except BaseException:
        img.close()
        raise
    return img, info, name


def _info(img, name: str) -> FrameInfo:
    fmt = "JPEG" if img.format == "MPO" else img.format
    if fmt not in ALLOWED_FORMATS:  # a plugin that hands over to another one
        raise UnsupportedFormatError(f"{name}: {fmt} frames are not accepted (allowed formats: {_allowed_names()})")
    width, height = (int(v) for v in img.size)
    mode = img.mode
    try:
        bands = Image.getmodebands(mode)
    except (KeyError, ValueError):
        bands = 1
    pixel_bytes = _PIXEL_BYTES.get(mode, 4)
    return FrameInfo(fmt, width, height, mode, _SAMPLE_BITS.get(mode, 8), bands, pixel_bytes)


def probe_frame(source, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> FrameInfo:
    """A frame's format, size and mode from its header (no pixel is decoded).

    Args:
        source: a path (str or path-like), the encoded bytes, or a seekable binary file
            object (read from its position; Pillow may close it).
        max_pixels: the pixel budget, width x height; larger frames are refused.
        name: what messages call the frame (default: the path, or "image").

    Returns:
        :class:`FrameInfo`.

    Raises:
        UnsupportedFormatError: not an image, or a format outside :data:`ALLOWED_FORMATS`
            (such a file is never handed to the decoder of its format).
        FrameTooLargeError: more than ``max_pixels`` pixels (with ``width``, ``height``,
            ``limit``; width and height are 0 where Pillow itself refused the header).
        InputError: missing, empty or unreadable file, corrupt header, or smaller than
            16 pixels a side. Every message names the frame.
    """
    img, info, _ = open_frame(source, max_pixels, name)
    img.close()
    return info


def reduce_factors(info: FrameInfo, geometry=None) -> tuple[int, int]:
    """(fx, fy): the integer factors a frame is shrunk by right after decoding for
    ``geometry`` (a :class:`~patchsearch.geometry.Geometry`), keeping at least 3 frame
    pixels per backbone-input pixel along each axis; (1, 1) without a geometry or for a
    frame less than 6 times the input.

    Frame mode: each axis against the input's (a turned frame's width against the input's
    height); crop mode: one factor, the shorter side against ``resize``.
    """
    w, h = info.width, info.height
    if geometry is None:
        return 1, 1
    if geometry.mode == "crop":
        f = max(1, min(w, h) // (3 * geometry.resize))
        return f, f
    H, W = geometry.input_size
    if geometry.turned((w, h)):
        H, W = W, H
    return max(1, w // (3 * W)), max(1, h // (3 * H))


def decode_cost_bytes(info: FrameInfo, geometry=None) -> int:
    """Upper estimate of the peak memory decoding and converting one frame takes, bytes.

    The decoded frame in Pillow's storage (twice for TIFF, whose decoder may keep a
    second buffer), plus the frame reduced for the backbone (:func:`reduce_factors`) and
    its 8-bit and RGB copies, plus a fixed 48 MiB for the input tensors and the buffers of
    the band-by-band conversion.
    Without ``geometry`` the frame is assumed not reducible (the worst case); a JPEG frame
    decoded at reduced scale costs less than estimated.

    Args:
        info: from :func:`probe_frame`.
        geometry: optional :class:`~patchsearch.geometry.Geometry` of the index the frame
            is prepared for (:func:`patchsearch.frames.prepare_frame`).
    """
    w, h = info.width, info.height
    decoded = w * h * info.bytes_per_pixel * (2 if info.format == "TIFF" else 1)
    fx, fy = reduce_factors(info, geometry)
    reduced = math.ceil(w / fx) * math.ceil(h / fy)
    # the reduced frame (native mode), its RGB image (4 B), tensor copies (3 + 3 B), 8-bit temporaries
    work = reduced * (info.bytes_per_pixel + 4 + 6 + 1)
    return int(decoded + work + (48 << 20))
