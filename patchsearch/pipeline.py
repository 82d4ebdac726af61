"""The main job end to end: images -> patch store -> coreset -> index; index -> scores -> metrics.

Data flows one way::

    data.train_images -> features.PatchEmbedder -> store.PatchStoreWriter   (every raw patch)
    store.PatchStore  -> coreset.kcenter_greedy  -> search.PatchIndex        (memory bank, FAISS)
    data.test_samples -> PatchIndex.iter_query   -> metrics.auroc            (evaluation)
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .coreset import PROJECTION_DIM, kcenter_greedy
from .data import Geometry, iter_batches, test_samples
from .errors import InputError
from .features import DEFAULT_BACKBONE, PatchEmbedder
from .manifest import atomic_directory, failpoint
from .metrics import auroc
from .search import PatchIndex
from .store import STORE_FILE, PatchStore, PatchStoreWriter, StoreArray


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


def build(image_paths: Sequence[Path], out_dir: str | os.PathLike, *, category: str | None = None,
          backbone: str = DEFAULT_BACKBONE, layers: Sequence[str] | None = None, weights: str | None = None,
          embed_dim: int | None = None, geometry: Geometry = Geometry(), coreset_ratio: float = 0.1,
          seed: int = 0, shards: int = 1, index: str = "flat", index_params: dict | None = None,
          batch_size: int = 16, workers: int = 0, progress: bool = False,
          log: Callable[[str], None] = lambda msg: None) -> PatchIndex:
    """Build a PatchCore memory bank index from defect-free images.

    Writes ``out_dir`` atomically: the Arrow patch store of every raw patch embedding,
    the coreset memory bank with its support sets, its FAISS shards and the manifest
    (with per-stage times in seconds under ``timings``). A failure leaves an existing
    ``out_dir`` untouched.

    Args:
        image_paths: training (defect-free) images.
        out_dir: index directory to create or replace.
        backbone, layers, weights, embed_dim: see :class:`~patchsearch.features.PatchEmbedder`.
        geometry: resize / crop preprocessing.
        coreset_ratio, seed: see :func:`~patchsearch.coreset.kcenter_greedy`.
        shards, index, index_params: see :meth:`PatchIndex.from_embeddings`
            (index_params: nlist, pq_m, pq_bits, nprobe, rerank).
        batch_size: images per backbone batch (bounds memory).
        workers: image-decoding worker processes (0 = in the main process).

    Returns:
        The built :class:`PatchIndex` (loaded from ``out_dir``).

    Raises:
        InputError: no image, an unreadable training image, bad options.
        WeightsUnavailableError: backbone weights cannot be loaded.
    """
    image_paths = [Path(p) for p in image_paths]
    if not image_paths:
        raise InputError("no training image given")
    _check_options(coreset_ratio, shards, index)
    timings = {}
    t0 = time.perf_counter()
    embedder = PatchEmbedder(backbone, layers, weights, embed_dim)
    timings["load_backbone"] = time.perf_counter() - t0
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        t0 = time.perf_counter()
        grid = None
        with PatchStoreWriter(tmp / STORE_FILE, embedder.dim) as writer:
            nbatches = (len(image_paths) + batch_size - 1) // batch_size
            for batch, good, errors in _progress(iter_batches(image_paths, geometry, batch_size, workers),
                                                 nbatches, "embed", progress):
                if errors:
                    raise InputError(f"training image {next(iter(errors.values()))}")
                emb = embedder(batch).numpy()
                grid = list(emb.shape[1:3])
                writer.write([str(image_paths[i].resolve()) for i in good], emb)
                failpoint("extract")
        timings["extract"] = time.perf_counter() - t0
        log(f"embedded {writer.num_images} images -> {writer.num_patches} patches of dim {embedder.dim} "
            f"in {timings['extract']:.1f} s")
        meta = {"category": category, "backbone": embedder.describe(),
                "geometry": {"resize": geometry.resize, "crop": geometry.crop}, "grid": grid}
        _index_from_store(tmp, meta, timings, coreset_ratio, seed, shards, index, index_params, progress, log)
    log(f"index written to {out_dir}")
    return PatchIndex.load(out_dir)


def rebuild(index_dir: str | os.PathLike, *, coreset_ratio: float | None = None, seed: int | None = None,
            shards: int | None = None, index: str | None = None, index_params: dict | None = None,
            progress: bool = False, log: Callable[[str], None] = lambda msg: None) -> PatchIndex:
    """Rebuild an index from its Arrow patch store, without images or backbone.

    Options left None keep the values recorded in the manifest. With the same
    parameters and seed the memory bank (and, for flat, every search result) equals the
    original build's. The store file is hard-linked (copied where links fail) into the
    new directory, which replaces ``index_dir`` atomically.

    Raises:
        IndexFormatError: no index, or its patch store is missing or corrupted.
        InputError: bad options.
    """
    from .manifest import read_manifest

    index_dir = Path(index_dir)
    old = read_manifest(index_dir)
    store_path = index_dir / old.get("store", {}).get("file", STORE_FILE)
    PatchStore(store_path)  # fail early, before anything is written, if the store is unusable
    coreset_ratio = old["coreset"]["ratio"] if coreset_ratio is None else coreset_ratio
    seed = old["coreset"]["seed"] if seed is None else seed
    shards = len(old["index"]["shards"]) if shards is None else shards
    index = old["index"]["type"] if index is None else index
    _check_options(coreset_ratio, shards, index)
    meta = {key: old.get(key) for key in ("category", "backbone", "geometry", "grid")}
    timings = {}
    with atomic_directory(index_dir) as tmp:
        try:
            os.link(store_path, tmp / STORE_FILE)
        except OSError:
            shutil.copyfile(store_path, tmp / STORE_FILE)
        _index_from_store(tmp, meta, timings, coreset_ratio, seed, shards, index, index_params, progress, log)
    log(f"index rebuilt in {index_dir}")
    return PatchIndex.load(index_dir)


def _check_options(coreset_ratio: float, shards: int, index: str) -> None:
    if not 0.0 < coreset_ratio <= 1.0:
        raise InputError(f"--coreset-ratio must be in (0, 1], got {coreset_ratio}")
    if shards < 1:
        raise InputError(f"--shards must be at least 1, got {shards}")
    if index not in ("flat", "ivfpq"):
        raise InputError(f"--index must be flat or ivfpq, got {index!r}")


def _index_from_store(directory: Path, meta: dict, timings: dict, coreset_ratio: float, seed: int, shards: int,
                      index: str, index_params: dict | None, progress: bool, log) -> None:
    """Coreset, memory bank, support sets and FAISS shards from ``directory``'s patch store."""
    store = PatchStore(directory / STORE_FILE)
    failpoint("coreset")
    t0 = time.perf_counter()
    selected = kcenter_greedy(StoreArray(store), coreset_ratio, seed=seed, progress=progress)
    timings["coreset"] = time.perf_counter() - t0
    log(f"coreset: {len(selected)} of {store.num_patches} patches in {timings['coreset']:.1f} s")

    t0 = time.perf_counter()
    bank = store.embeddings(selected)
    loc = store.locations(selected)
    images = store.image_paths()
    sources = {"store_row": selected, "image": [images[i] for i in loc["image_id"]],
               "row": loc["row"], "col": loc["col"]}
    meta = {**meta,
            "coreset": {"ratio": coreset_ratio, "seed": seed, "projection_dim": PROJECTION_DIM,
                        "method": "greedy k-center"},
            "store": {"file": STORE_FILE, "num_patches": store.num_patches, "num_images": len(images)},
            "counts": {"train_images": len(images), "patches": store.num_patches, "memory_bank": len(selected)}}
    recall_queries = None
    if index == "ivfpq":  # held-aside patches: store rows not in the memory bank
        rest = np.setdiff1d(np.arange(store.num_patches), selected)
        if len(rest):
            pick = np.sort(np.random.default_rng(seed).choice(rest, min(1000, len(rest)), replace=False))
            recall_queries = store.embeddings(pick)
    built = PatchIndex.from_embeddings(bank, shards, index, **(index_params or {}), recall_queries=recall_queries,
                                       seed=seed, meta=meta, sources=sources, gpu=False)
    timings["index"] = time.perf_counter() - t0
    if index == "ivfpq":
        log(f"IVF-PQ {built.params}")
    built.write(directory, {"timings": {k: round(v, 3) for k, v in timings.items()}})


