"""Images in, tensors out: the MVTec AD layout, frame decoding and batching.

The MVTec AD layout (also anomalib's ``MVTecAD``)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png          (defect "good" = normal)
    <root>/<category>/ground_truth/<defect>/<name>_mask.png

How a decoded frame becomes backbone input (whole frame or the paper's centre crop,
tiles) is :mod:`patchsearch.geometry`'s concern; this module decodes frames (any bit
depth, by a fixed rule per camera) and batches them.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from .errors import InputError
from .frameinfo import (ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, IMAGENET_MEAN, IMAGENET_STD,  # noqa: F401 (API)
                        MIN_IMAGE_SIDE, FrameInfo, decode_cost_bytes, open_frame, probe_frame)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")
DEFAULT_DATA_ROOT = "./datasets/MVTecAD"
MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS  # the former name


def default_data_root() -> Path:
    """``$PATCHSEARCH_DATA_ROOT`` if set, else ``./datasets/MVTecAD``."""
    return Path(os.environ.get("PATCHSEARCH_DATA_ROOT") or DEFAULT_DATA_ROOT)


@dataclass(frozen=True)
class Sample:
    """One test image of an MVTec AD category.

    ``label`` is 0 for ``test/good`` and 1 for any defect; ``mask_path`` is the
    ground-truth mask (None for good images, whose mask is all zero).
    """

    path: Path
    label: int
    defect: str
    mask_path: Path | None


def _sorted_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def category_dir(root: str | os.PathLike, category: str) -> Path:
    """The folder of ``category`` under the data root.

    Raises:
        InputError: the root or the category folder does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"data root {root} does not exist (set --data-root or PATCHSEARCH_DATA_ROOT)")
    folder = root / category
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise InputError(f"category {category!r} not found under {root} (found: {', '.join(found) or 'nothing'})")
    return folder


