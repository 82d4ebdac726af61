"""Real patch embeddings for the benchmarks (MVTec AD bottle, efficientnet_lite0).

* ``train_patches()``: the 163,856 raw 152-d patch embeddings of bottle's 209 training
  images, read from a built index's Arrow store (``patchsearch build --category bottle``).
* ``augmented_patches(n)``: more real 152-d patch embeddings, from flipped, rotated and
  colour-jittered copies of the training images (cached under ~/.cache/patchsearch-bench).
* ``test_patches(n_images)``: patch embeddings of real bottle test images (queries).
* ``jittered_patches(n)``: beyond the 1.6M augmented patches: those repeated, each
  repeat with N(0, 0.05^2) jitter so that no two rows are equal (a 10M x 152 set).
* ``PeakMemory``: samples the process's anonymous memory (RssAnon) in a thread.
* ``lift(x, d)``: d = 152 returns x; otherwise relu(x @ W) with a fixed Gaussian W
  (152 x d): a stand-in for wide_resnet50_2's 1536-d embeddings, whose ImageNet weights
  cannot be downloaded here. It keeps the real neighbourhood structure of the patches
  in a d-dimensional, non-negative (post-ReLU-like) space; search cost depends on d.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PATCHSEARCH_BENCH_CACHE", Path.home() / ".cache" / "patchsearch-bench"))


def data_root() -> Path:
    from patchsearch.data import default_data_root

    root = Path(os.environ.get("PATCHSEARCH_DATA_ROOT") or REPO.parent / "shared" / "data" / "mvtec_ad")
    return root if root.is_dir() else default_data_root()


def train_patches(index_dir: Path = REPO / "indexes" / "bottle") -> np.ndarray:
    from patchsearch.errors import IndexFormatError
    from patchsearch.store import PatchStore
    from patchsearch.versions import open_version

    try:
        with open_version(index_dir) as lease:
            return PatchStore(lease.path).embeddings()
    except IndexFormatError as exc:
        raise SystemExit(f"{exc}: run 'patchsearch build --category bottle' first") from None


def _embed(images: list[torch.Tensor]) -> np.ndarray:
    from patchsearch.features import PatchEmbedder

    emb = PatchEmbedder("efficientnet_lite0")  # the data the README's search tables were measured on
    out = [emb(torch.stack(images[i:i + 16])).numpy().reshape(-1, emb.dim) for i in range(0, len(images), 16)]
    return np.concatenate(out)


def augmented_patches(n: int) -> np.ndarray:
    """n real 152-d patch embeddings of augmented bottle training images (cached)."""
    from patchsearch.data import load_image, train_images
    from patchsearch.geometry import crop_geometry

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"bottle_aug_{n}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    g = crop_geometry()  # the paper's 224 crop, as the README's search benchmarks
    base = [g.frame_tensor(load_image(p))[0] for p in train_images(data_root(), "bottle")]
    rng = np.random.default_rng(0)
    out, have, aug = [], 0, 0
    while have < n:
        imgs = []
        for t in base:
            t = torch.rot90(t, aug % 4, (1, 2))
            if aug // 4 % 2:
                t = torch.flip(t, (2,))
            t = t * float(rng.uniform(0.9, 1.1)) + float(rng.normal(0, 0.05))
            imgs.append(t)
        x = _embed(imgs)
        out.append(x)
        have += len(x)
        aug += 1
    x = np.concatenate(out)[:n]
    np.save(path, x)
    return x


AUGMENTED = 1_600_000


def jittered_chunks(n: int, chunk: int = 16 * 784):
    """Yield float32 chunks of ``chunk`` rows (the last one shorter), n rows in all: row i
    is real augmented patch i mod :data:`AUGMENTED`; repeats (i >= AUGMENTED) get seeded
    N(0, 0.05^2) jitter so that no two rows are equal."""
    data = augmented_patches(min(n, AUGMENTED))
    rng = np.random.default_rng(0)
    for s in range(0, n, chunk):
        rows = np.arange(s, min(s + chunk, n))
        out = np.asarray(data[rows % len(data)], dtype=np.float32)
        repeat = rows >= len(data)
        if repeat.any():
            out[repeat] += rng.normal(0, 0.05, (int(repeat.sum()), out.shape[1])).astype(np.float32)
        yield out


def jittered_patches(n: int) -> np.ndarray:
    """n x 152 real patches (see :func:`jittered_chunks`), as a cached memory-mapped .npy
    file when n exceeds :data:`AUGMENTED`."""
    if n <= AUGMENTED:
        return augmented_patches(n)
    path = CACHE / f"bottle_jitter_{n}.npy"
    if not path.is_file():
        out = np.lib.format.open_memmap(str(path) + ".tmp.npy", mode="w+", dtype=np.float32, shape=(n, 152))
        at = 0
        for c in jittered_chunks(n):
            out[at:at + len(c)] = c
            at += len(c)
        out.flush()
        del out
        os.replace(str(path) + ".tmp.npy", path)
    return np.load(path, mmap_mode="r")


class PeakMemory:
    """Peak anonymous memory (RssAnon: heap, not pages of memory-mapped files) of this
    process, sampled every 50 ms in a daemon thread; ``reset()`` starts a new window. A
    lock keeps a sample taken before a reset from landing in the new window."""

    def __init__(self):
        self._lock = threading.Lock()
        self.peak = self.now()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> float:
        """RssAnon now, GiB (0 where /proc is missing)."""
        try:
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 2 ** 20
        except OSError:
            pass
        return 0.0

    def _run(self):
        while True:
            with self._lock:
                self.peak = max(self.peak, self.now())
            time.sleep(0.05)

    def reset(self) -> float:
        """Start a new window; returns the level it starts from, GiB."""
        with self._lock:
            self.peak = self.now()
            return self.peak


def test_patches(n_images: int = 4) -> np.ndarray:
    """(n_images, 784, 152) embeddings of bottle test images, half defective, half good."""
    from patchsearch.data import load_image
    from patchsearch.geometry import crop_geometry

    test = data_root() / "bottle" / "test"
    paths = sorted((test / "broken_large").glob("*.png"))[: n_images // 2] + \
        sorted((test / "good").glob("*.png"))[: n_images - n_images // 2]
    g = crop_geometry()  # the paper's 224 crop, as the README's search benchmarks
    return _embed([g.frame_tensor(load_image(p))[0] for p in paths]).reshape(n_images, -1, 152)


def held_patches(n: int = 1000, seed: int = 0) -> np.ndarray:
    """(n, 152) patch embeddings for tuning nprobe, disjoint from :func:`test_patches`'s
    queries: a seeded sample of the patches of the first 2 bottle test images of the
    ``contamination`` and ``broken_small`` classes (never used as queries)."""
    from patchsearch.data import load_image
    from patchsearch.geometry import crop_geometry

    test = data_root() / "bottle" / "test"
    paths = sorted((test / "contamination").glob("*.png"))[:2] + sorted((test / "broken_small").glob("*.png"))[:2]
    g = crop_geometry()
    x = _embed([g.frame_tensor(load_image(p))[0] for p in paths])
    return x[np.sort(np.random.default_rng(seed).choice(len(x), min(n, len(x)), replace=False))]


def lift(x: np.ndarray, d: int, seed: int = 0, chunk: int = 65536, path: Path | None = None) -> np.ndarray:
    """relu(x @ W) (see the module doc); with ``path``, written to (and reused from) a
    memory-mapped .npy file, so that a 10 GB bank is file-backed, not anonymous memory."""
    if d == x.shape[-1]:
        return np.ascontiguousarray(x, dtype=np.float32)
    if path is not None and path.is_file():
        return np.load(path, mmap_mode="r")
    w = (np.random.default_rng(seed).standard_normal((x.shape[-1], d)) / np.sqrt(x.shape[-1])).astype(np.float32)
    flat = x.reshape(-1, x.shape[-1])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(str(path) + ".tmp.npy", mode="w+", dtype=np.float32, shape=(len(flat), d))
        for s in range(0, len(flat), chunk):
            np.maximum(np.asarray(flat[s:s + chunk], np.float32) @ w, 0, out=out[s:s + chunk])
        out.flush()
        del out
        os.replace(str(path) + ".tmp.npy", path)
        return np.load(path, mmap_mode="r")
    out = np.empty((len(flat), d), np.float32)
    for s in range(0, len(flat), chunk):
        np.maximum(np.asarray(flat[s:s + chunk], np.float32) @ w, 0, out=out[s:s + chunk])
    return out.reshape(*x.shape[:-1], d)
