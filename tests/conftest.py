"""Shared fixtures: generated MVTec-style data and the real bottle category when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Ray (tests/test_ray.py) binds its nodes to loopback, not to this host's interface
# address: tests talk to 127.0.0.1 only. Read by Ray at import, inherited by its node
# processes, so it is set before any test module imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_MVTEC = Path(os.environ.get("PATCHSEARCH_TEST_DATA", REPO.parent / "shared" / "data" / "mvtec_ad"))


def _textured(rng, size, defect=False):
    """A smooth random texture; a defect is a bright square blob."""
    base = rng.normal(128, 10, (size // 8, size // 8, 3))
    img = np.kron(base, np.ones((8, 8, 1)))
    img += rng.normal(0, 3, img.shape)
    mask = np.zeros((size, size), np.uint8)
    if defect:
        y, x = rng.integers(size // 4, size // 2, 2)
        img[y:y + size // 4, x:x + size // 4] = [250, 20, 20]
        mask[y:y + size // 4, x:x + size // 4] = 255
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), Image.fromarray(mask)


def make_mvtec(root: Path, category: str = "widget", n_train: int = 6, n_good: int = 3, n_bad: int = 3,
               size: int = 64, seed: int = 0) -> Path:
    """Write a tiny MVTec AD style category under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    base = root / category
    for sub in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        _textured(rng, size)[0].save(base / "train/good" / f"{i:03d}.png")
    for i in range(n_good):
        _textured(rng, size)[0].save(base / "test/good" / f"{i:03d}.png")
    for i in range(n_bad):
        img, mask = _textured(rng, size, defect=True)
        img.save(base / "test/blob" / f"{i:03d}.png")
        mask.save(base / "ground_truth/blob" / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def mvtec_root(tmp_path):
    return make_mvtec(tmp_path / "mvtec")


@pytest.fixture(scope="session")
def bottle_root():
    if not (SHARED_MVTEC / "bottle" / "train" / "good").is_dir():
        pytest.skip(f"real MVTec AD bottle data not found at {SHARED_MVTEC}")
    return SHARED_MVTEC