def train_images(root: str | os.PathLike, category: str) -> list[Path]:
    """Sorted paths of ``<root>/<category>/train/good`` images.

    Raises:
        InputError: missing root, category or ``train/good``, or no image in it.
    """
    folder = category_dir(root, category) / "train" / "good"
    if not folder.is_dir():
        raise InputError(f"{folder} does not exist: not an MVTec AD category folder")
    images = _sorted_images(folder)
    if not images:
        raise InputError(f"{folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def validation_images(root: str | os.PathLike, category: str) -> list[Path] | None:
    """Sorted ``<root>/<category>/validation/good`` images (for calibration), or None where
    the category has no such folder."""
    folder = category_dir(root, category) / "validation" / "good"
    return _sorted_images(folder) or None if folder.is_dir() else None


def test_samples(root: str | os.PathLike, category: str) -> list[Sample]:
    """All test images of a category with labels and mask paths, sorted by defect then name.

    Raises:
        InputError: missing folders, no test image, or a defect image without its mask.
    """
    base = category_dir(root, category)
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise InputError(f"{test_dir} does not exist: not an MVTec AD category folder")
    samples = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for path in _sorted_images(defect_dir):
            if defect == "good":
                samples.append(Sample(path, 0, defect, None))
                continue
            mask = base / "ground_truth" / defect / f"{path.stem}_mask.png"
            if not mask.is_file():
                raise InputError(f"{path}: ground-truth mask {mask} is missing")
            samples.append(Sample(path, 1, defect, mask))
    if not samples:
        raise InputError(f"{test_dir} holds no test image")
    return samples


def list_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (non-recursive, sorted) into image paths.

    Files are kept whatever their extension, so that a bad file is reported by
    :func:`load_image` rather than silently skipped.

    Raises:
        InputError: a path does not exist, or a folder holds no image.
    """
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = _sorted_images(path)
            if not images:
                raise InputError(f"{path}: folder holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(images)
        elif path.exists():
            out.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return out


def frame_size(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an image file from its header (pixels are not decoded).

    Raises:
        InputError: the file cannot be read as an image of an allowed format, or is
            larger than ``max_pixels`` (see :func:`probe_frame`).
    """
    info = probe_frame(path, max_pixels)
    return info.width, info.height


def load_image(path: str | os.PathLike, bit_depth: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file to 8-bit RGB.

    Grayscale, palette and RGBA (alpha dropped) images are converted. Frames of more
    than 8 bits (16-bit PNG/TIFF, mode ``I;16`` or ``I``) are scaled by a fixed rule,
    the same for every frame of a camera and never from one frame's content:
    ``value * 255 / (2 ** bit_depth - 1)``, rounded and clipped to 0..255.

    Args:
        bit_depth: the camera's bit depth (8, 10, 12 or 16) for frames of more than 8
            bits; None = from the file's mode (16 for 16-bit and 32-bit integer images).
            Floating-point images (mode ``F``) are taken as 0..1.
        max_pixels: the pixel budget (width x height), checked from the header.

    Raises:
        UnsupportedFormatError: not an image of :data:`ALLOWED_FORMATS`.
        FrameTooLargeError: more than ``max_pixels`` pixels (refused before decoding).
        InputError: empty, truncated, undecodable or too small (< 16 px a side) image;
            the message names the file.
    """
    return _decode(Path(path), str(path), bit_depth, max_pixels)


def decode_image(data: bytes, bit_depth: int | None = None, name: str = "image",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes (a file's content, e.g. an HTTP request body) to 8-bit RGB,
    exactly as :func:`load_image` decodes the same bytes from a file.

    Args:
        data: the encoded image (PNG, JPEG, BMP, TIFF, ...).
        bit_depth: see :func:`load_image`.
        name: what error messages call the image.
        max_pixels: see :func:`load_image`.

    Raises:
        InputError (and its UnsupportedFormatError, FrameTooLargeError): the same checks
            and messages as :func:`load_image`, naming ``name``.
    """
    if not data:
        raise InputError(f"{name}: empty file (0 bytes)")
    return _decode(io.BytesIO(data), name, bit_depth, max_pixels)


def _decode(source, name: str, bit_depth: int | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (allowed formats only), check the header against the budget, decode and convert
    ``source`` (a path or a binary file object); errors are InputError naming ``name``."""
    img, _, name = open_frame(source, max_pixels, name)
    try:
        with img:
            img.load()
            return _to_rgb(img, bit_depth, name)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"{name}: image larger than the pixel limit ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{name}: cannot decode image ({exc})") from None


BIT_DEPTHS = (8, 10, 12, 16)


def _to_rgb(img: Image.Image, bit_depth: int | None, name: str = "image") -> Image.Image:
    from .frames import to_rgb8

    return to_rgb8(img, bit_depth, name)


class ImageDataset:
    """Map-style dataset of frame paths -> (tensor (T, 3, th, tw) float32, index, None, (w, h)).

    ``geometry`` is a :class:`patchsearch.geometry.Geometry`; frames are prepared by
    :func:`patchsearch.frames.prepare_frame` (reduced early, in bounded memory). A file
    that fails yields ``(None, index, (message, reason), None)`` instead of raising, so
    one bad frame does not stop a batch; :func:`collate` separates them.
    """

    def __init__(self, paths: Sequence[Path], geometry, bit_depth: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths = list(paths)
        self.geometry = geometry
        self.bit_depth = bit_depth
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from .frames import error_reason, prepare_frame

        try:
            tensor, size = prepare_frame(self.paths[i], self.geometry, self.bit_depth, self.max_pixels)
            return tensor, i, None, size
        except InputError as exc:
            return None, i, (str(exc), error_reason(exc)), None


@dataclass
class Batch:
    """Decoded frames of one batch.

    Attributes:
        tensor: float32 (B * T, 3, th, tw), T tiles per frame (frame-major), or None
            when no frame of the batch could be read.
        good: indices (into the path list) of the B readable frames.
        errors: {index: message} of the unreadable ones.
        frame_sizes: (width, height) of each readable frame, in ``good`` order.
        reasons: {index: reason} of the unreadable ones (:func:`patchsearch.frames.error_reason`).
    """

    tensor: object
    good: list[int]
    errors: dict[int, str]
    frame_sizes: list[tuple[int, int]]
    reasons: dict[int, str] = field(default_factory=dict)


def collate(items) -> Batch:
    """Collate :class:`ImageDataset` items into a :class:`Batch`."""
    import torch

    good = [(t, i, size) for t, i, err, size in items if err is None]
    bad = {i: (err, "unreadable") if isinstance(err, str) else err for _, i, err, _ in items if err is not None}
    tensor = torch.cat([t for t, _, _ in good]) if good else None
    return Batch(tensor, [i for _, i, _ in good], {i: e[0] for i, e in bad.items()}, [size for _, _, size in good],
                 {i: e[1] for i, e in bad.items()})


def iter_batches(paths: Sequence[Path], geometry, batch_size: int = 16, workers: int = 0,
                 bit_depth: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Yield one :class:`Batch` per ``batch_size`` frames, in order.

    At most ``batch_size`` prepared frames (times the worker prefetch) are in memory, and
    one decoded frame at a time per worker.
    """
    import torch

    dataset = ImageDataset(paths, geometry, bit_depth, max_pixels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=collate)
    yield from loader
