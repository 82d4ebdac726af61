"""Images in, tensors out: the MVTec AD layout, image decoding and preprocessing geometry.

The MVTec AD layout (also anomalib's ``MVTecAD``)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png          (defect "good" = normal)
    <root>/<category>/ground_truth/<defect>/<name>_mask.png

Preprocessing is PatchCore's: resize the shorter side to ``resize`` (default 256),
centre-crop ``crop`` (default 224), ImageNet mean/std normalisation. The same
:class:`Geometry` maps masks into crop coordinates and anomaly maps back onto the
original image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_DATA_ROOT = "./datasets/MVTecAD"
# Decoding a 20000 x 20000 RGB image takes 1.2 GB before resizing; refuse beyond this.
MAX_IMAGE_PIXELS = 100_000_000
MIN_IMAGE_SIDE = 16


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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to 8-bit RGB.

    Grayscale, palette, RGBA (alpha dropped) and 16-bit or 32-bit integer images
    (scaled by their bit depth to 0..255) are converted.

    Raises:
        InputError: empty, truncated, undecodable, too small (< 16 px a side) or too
            large (> 100 megapixels) image; the message names the file.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise InputError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(f"{path}: image is {width}x{height}, larger than the {MAX_IMAGE_PIXELS} pixel limit")
            if min(width, height) < MIN_IMAGE_SIDE:
                raise InputError(f"{path}: image is {width}x{height}, smaller than {MIN_IMAGE_SIDE} pixels a side")
            img.load()
            return _to_rgb(img)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: image larger than the {MAX_IMAGE_PIXELS} pixel limit ({exc})") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: cannot decode image ({exc})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        peak = 1.0 if arr.max() <= 1.0 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    return img.convert("RGB")


@dataclass(frozen=True)
class Geometry:
    """Resize-then-centre-crop preprocessing (PatchCore: resize 256, crop 224).

    ``resize`` is the length the shorter image side is resized to; ``crop`` the
    side of the square centre crop fed to the backbone (pixels).
    """

    resize: int = 256
    crop: int = 224

    def __post_init__(self):
        if self.crop <= 0 or self.resize <= 0:
            raise InputError(f"resize ({self.resize}) and crop ({self.crop}) must be positive")
        if self.crop > self.resize:
            raise InputError(f"crop size {self.crop} is larger than resize {self.resize}")

    def _transform(self, interpolation):
        from torchvision.transforms import v2

        return v2.Compose([
            v2.Resize(self.resize, interpolation=interpolation, antialias=True),
            v2.CenterCrop(self.crop),
        ])

    def image_tensor(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised float32 tensor (3, crop, crop)."""
        from torchvision.transforms import v2

        t = v2.functional.pil_to_tensor(img)
        t = self._transform(v2.InterpolationMode.BILINEAR)(t)
        t = v2.functional.to_dtype(t, torch.float32, scale=True)
        return v2.functional.normalize(t, IMAGENET_MEAN, IMAGENET_STD)

    def mask_array(self, path: str | os.PathLike) -> np.ndarray:
        """Ground-truth mask file -> bool array (crop, crop), True where pixel > 0.

        Resized with nearest-neighbour interpolation and cropped like the image.

        Raises:
            InputError: the mask cannot be read.
        """
        from torchvision.transforms import v2

        img = load_image(path).convert("L")
        t = v2.functional.pil_to_tensor(img)
        t = self._transform(v2.InterpolationMode.NEAREST)(t)
        return t[0].numpy() > 0

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the crop in original image pixels."""
        # torchvision's Resize(int) and CenterCrop arithmetic.
        if width <= height:
            new_w, new_h = self.resize, int(self.resize * height / width)
        else:
            new_w, new_h = int(self.resize * width / height), self.resize
        left = int(round((new_w - self.crop) / 2.0))
        top = int(round((new_h - self.crop) / 2.0))
        sx, sy = width / new_w, height / new_h
        return (left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy)


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset of image paths -> (tensor (3, crop, crop) float32, index).

    A file that fails to decode yields ``(None, index, message)`` instead of raising,
    so one bad frame does not stop a batch; :func:`collate` separates them.
    """

    def __init__(self, paths: Sequence[Path], geometry: Geometry):
        self.paths = list(paths)
        self.geometry = geometry

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.geometry.image_tensor(load_image(self.paths[i])), i, None
        except InputError as exc:
            return None, i, str(exc)


def collate(items):
    """Collate :class:`ImageDataset` items -> (tensor (B,3,H,W) or None, good indices, {index: error})."""
    good = [(t, i) for t, i, err in items if err is None]
    errors = {i: err for _, i, err in items if err is not None}
    batch = torch.stack([t for t, _ in good]) if good else None
    return batch, [i for _, i in good], errors


def iter_batches(paths: Sequence[Path], geometry: Geometry, batch_size: int = 16, workers: int = 0):
    """Yield (tensor (B,3,crop,crop) float32 or None, indices into ``paths``, {index: error message}).

    At most ``batch_size`` decoded images (times the worker prefetch) are in memory.
    """
    dataset = ImageDataset(paths, geometry)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=collate)
    yield from loader