def evaluate(index: PatchIndex, data_root: str | os.PathLike, category: str, batch_size: int = 16,
             progress: bool = False) -> dict:
    """Score the test split of an MVTec AD category.

    Returns:
        {"image_auroc", "pixel_auroc", "per_defect_image_auroc": {defect: AUROC of good vs it},
         "counts": {"images", "good", "anomalous", "pixels"}, "seconds", "seconds_per_image"}.
        Pixel AUROC is over every crop pixel of every test image, masks mapped by the
        index's geometry (resize, centre crop, > 0).

    Raises:
        InputError: missing data, unreadable test image or mask.
    """
    samples = test_samples(data_root, category)
    geometry = index.geometry
    t0 = time.perf_counter()
    scores, maps = [], []
    nbatches = (len(samples) + batch_size - 1) // batch_size
    for part in _progress(index.iter_query([s.path for s in samples], batch_size=batch_size), nbatches,
                          "query", progress):
        if part.errors:
            raise InputError(f"test image {next(iter(part.errors.values()))}")
        scores.append(part.image_scores)
        maps.append(part.anomaly_maps)
    seconds = time.perf_counter() - t0
    scores = np.concatenate(scores)
    maps = np.concatenate(maps)
    masks = np.stack([geometry.mask_array(s.mask_path) if s.mask_path else
                      np.zeros((geometry.crop, geometry.crop), bool) for s in samples])
    labels = np.array([s.label for s in samples])
    defects = np.array([s.defect for s in samples])
    per_defect = {d: auroc(labels[(defects == d) | (labels == 0)], scores[(defects == d) | (labels == 0)])
                  for d in sorted(set(defects[labels == 1]))}
    return {
        "category": category,
        "image_auroc": auroc(labels, scores),
        "pixel_auroc": auroc(masks, maps),
        "per_defect_image_auroc": per_defect,
        "counts": {"images": len(samples), "good": int((labels == 0).sum()), "anomalous": int(labels.sum()),
                   "pixels": int(masks.size), "anomalous_pixels": int(masks.sum())},
        "seconds": round(seconds, 3),
        "seconds_per_image": round(seconds / len(samples), 4),
    }
