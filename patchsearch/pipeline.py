"""The main job end to end: images -> patch store -> coreset -> index; index -> scores -> metrics.

Data flows one way::

    data.train_images -> features.PatchEmbedder -> store.PatchStoreWriter    (every raw patch)
    store.PatchStore  -> coreset.kcenter_greedy  -> index.PatchIndex          (memory bank, FAISS)
    data.test_samples -> query.iter_query        -> metrics                   (evaluation)

Every build writes a new version of the index directory (:mod:`patchsearch.versions`);
a failure or a crash leaves the current version answering.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .coreset import PROJECTION_DIM, check_ratio, kcenter_greedy
from .errors import InputError
from .format import read_manifest
from .index import PatchIndex
from .searchers import check_index_type
from .store import ImageRecord, PatchStore, PatchStoreWriter, StoreArray
from .versions import new_version, open_version, tidy

Log = Callable[[str], None]


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


def build(image_paths: Sequence[Path], out_dir: str | os.PathLike, *, category: str | None = None,
          data_root: str | os.PathLike | None = None, backbone: str | None = None,
          layers: Sequence[str] | None = None, weights: str | None = None, embed_dim: int | None = None,
          geometry=None, coreset_ratio: float = 0.1, seed: int = 0, shards: int = 1, index: str = "flat",
          index_params: dict | None = None, batch_size: int = 16, workers: int = 0, progress: bool = False,
          log: Log = lambda msg: None) -> PatchIndex:
    """Build a PatchCore memory-bank index from defect-free images.

    Writes a new version of ``out_dir``: the Arrow patch store of every raw patch
    embedding, the coreset memory bank with its support sets, its FAISS shards and the
    manifest (per-stage seconds under ``timings``). A failure leaves the current
    version untouched.

    Args:
        image_paths: training (defect-free) images.
        out_dir: the index directory (``<index-dir>/<category>``).
        data_root: image paths are recorded relative to it (default: their common folder).
        backbone, layers, weights, embed_dim: see :class:`~patchsearch.features.PatchEmbedder`.
        geometry: a :class:`~patchsearch.data.Geometry` (default resize 256, crop 224).
        coreset_ratio, seed: see :func:`~patchsearch.coreset.kcenter_greedy`.
        shards, index, index_params: see :meth:`PatchIndex.from_embeddings`
            (index_params: nlist, pq_m, pq_bits, nprobe, rerank).
        batch_size: images per backbone batch (bounds memory).
        workers: image-decoding worker processes (0 = in the main process).

    Returns:
        The built :class:`PatchIndex` (``path`` = ``out_dir``).

    Raises:
        InputError: no image, an unreadable training image, bad options.
        WeightsUnavailableError: backbone weights cannot be loaded.
    """
    from .data import Geometry, iter_batches
    from .features import DEFAULT_BACKBONE, PatchEmbedder

    image_paths = [Path(p) for p in image_paths]
    if not image_paths:
        raise InputError("no training image given")
    check_ratio(coreset_ratio)
    check_index_type(index)
    geometry = geometry or Geometry()
    root = Path(data_root) if data_root is not None else Path(os.path.commonpath([p.parent for p in image_paths]))
    timings = {}
    t0 = time.perf_counter()
    embedder = PatchEmbedder(backbone or DEFAULT_BACKBONE, layers, weights, embed_dim)
    timings["load_backbone"] = time.perf_counter() - t0
    with new_version(out_dir) as tmp:
        t0 = time.perf_counter()
        grid = None
        with PatchStoreWriter(tmp, embedder.dim) as writer:
            nbatches = (len(image_paths) + batch_size - 1) // batch_size
            for batch, good, errors in _progress(iter_batches(image_paths, geometry, batch_size, workers),
                                                 nbatches, "embed", progress):
                if errors:
                    raise InputError(f"training image {next(iter(errors.values()))}")
                emb = embedder(batch).numpy()
                grid = [int(emb.shape[1]), int(emb.shape[2])]
                writer.write([ImageRecord.from_file(image_paths[i], root) for i in good], emb)
        timings["extract"] = time.perf_counter() - t0
        log(f"embedded {writer.num_images} images -> {writer.num_patches} patches of dim {embedder.dim} "
            f"in {timings['extract']:.1f} s")
        meta = {"category": category, "backbone": embedder.describe(),
                "geometry": {"resize": geometry.resize, "crop": geometry.crop}, "grid": grid}
        built = index_from_store(tmp, meta, timings, coreset_ratio, seed, shards, index, index_params,
                                 progress, log)
        built.write(tmp)
    built.path = Path(out_dir)
    log(f"index written to {out_dir}")
    return built


def rebuild(index_dir: str | os.PathLike, *, coreset_ratio: float | None = None, seed: int | None = None,
            shards: int | None = None, index: str | None = None, index_params: dict | None = None,
            progress: bool = False, log: Log = lambda msg: None) -> PatchIndex:
    """Rebuild an index from its Arrow patch store, without images or backbone.

    Options left None keep the values recorded in the manifest. With the same
    parameters and seed the memory bank (and, for flat, every search result) equals the
    original build's. The store files are hard-linked (copied where links fail) into
    the new version.

    Raises:
        IndexFormatError: no index, or its patch store is missing or corrupted.
        InputError: bad options.
    """
    index_dir = Path(index_dir)
    with open_version(index_dir) as lease:
        old = read_manifest(lease.path, index_dir)
        store_files = (old.store or {}).get("files") or []
        PatchStore(lease.path, partitions=(old.store or {}).get("partitions"))  # fail early, before anything is written, if unusable
        coreset_ratio = check_ratio(old.coreset["ratio"] if coreset_ratio is None else coreset_ratio)
        seed = old.coreset["seed"] if seed is None else seed
        shards = len(old.index["shards"]) if shards is None else shards
        index = check_index_type(old.index_type if index is None else index)
        meta = {"category": old.category, "backbone": old.backbone, "geometry": old.geometry, "grid": old.grid,
                "store": old.store}
        timings = {}
        with new_version(index_dir) as tmp:
            for name in store_files:
                try:
                    os.link(lease.path / name, tmp / name)
                except OSError:
                    shutil.copyfile(lease.path / name, tmp / name)
            built = index_from_store(tmp, meta, timings, coreset_ratio, seed, shards, index, index_params,
                                     progress, log)
            built.write(tmp)
    tidy(index_dir)  # the version this rebuild read from is no longer leased by it
    built.path = index_dir
    log(f"index rebuilt in {index_dir}")
    return built


def index_from_store(directory: Path, meta: dict, timings: dict, coreset_ratio: float, seed: int, shards: int,
                     index: str, index_params: dict | None, progress: bool, log: Log) -> PatchIndex:
    """Coreset, memory bank, support sets and FAISS shards from the patch store in ``directory``.

    Args:
        meta: manifest fields to carry (category, backbone, geometry, grid, store).
        timings: filled with seconds per stage (coreset, index).

    Returns:
        the :class:`PatchIndex` (not yet written: call ``write(directory)``).
    """
    store = PatchStore(directory, partitions=(meta.get("store") or {}).get("partitions"))
    t0 = time.perf_counter()
    selected = kcenter_greedy(StoreArray(store), coreset_ratio, seed=seed, progress=progress)
    timings["coreset"] = time.perf_counter() - t0
    log(f"coreset: {len(selected)} of {store.num_patches} patches in {timings['coreset']:.1f} s")

    t0 = time.perf_counter()
    sources = {"store_row": selected, **store.locations(selected)}
    meta = {**meta,
            "coreset": {"ratio": coreset_ratio, "seed": seed, "projection_dim": PROJECTION_DIM,
                        "method": "greedy k-center"},
            "store": {**(meta.get("store") or {}), "files": list(store.files), "num_patches": store.num_patches,
                      "num_images": store.num_images},
            "timings": timings}
    recall_queries = None
    if index == "ivfpq":  # held-aside patches: store rows not in the memory bank
        rest = np.setdiff1d(np.arange(store.num_patches), selected)
        if len(rest):
            pick = np.sort(np.random.default_rng(seed).choice(rest, min(1000, len(rest)), replace=False))
            recall_queries = store.embeddings(pick)
    built = PatchIndex.from_embeddings(store.embeddings(selected), shards, index, **(index_params or {}),
                                       recall_queries=recall_queries, seed=seed, sources=sources,
                                       images=store.image_paths(), manifest=meta, gpu=False)
    timings["index"] = time.perf_counter() - t0
    for key, value in timings.items():
        timings[key] = round(value, 3)
    if index == "ivfpq":
        log(f"IVF-PQ {built.params}")
    return built


def evaluate(index: PatchIndex, data_root: str | os.PathLike, category: str, batch_size: int = 16,
             progress: bool = False) -> dict:
    """Score the test split of an MVTec AD category.

    Returns:
        {"image_auroc", "pixel_auroc", "per_defect_image_auroc": {defect: AUROC of good vs it},
         "counts": {"images", "good", "anomalous", "pixels", "anomalous_pixels"}, "seconds",
         "seconds_per_image"}. Pixel AUROC is over every crop pixel of every test image,
        masks mapped by the index's geometry (resize, centre crop, > 0).

    Raises:
        InputError: missing data, unreadable test image or mask.
    """
    from .data import test_samples
    from .metrics import auroc
    from .query import geometry_of

    samples = test_samples(data_root, category)
    geometry = geometry_of(index)
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
