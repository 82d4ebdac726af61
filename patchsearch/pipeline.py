"""The main job end to end: images -> patch store -> coreset -> index; index -> scores -> metrics.

Data flows one way::

    data.train_images -> features.PatchEmbedder -> store.PatchStoreWriter    (every raw patch)
    store.PatchStore  -> coreset.kcenter_greedy  -> index.PatchIndex          (memory bank, FAISS)
    data.test_samples -> query.iter_query        -> metrics                   (evaluation)

Every build writes a new version of the index directory (:mod:`patchsearch.versions`);
a failure or a crash leaves the current version answering. A build replaces the version
that was current when it started (that is what building over an index means), and
nothing else: where another writer installed a version while it ran, it installs nothing
(``VersionConflict``). A rebuild installs only over the version it read, likewise.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .calibrate import CALIBRATION_FRACTION, fit_calibration, split_calibration
from .coreset import PROJECTION_DIM, check_ratio, kcenter_greedy, radius_space
from .data import BIT_DEPTHS
from .errors import InputError, VersionConflict
from .files import link_or_copy
from .format import read_manifest
from .index import PatchIndex
from .ingest import embed_frames
from .searchers import IVF_TYPES, check_index_type
from .store import PatchStore, PatchStoreWriter, StoreArray
from .versions import current_version, new_version, open_version, tidy

Log = Callable[[str], None]


def build(image_paths: Sequence[Path], out_dir: str | os.PathLike, *, category: str | None = None,
          data_root: str | os.PathLike | None = None, backbone: str | None = None,
          layers: Sequence[str] | None = None, weights: str | None = None, embed_dim: int | None = None,
          input_norm: str | dict = "auto", geometry=None, resize: int = 256, crop: int | None = None, orient: str = "fixed",
          tile: int | None = None, tile_overlap: int | None = None, bit_depth: int | None = None,
          coreset_ratio: float = 0.1, seed: int = 0, shards: int = 1, index: str = "flat",
          index_params: dict | None = None, calibration_images: Sequence[Path] | None = None,
          calibration_fraction: float = CALIBRATION_FRACTION,
          target_fpr: float | None = None, margin: float | None = None, min_region_area: int = 0,
          batch_size: int = 16, workers: int = 0, ray_address: str | None = None, ray_options: dict | None = None,
          progress: bool = False, log: Log = lambda msg: None, device: str | None = None) -> PatchIndex:
    """Build a PatchCore memory-bank index from defect-free images, with a calibrated threshold.

    Writes a new version of ``out_dir``: the Arrow patch store of every raw patch
    embedding, the coreset memory bank with its support sets, its FAISS shards and the
    manifest (per-stage seconds under ``timings``, the calibration under
    ``calibration``). A failure leaves the current version untouched.

    Calibration: ``calibration_images`` (e.g. a ``validation/good`` folder), or else a
    seeded ``calibration_fraction`` of the training images (at least 5, at most half),
    is kept out of the store and the memory bank, scored with the built index, and the
    image and pixel thresholds are fitted from those good scores alone
    (:func:`patchsearch.calibrate.fit_threshold`). Fewer than 4 training images: no calibration.

    Args:
        image_paths: training (defect-free) frames.
        out_dir: the index directory (``<index-dir>/<category>``).
        data_root: image paths are recorded relative to it (default: their common folder).
        backbone, layers, weights, embed_dim: see :class:`~patchsearch.features.PatchEmbedder`.
        input_norm: the normalisation the backbone is fed with (``--input-norm``): ``"native"``
            (the one its weights were trained with, :func:`~patchsearch.features.native_norm`:
            ``(pixel - 127) / 128`` for EfficientNet-Lite, ImageNet's for torchvision weights),
            ``"imagenet"`` (ImageNet mean/std for every backbone), ``"auto"`` (default: ImageNet's
            with ``crop``, the paper protocol, else native), or a ``{"mean", "std"}`` dict
            (:func:`~patchsearch.features.resolve_norm`). Recorded in the manifest
            (``backbone.input_norm``); query, evaluate, add and serve embed with it.
        geometry: a :class:`~patchsearch.geometry.Geometry`; default chosen from the training
            frames by :func:`~patchsearch.geometry.choose_geometry` (resize, crop, tile,
            tile_overlap, orient: ``"auto"`` turns frames of the other orientation 90 degrees,
            ``"fixed"``, the default, never).
        bit_depth: camera bit depth for frames of more than 8 bits (:func:`~patchsearch.data.load_image`).
        coreset_ratio, seed: see :func:`~patchsearch.coreset.kcenter_greedy`.
        shards, index, index_params: see :meth:`PatchIndex.from_embeddings`.
        target_fpr, margin, min_region_area: the threshold rule (:mod:`patchsearch.calibrate`)
            and the smallest defect region reported (frame pixels).
        batch_size: frames per backbone batch (bounds memory).
        workers: image-decoding worker processes (0 = in the main process).
        ray_address: embed on a Ray cluster instead (``"auto"``: the running one, ``"local"``:
            start one here, or ``host:port``; the ``[ray]`` extra): a pool of actors, one backbone
            each, writes the store as one partition per fixed chunk of frames
            (:func:`patchsearch.distributed.embed.embed_store`); store rows and memory bank equal
            this machine's build with the same seed. ``out_dir`` must be on a filesystem every
            node mounts.
        ray_options: keyword arguments of :func:`~patchsearch.distributed.embed.embed_store`
            (``num_workers``, ``cpus_per_worker``, ``chunk_images``, ``max_restarts``, ``max_task_retries``,
            ``on_partition``).
        device: where the backbone, the support-set graph and the calibration search run
            (``cpu``, ``cuda``, ``cuda:N``, ``auto``; default ``cpu``; Ray workers pick their
            own). Nothing of it is written into the index: it is queried on any device.

    Returns:
        The built :class:`PatchIndex` (``path`` = ``out_dir``), searching on ``device``.

    Raises:
        InputError: no image, an unreadable training image, bad options, a bad ``device``.
        WeightsUnavailableError: backbone weights cannot be loaded.
        patchsearch.distributed.DistributedError: Ray missing, or a Ray worker died past its retries.
        VersionConflict: another writer installed a version of ``out_dir`` while this build ran
            (nothing installed: run it again).
    """
    from .data import frame_size
    from .device import move_module, resolve_device
    from .features import DEFAULT_BACKBONE, PatchEmbedder, resolve_norm
    from .geometry import TILE_OVERLAP, choose_geometry

    device = resolve_device(device or "cpu")
    image_paths = [Path(p) for p in image_paths]
    if not image_paths:
        raise InputError("no training image given")
    check_ratio(coreset_ratio)
    check_index_type(index)
    if bit_depth is not None and bit_depth not in BIT_DEPTHS:
        raise InputError(f"--bit-depth must be one of {', '.join(map(str, BIT_DEPTHS))}, got {bit_depth}")
    train, held = split_calibration(image_paths, calibration_images, calibration_fraction, seed)
    geometry = geometry or choose_geometry([frame_size(p) for p in train], resize, crop, tile,
                                           TILE_OVERLAP if tile_overlap is None else tile_overlap, orient=orient)
    root = Path(data_root) if data_root is not None else Path(os.path.commonpath([p.parent for p in image_paths]))
    timings = {}
    started_over = current_version(out_dir)  # installed only over this one (module docstring)
    t0 = time.perf_counter()
    backbone = backbone or DEFAULT_BACKBONE
    norm = resolve_norm(input_norm, backbone, geometry.mode)
    embedder = move_module(PatchEmbedder(backbone, layers, weights, embed_dim, input_norm=norm), device)
    timings["load_backbone"] = time.perf_counter() - t0
    with _install_over(out_dir, started_over, "build") as tmp:
        t0 = time.perf_counter()
        tiles = len(geometry.tile_boxes())
        if ray_address is not None:  # a pool of Ray actors writes one partition per chunk of frames
            from .distributed.embed import embed_store

            num_images, num_patches, grid = embed_store(
                ray_address, tmp, train, root, geometry, embedder.dim, dict(backbone=backbone,
                layers=layers, weights=weights, embed_dim=embed_dim, input_norm=norm), batch_size, bit_depth,
                log=log, **(ray_options or {}))
        else:
            with PatchStoreWriter(tmp, embedder.dim) as writer:
                grid = embed_frames(writer, train, embedder, geometry, root, batch_size, workers, bit_depth, progress)
            num_images, num_patches = writer.num_images, writer.num_patches
        timings["extract"] = time.perf_counter() - t0
        log(f"embedded {num_images} images -> {num_patches} patches of dim {embedder.dim} "
            f"in {timings['extract']:.1f} s (input {geometry.input_size[1]}x{geometry.input_size[0]}, "
            f"{geometry.mode}{f', {tiles} tiles' if tiles > 1 else ''})")
        meta = {"category": category, "backbone": embedder.describe(), "geometry": geometry.to_dict(),
                "grid": grid, "extra": {"decode": {"bit_depth": bit_depth}}}
        built = index_from_store(tmp, meta, timings, coreset_ratio, seed, shards, index, index_params,
                                 progress, log, device)
        built.embedder = embedder
        if held:
            t0 = time.perf_counter()
            source = "calibration images" if calibration_images else \
                f"{len(held)} of {len(image_paths)} train/good frames held aside (seed {seed})"
            built.manifest.calibration = fit_calibration(built, held, root, source, target_fpr, margin,
                                                         min_region_area, batch_size)
            timings["calibrate"] = round(time.perf_counter() - t0, 3)
            log(f"calibrated on {len(held)} good frames: image threshold "
                f"{built.manifest.calibration['image']['threshold']:.4f}, pixel threshold "
                f"{built.manifest.calibration['pixel']['threshold']:.4f} (L2)")
        else:
            log(f"not calibrated: {len(image_paths)} training frames are too few to hold some aside")
        built.write(tmp)
    built.path = Path(out_dir)
    log(f"index written to {out_dir}")
    return built


def rebuild(index_dir: str | os.PathLike, *, coreset_ratio: float | None = None, seed: int | None = None,
            shards: int | None = None, index: str | None = None, index_params: dict | None = None,
            data_root: str | os.PathLike | None = None, weights: str | None = None, batch_size: int = 16,
            progress: bool = False, log: Log = lambda msg: None, device: str | None = None) -> PatchIndex:
    """Rebuild an index from its Arrow patch store, without images (but its calibration frames).

    Options left None keep the values recorded in the manifest. With the same
    parameters and seed the memory bank (and, for flat, every search result) equals the
    original build's. The store files are hard-linked (copied where links fail) into
    the new version. The calibration is carried forward: as it is where the new memory bank
    equals the old one row for row; else re-fitted with the recorded rule on the recorded
    held-aside good frames (:func:`patchsearch.refit.refit_rebuilt`, with the backbone).

    Args:
        data_root: where the recorded calibration frames are looked up first (else where
            they were recorded, :func:`patchsearch.refit.calibration_frames`).
        weights: the state-dict file, for an index built with ``--weights`` (re-fitting).
        batch_size: frames per backbone batch when re-fitting.
        device: where the support-set graph is computed and the returned index searches
            (default ``cpu``; see :func:`build`).

    Raises:
        IndexFormatError: no index, or its patch store is missing or corrupted.
        InputError: bad options; or the bank changes and the thresholds cannot be re-fitted
            (frames not found, an F1-optimal pick): nothing is installed, the message says why.
        VersionConflict: another writer installed a version after this rebuild read its own
            (nothing installed: run it again).
    """
    from .device import resolve_device
    from .refit import rebuilt_calibration, refit_problem

    device = resolve_device(device or "cpu")
    index_dir = Path(index_dir)
    with open_version(index_dir) as lease:
        old = read_manifest(lease.path, index_dir)
        store_files = (old.store or {}).get("files") or []
        PatchStore(lease.path, partitions=(old.store or {}).get("partitions"))  # fail early, before anything is written, if unusable
        coreset_ratio = check_ratio(old.coreset["ratio"] if coreset_ratio is None else coreset_ratio)
        seed = old.coreset["seed"] if seed is None else seed
        shards = len(old.index["shards"]) if shards is None else shards
        index = check_index_type(old.index_type if index is None else index)
        if index in IVF_TYPES and old.index_type in IVF_TYPES:
            index_params = kept_ivf_params(old.index.get("params") or {}, index_params,
                                           same_bank=coreset_ratio == old.coreset["ratio"])
        why = None if (coreset_ratio, seed) == (old.coreset["ratio"], old.coreset["seed"]) else \
            f"the coreset changes (ratio {old.coreset['ratio']} -> {coreset_ratio}, " \
            f"seed {old.coreset['seed']} -> {seed})"
        if old.calibration and why and (problem := refit_problem(old.calibration, data_root)):  # before the work
            raise InputError(f"{why}, so its thresholds must be re-fitted, and {problem}; nothing was installed")
        meta = {"category": old.category, "backbone": old.backbone, "geometry": old.geometry, "grid": old.grid,
                "store": old.store, "extra": old.extra}
        timings = {}
        with _install_over(index_dir, lease.version, "rebuild") as tmp:
            for name in store_files:
                link_or_copy(lease.path / name, tmp / name)
            built = index_from_store(tmp, meta, timings, coreset_ratio, seed, shards, index, index_params,
                                     progress, log, device)
            if old.calibration:
                t0 = time.perf_counter()
                built.manifest.calibration, note = rebuilt_calibration(
                    built, old.calibration, lease.path / old.memory_bank["file"], data_root, batch_size, weights, why)
                if note:
                    timings["calibrate"] = round(time.perf_counter() - t0, 3)
                    log(f"the memory bank changed: thresholds {note}")
            built.write(tmp)
    tidy(index_dir)  # the version this rebuild read from is no longer leased by it
    built.path = index_dir
    log(f"index rebuilt in {index_dir}")
    return built


@contextlib.contextmanager
def _install_over(root: Path, expect: str | None, what: str):
    """:func:`~patchsearch.versions.new_version` installing only over ``expect`` (the version
    the writer started from, None: no index), its conflict worded for ``what``."""
    try:
        with new_version(root, expect_current=expect) as tmp:
            yield tmp
    except VersionConflict:
        raise VersionConflict(f"{root}: another writer installed {current_version(root)} while this {what} ran "
                              f"(it started from {expect or 'no index'}); nothing was installed: run it "
                              "again") from None


def kept_ivf_params(recorded: dict, given: dict | None, same_bank: bool) -> dict:
    """IVF parameters for a rebuild: those ``given``, else those recorded in the old manifest.

    Kept when not given: ``layout`` (``pq`` for indexes built before layouts),
    ``rerank`` (so ``--rerank 0`` stays 0), ``pq_m`` and ``pq_bits`` where the layout
    stays the recorded one, and ``nlist`` where the coreset ratio is unchanged
    (``same_bank``; another ratio gives another bank size, and nlist is then chosen for
    it). ``nprobe`` is not kept: it was tuned for recall on the old bank and is tuned
    again (unless given).
    """
    out = dict(given or {})
    recorded = {"layout": "pq", **recorded} if recorded else {}
    keys = ["layout", "rerank"] + (["nlist"] if same_bank else [])
    if out.get("layout", recorded.get("layout")) == recorded.get("layout"):
        keys += ["pq_m", "pq_bits"]
    for key in keys:
        if key not in out and recorded.get(key) is not None:
            out[key] = recorded[key]
    return out


def index_from_store(directory: Path, meta: dict, timings: dict, coreset_ratio: float, seed: int, shards: int,
                     index: str, index_params: dict | None, progress: bool, log: Log,
                     device: str = "cpu") -> PatchIndex:
    """Coreset, memory bank, support sets and FAISS shards from the patch store in ``directory``.

    Args:
        meta: manifest fields to carry (category, backbone, geometry, grid, store).
        timings: filled with seconds per stage (coreset, index).
        device: where the index (its support-set graph, later searches) runs.

    Returns:
        the :class:`PatchIndex` (not yet written: call ``write(directory)``).
    """
    store = PatchStore(directory, partitions=(meta.get("store") or {}).get("partitions"))
    t0 = time.perf_counter()
    selected, radius = kcenter_greedy(StoreArray(store), coreset_ratio, seed=seed, progress=progress,
                                      return_radius=True)
    timings["coreset"] = time.perf_counter() - t0
    log(f"coreset: {len(selected)} of {store.num_patches} patches in {timings['coreset']:.1f} s")

    t0 = time.perf_counter()
    sources = {"store_row": selected, **store.locations(selected)}
    meta = {**meta,
            "coreset": {"ratio": coreset_ratio, "seed": seed, "projection_dim": PROJECTION_DIM,
                        "method": "greedy k-center", "radius": radius,
                        "radius_space": radius_space(store.dim)},
            "store": {**(meta.get("store") or {}), "files": list(store.files), "num_patches": store.num_patches,
                      "num_images": store.num_images,
                      "partitions": sorted(int(f[8:13]) for f in store.files if f.startswith("patches-")) or None},
            "timings": timings}
    recall_queries = None
    if index in IVF_TYPES:  # held-aside patches: store rows not in the memory bank
        rest = np.setdiff1d(np.arange(store.num_patches), selected)
        if len(rest):
            pick = np.sort(np.random.default_rng(seed).choice(rest, min(1000, len(rest)), replace=False))
            recall_queries = store.embeddings(pick)
    built = PatchIndex.from_embeddings(store.embeddings(selected), shards, index, **(index_params or {}),
                                       recall_queries=recall_queries, seed=seed, sources=sources,
                                       images=store.image_paths(), manifest=meta, device=device)
    timings["index"] = time.perf_counter() - t0
    for key, value in timings.items():
        timings[key] = round(value, 3)
    if index in IVF_TYPES:
        log(f"IVF {built.params}")
    return built
