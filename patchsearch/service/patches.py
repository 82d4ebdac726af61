"""Training patches behind memory-bank rows, cut out of their training images (for the page)."""

from __future__ import annotations

import hmac
import io
from pathlib import Path, PurePosixPath

from ..errors import InputError
from ..files import sha256
from ..report import patch_box
from .registry import Loaded

SHOWN = 96  # crops are scaled up to at least this many pixels a side


def crop_training_patch(loaded: Loaded, row: int, context: int, data_root: Path | None, error) -> tuple[bytes, tuple]:
    """PNG of the training patch behind bank ``row`` of ``loaded`` (its 3 x 3 cell neighbourhood
    for ``context`` = 1), and its box (left, top, right, bottom) in the training frame.

    The training image is ``<data_root>/<category>/<path recorded in the patch store>``
    and must still have the SHA-256 recorded at build. ``error(status, code, message)``
    makes the exception raised: 404 for a row outside the bank, a bank without sources,
    no data root, a path outside the data root, a missing or changed image.
    """
    from PIL import Image

    from ..data import load_image

    index = loaded.index
    if not 0 <= row < index.size:
        raise error(404, "no_such_row", f"memory-bank row {row} is outside 0..{index.size - 1}")
    where = index.describe_locations([row])[0]
    if not isinstance(where.get("image"), str):
        raise error(404, "no_source", f"the index of {loaded.category} does not record where bank rows came from")
    rel = PurePosixPath(where["image"])
    if rel.is_absolute() or ".." in rel.parts:
        raise error(404, "outside_data_root", f"training image {rel} was recorded outside the data root")
    if data_root is None:
        raise error(404, "no_data_root", "the service was started without --data-root: training images unknown")
    category = index.manifest.category or loaded.category
    path = Path(data_root) / category / rel
    if not path.is_file():
        raise error(404, "image_missing", f"training image {category}/{rel} is not under {data_root}")
    recorded = loaded.training_images().get(str(rel), (None,))[0]
    if recorded and not hmac.compare_digest(sha256(path), recorded):
        raise error(404, "image_changed", f"training image {category}/{rel} changed since the build (SHA-256 differs)")
    try:
        frame = load_image(path, loaded.bit_depth)
        box = patch_box(loaded.geometry, index.manifest.grid, frame.size, where["tile"], where["row"], where["col"],
                        context)
    except InputError as exc:
        raise error(404, "unreadable", str(exc)) from None
    crop = frame.crop(box)
    scale = max(1, -(-SHOWN // max(1, min(crop.size))))
    if scale > 1:
        crop = crop.resize((crop.size[0] * scale, crop.size[1] * scale), Image.NEAREST)
    buf = io.BytesIO()
    crop.save(buf, format="PNG")
    return buf.getvalue(), box
