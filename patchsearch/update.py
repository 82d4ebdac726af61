"""Incremental updates of a built index: add good frames, take frames back out, without a rebuild.

``add`` (:func:`add_images`): the frames are embedded with the index's recorded backbone
(weights checked by SHA-256), geometry and bit depth, and written as ONE new partition of
the Arrow patch store (the existing partitions are hard-linked into the new version, never
rewritten; image ids go on). The memory bank is then extended by *continuing* greedy
k-center (PatchCore §3.2): with r the coreset's covering radius before the update, the new
patch farthest from the bank joins it while its distance exceeds r, farthest first, until
every store patch is again within r of the bank. Distances are measured where the coreset
measured them: on its seeded Gaussian projection to ``projection_dim`` dimensions (L2, not
squared; the embeddings themselves when d <= projection_dim), recorded as
``coreset.radius_space``. Old store patches stay covered because the bank only grows, so
only the new patches are searched. New bank rows are appended (old rows keep their
numbers); flat shards are rebuilt from the bank (a copy), IVF shards get the new rows with
their bank-row ids (``add_with_ids`` on a clone of the trained last shard); support sets
N_b(m) of Eq. 7 are recomputed for the new rows and for every old row whose neighbourhood a
new row can enter, so they equal the exact kNN graph of the new bank.

``remove`` (:func:`remove_images`): the frames' patches leave the store (the partitions
holding them, and those after them, whose image ids shift, are written anew into the new
version; the old version's files are untouched), their bank rows leave the bank (the
other rows keep their order), and greedy k-center continues from the remaining bank over
the remaining store patches that only removed rows covered, until every store patch is
within r again. Removing the frames of an ``add`` therefore restores the bank before it
row for row: its rows cover the old store within r by definition of r.

Both re-fit the calibrated thresholds with the recorded rule on the recorded held-aside
good frames (:func:`patchsearch.refit.refit`: found under ``data_root``, else where they
were recorded; where they are not found, or the threshold was picked F1-optimal on labelled
frames, the thresholds are kept and the history says so; after an add only the frames that
can decide the thresholds are re-scored, :func:`patchsearch.refit.refit_bounded`), append
a record to the manifest's ``history`` (time, action, frames, bank rows and store patches
before and after, covering radius and its space, calibration, seconds), and install a new
version through :func:`patchsearch.versions.new_version`: a crash leaves the previous
version answering, and an update refuses to install over a version another writer
installed meanwhile (``VersionConflict``, nothing installed: run it again).

Float32 rounding: a patch counts as covered when its distance is at most
r * (1 + :data:`REL_TOL`).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .bank import MemoryBank, exact_support_sets
from .coreset import PROJECTION_DIM, radius_space, random_projection
from .coreset_update import REL_TOL, cover
from .errors import IndexFormatError, InputError
from .files import link_or_copy, sha256
from .index import PatchIndex
from .refit import refit
from .searchers import KnnSearcher, faiss
from .shard_update import shards_after_add, shards_rebuilt
from .store import ImageRecord, PatchStore, PatchStoreWriter, partition_files, relative_path
from .support_update import support_after_add, support_width
from .versions import new_version, tidy

Log = Callable[[str], None]


def _projector(manifest, dim: int):
    """The coreset's projection of (n, d) embeddings, and the name of its space."""
    pdim = int((manifest.coreset or {}).get("projection_dim", PROJECTION_DIM))
    seed = int((manifest.coreset or {}).get("seed", 0))
    return (lambda x: random_projection(x, pdim, seed)), radius_space(dim, pdim)


def _covering_radius(index: PatchIndex, store: PatchStore, project, space: str, log: Log) -> tuple[float, bool]:
    """(covering radius before the update, whether it had to be computed): recorded in the
    manifest since patchsearch records it at build, else the largest distance of a store
    patch to the bank in the coreset's space (faiss.knn over the projected store)."""
    cs = index.manifest.coreset or {}
    if cs.get("radius") is not None and cs.get("radius_space") == space:
        return float(cs["radius"]), False
    t0 = time.perf_counter()
    bank = project(index.bank)
    worst = 0.0
    for s in range(0, store.num_patches, 65536):
        rows = np.arange(s, min(store.num_patches, s + 65536))
        d2 = faiss().knn(project(store.embeddings(rows)), bank, 1)[0]
        worst = max(worst, float(d2.max()))
    radius = float(np.sqrt(max(worst, 0.0)))
    log(f"covering radius not recorded (index built before patchsearch recorded it): computed {radius:.4f} "
        f"({space}, L2) over {store.num_patches} store patches in {time.perf_counter() - t0:.1f} s")
    return radius, True


# ---------------------------------------------------------------------------------------------
# index pieces

def _open_base(index_dir: Path) -> tuple[PatchIndex, PatchStore]:
    """The current version (read, not searched: on the CPU) and its patch store; IndexFormatError
    if it cannot be updated."""
    index = PatchIndex.load(index_dir, device="cpu")
    try:
        man = index.manifest
        if not (man.store or {}).get("files") or index.memory_bank.sources is None:
            raise IndexFormatError(f"the index at {index_dir} has no patch store to update: build it with "
                                   "'patchsearch build'")
        if not (man.store or {}).get("partitions"):
            raise IndexFormatError(f"the index at {index_dir} has a version-1 patch store (one patches.arrow), "
                                   "which cannot grow by partitions: build it again with 'patchsearch build'")
        store = PatchStore(index.directory, partitions=man.store["partitions"])
    except BaseException:
        index.close()
        raise
    return index, store


def _reuse(index: PatchIndex, embedder) -> None:
    """Let ``index`` use a caller's embedder if it is the one its manifest records."""
    if embedder is not None and json.loads(json.dumps(embedder.describe())) == index.manifest.backbone:
        index.embedder = embedder


def _finish(index: PatchIndex, bank: np.ndarray, sources: dict, support, shards: list, store: PatchStore,
            partitions: list[int], record: dict, radius: float, space: str, data_root, batch_size: int,
            log: Log, embedder=None, weights: str | None = None, device: str | None = None) -> PatchIndex:
    """The new version's PatchIndex (calibration re-fitted on ``device``, history appended), not yet written."""
    man = copy.deepcopy(index.manifest)
    man.created = None
    man.coreset = {**(man.coreset or {}), "radius": radius, "radius_space": space}
    man.store = {**man.store, "files": list(store.files), "num_patches": store.num_patches,
                 "num_images": store.num_images, "partitions": partitions}
    built = PatchIndex(MemoryBank(bank, sources, store.image_paths(), support), shards, man, device=device or "cpu")
    if embedder is not None:
        from .device import move_module

        built.embedder = move_module(embedder, device)
    cal, note = refit(built, index.manifest.calibration, data_root, batch_size, f"patchsearch {record['action']}",
                      weights, grown=record["action"] == "add")
    built.manifest.calibration = cal
    log(note)
    record["calibration"] = note
    man.extra["history"] = list(man.extra.get("history") or []) + [record]
    return built


def _record(action: str, frames: list[str], index: PatchIndex, store_before: PatchStore, bank_after: int,
            store_after: PatchStore, radius: float, space: str, largest: float) -> dict:
    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "action": action,
            "frames": frames, "bank_rows": [index.size, int(bank_after)],
            "store_patches": [store_before.num_patches, store_after.num_patches],
            "store_images": [store_before.num_images, store_after.num_images],
            "covering_radius": round(float(radius), 6), "radius_space": space,
            "largest_distance_after": round(float(largest), 6), "from_version": index.version}


# ---------------------------------------------------------------------------------------------
# add

def _target(index, embedder, device, name: str):
    """(index directory, embedder, device) of an update of ``index``: a directory, or a
    loaded :class:`PatchIndex` (its directory, embedder and device are the defaults)."""
    if isinstance(index, PatchIndex):
        if index.path is None:
            raise InputError(f"{name} needs an index loaded from or saved to an index directory")
        return index.path, embedder if embedder is not None else index.embedder, \
            device if device is not None else index.device
    return index, embedder, device


def add_images(index_dir: "str | os.PathLike | PatchIndex", paths: Sequence[str | os.PathLike], *,
               data_root: str | os.PathLike | None = None, weights: str | None = None, batch_size: int = 16,
               workers: int = 0, progress: bool = False, log: Log = lambda msg: None,
               embedder=None, device: str | None = None) -> PatchIndex:
    """Add good frames to the current version of an index: a new version (see the module docstring).

    Args:
        index_dir: the index directory (``<index-dir>/<category>``), or a loaded
            :class:`PatchIndex` (its directory; its embedder and device are the defaults).
        paths: the frames (any size: resized by the recorded geometry like queries).
        data_root: the frames' paths are recorded relative to it (default: their common
            folder); the recorded held-aside calibration frames are looked up under it.
        weights: the state-dict file, for an index built with ``--weights``.
        batch_size, workers: frames per backbone batch, decoding worker processes.
        embedder: a :class:`~patchsearch.features.PatchEmbedder` already loaded for this index.
        device: where the new frames are embedded and the thresholds re-fitted
            (:mod:`patchsearch.device`; default: the CPU, or ``embedder``'s device). A given
            ``embedder`` is moved there.

    Returns:
        the new version, loaded for inspection on the CPU (load it with ``device=`` to
        search on a GPU). Frames already in the store (same SHA-256; also repeated
        ones in ``paths``) are skipped; when every frame is, nothing is written and the
        current version is returned as it is.

    Raises:
        InputError: no frame, an unreadable frame (named; nothing is installed).
        IndexFormatError: no index, one without a patch store or backbone, other weights.
    """
    from .ingest import embed_frames
    from .embedders import embedder_for

    from .device import move_module, resolve_device

    index_dir, embedder, device = _target(index_dir, embedder, device, "add_images")
    index_dir, paths = Path(index_dir), [Path(p) for p in paths]
    if not paths:
        raise InputError("no frame to add")
    device = resolve_device(device) if device is not None else None
    t_start = time.perf_counter()
    index, store = _open_base(index_dir)
    try:
        root = Path(data_root) if data_root is not None else \
            Path(os.path.commonpath([Path(os.path.abspath(p)).parent for p in paths]))
        known = dict(zip(store.images()["sha256"].to_pylist(), store.image_paths()))
        new, skipped = [], []
        for p in paths:
            rec = ImageRecord.from_file(p, root)  # InputError naming an unreadable file
            if rec.sha256 in known:
                skipped.append(rec.path)
            else:
                known[rec.sha256] = rec.path
                new.append(p)
        if skipped:
            log(f"skipped {len(skipped)} frame(s) already in the patch store (same SHA-256): "
                f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
        if not new:
            log(f"nothing to add: the index at {index_dir} is unchanged ({index.version})")
            return index
        _reuse(index, embedder)
        embedder = move_module(embedder_for(index, weights), device)
        geometry = index.manifest.frame_geometry()
        bit_depth = (index.manifest.extra.get("decode") or {}).get("bit_depth")
        project, space = _projector(index.manifest, index.dim)
        radius, computed = _covering_radius(index, store, project, space, log)
        partitions = [int(p) for p in index.manifest.store["partitions"]]
        part = max(partitions) + 1
        with new_version(index_dir, expect_current=index.version) as tmp:
            for name in store.files:
                link_or_copy(index.directory / name, tmp / name)
            t0 = time.perf_counter()
            with PatchStoreWriter(tmp, store.dim, partition=part, first_image_id=store.num_images) as writer:
                embed_frames(writer, new, embedder, geometry, root, batch_size, workers, bit_depth, progress,
                             what="frame")
            t_embed = time.perf_counter() - t0
            grown = PatchStore(tmp, partitions=partitions + [part])
            rows = np.arange(store.num_patches, grown.num_patches)
            fresh = grown.embeddings(rows)
            t0 = time.perf_counter()
            picked, largest = cover(project(index.bank), project(fresh), radius)
            t_cover = time.perf_counter() - t0
            start = index.size
            bank = np.concatenate([np.asarray(index.bank), fresh[picked]])
            src = grown.locations(rows[picked])
            old_src = index.memory_bank.sources
            sources = {"store_row": np.concatenate([old_src["store_row"], rows[picked]]).astype(np.int64),
                       **{k: np.concatenate([old_src[k], src[k]]) for k in ("image_id", "tile", "row", "col")}}
            t0 = time.perf_counter()
            support, redone = support_after_add(index.support, bank, start)
            shards = shards_after_add(index, bank, start)
            t_index = time.perf_counter() - t0
            frames = [relative_path(p, root) for p in new]
            record = _record("add", frames, index, store, len(bank), grown, radius, space, largest)
            record["skipped_duplicates"] = skipped
            record["support_sets_recomputed"] = None if support is None else int(redone + len(bank) - start)
            if computed:
                record["radius_computed_at_update"] = True
            log(f"added {len(new)} frame(s): {grown.num_patches - store.num_patches} patches "
                f"(embedded in {t_embed:.1f} s); {len(picked)} joined the memory bank "
                f"({start} -> {len(bank)} rows; covering radius {radius:.4f}, {space}, L2) in {t_cover:.2f} s")
            t0 = time.perf_counter()
            built = _finish(index, bank, sources, support, shards, grown, partitions + [part], record, radius,
                            space, data_root, batch_size, log, embedder, weights, device)
            record["seconds"] = {"embed": round(t_embed, 3), "cover": round(t_cover, 3),
                                 "index": round(t_index, 3), "calibrate": round(time.perf_counter() - t0, 3),
                                 "total": round(time.perf_counter() - t_start, 3)}
            built.write(tmp)
            del grown, fresh, src  # their memory maps of tmp: Windows renames no directory with a mapped file
    finally:
        index.close()
    tidy(index_dir)
    return PatchIndex.load(index_dir, device="cpu")  # for inspection: nothing goes to a GPU for it


# ---------------------------------------------------------------------------------------------
# remove

def _match(store: PatchStore, paths: Sequence[Path], root: Path | None, index_dir: Path) -> list[int]:
    """Image ids of the given frames: by path as recorded (relative to ``root``) or, for an
    existing file, by its SHA-256. InputError naming a frame that is not in the store."""
    images = store.images()
    ids = images["image_id"].to_pylist()
    by_path = {p: i for p, i in zip(images["path"].to_pylist(), ids)}
    by_sha = {}
    for s, i in zip(images["sha256"].to_pylist(), ids):
        by_sha.setdefault(s, []).append(i)
    out = []
    for p in paths:
        found = []
        for key in {relative_path(p, root) if root is not None else None, Path(p).as_posix(),
                    relative_path(p, Path.cwd())} - {None}:
            if key in by_path:
                found.append(by_path[key])
        if Path(p).is_file():
            found += by_sha.get(sha256(p), [])
        if not found:
            raise InputError(f"{p}: not in the patch store of the index at {index_dir} (no frame with this "
                             "path or SHA-256); 'patchsearch info' lists the frames added")
        out += found
    return sorted(set(out))


def _rewrite(src: PatchStore, directory: Path, partition: int, first_id: int, drop: set[int],
             chunk: int = 32) -> int:
    """Write partition ``partition`` of ``src`` (opened alone) into ``directory`` without the
    images in ``drop``, image ids from ``first_id`` on, in the same order.
    Returns the number of images written (0: nothing written)."""
    images = src.images()
    keep = [i for i, old in enumerate(images["image_id"].to_pylist()) if old not in drop]
    if not keep:
        return 0
    loc = src.locations(np.arange(src.num_patches))
    image_rows = loc["image_id"].astype(np.int64)
    starts = np.searchsorted(image_rows, np.asarray(images["image_id"].to_pylist()), side="left")
    ends = np.searchsorted(image_rows, np.asarray(images["image_id"].to_pylist()), side="right")
    tiles = int(loc["tile"].max()) + 1
    h, w = int(loc["row"].max()) + 1, int(loc["col"].max()) + 1
    rows_per_image = tiles * h * w
    with PatchStoreWriter(directory, src.dim, partition=partition, first_image_id=first_id) as writer:
        for s in range(0, len(keep), chunk):
            part = keep[s:s + chunk]
            recs, rows = [], []
            for i in part:
                r = images.slice(i, 1).to_pylist()[0]
                recs.append(ImageRecord(r["path"], r["size"], r["sha256"], r["height"], r["width"]))
                if ends[i] - starts[i] != rows_per_image:
                    raise IndexFormatError(f"{src.directory / src.files[1]}: image {r['image_id']} has "
                                           f"{ends[i] - starts[i]} patches, not {rows_per_image}")
                rows.append(np.arange(starts[i], ends[i]))
            emb = src.embeddings(np.concatenate(rows)).reshape(len(part), tiles, h, w, src.dim)
            writer.write(recs, emb if tiles > 1 else emb[:, 0], tiles=tiles if tiles > 1 else None)
    return len(keep)


def remove_images(index_dir: "str | os.PathLike | PatchIndex", paths: Sequence[str | os.PathLike], *,
                  data_root: str | os.PathLike | None = None, weights: str | None = None, batch_size: int = 16,
                  log: Log = lambda msg: None, embedder=None, device: str | None = None) -> PatchIndex:
    """Take frames back out of the current version of an index: a new version (module docstring).

    Args:
        paths: the frames, by their path as recorded in the store (relative to ``data_root``)
            or by their file (matched by SHA-256).
        index_dir, data_root, weights, batch_size, embedder, device: as :func:`add_images` (paths; the
            held-aside calibration frames are re-scored with the backbone on ``device``).

    Returns:
        the new version, loaded for inspection on the CPU.

    Raises:
        InputError: no frame given, a frame not in the store, or every frame of the store.
        IndexFormatError: no index, or one without a patch store.
    """
    from .device import resolve_device

    index_dir, embedder, device = _target(index_dir, embedder, device, "remove_images")
    index_dir, paths = Path(index_dir), [Path(p) for p in paths]
    if not paths:
        raise InputError("no frame to remove")
    device = resolve_device(device) if device is not None else None
    t_start = time.perf_counter()
    index, store = _open_base(index_dir)
    try:
        root = Path(data_root) if data_root is not None else None
        _reuse(index, embedder)
        drop = set(_match(store, paths, root, index_dir))
        if len(drop) >= store.num_images:
            raise InputError(f"removing {len(drop)} frame(s) would leave the patch store of {index_dir} empty")
        names = store.image_paths()
        frames = [names[i] for i in sorted(drop)]
        project, space = _projector(index.manifest, index.dim)
        radius, computed = _covering_radius(index, store, project, space, log)
        partitions = [int(p) for p in index.manifest.store["partitions"]]
        # store rows of the removed frames, and old -> new store rows / image ids
        image_of_row = store.locations(np.arange(store.num_patches))["image_id"].astype(np.int64)
        gone = np.isin(image_of_row, np.fromiter(drop, np.int64))
        row_map = np.where(gone, -1, np.cumsum(~gone) - 1)
        kept_ids = np.array([i for i in range(store.num_images) if i not in drop], dtype=np.int64)
        id_map = np.full(store.num_images, -1, np.int64)
        id_map[kept_ids] = np.arange(len(kept_ids))
        with new_version(index_dir, expect_current=index.version) as tmp:
            new_parts, first_id, touched = [], 0, False
            for p in partitions:
                one = PatchStore(index.directory, partitions=[p])
                ids = set(range(one.first_image_id, one.first_image_id + one.num_images))
                touched = touched or bool(ids & drop)
                if not touched:
                    for name in partition_files(p):
                        link_or_copy(index.directory / name, tmp / name)
                    n = one.num_images
                else:
                    n = _rewrite(one, tmp, p, first_id, drop)
                if n:
                    new_parts.append(p)
                    first_id += n
            shrunk = PatchStore(tmp, partitions=new_parts)
            old_src = index.memory_bank.sources
            keep_rows = np.nonzero(row_map[old_src["store_row"]] >= 0)[0]
            removed_rows = np.nonzero(row_map[old_src["store_row"]] < 0)[0]
            kept_bank = np.asarray(index.bank)[keep_rows]
            t0 = time.perf_counter()
            picked = np.empty(0, np.int64)
            largest = 0.0
            if len(removed_rows):
                # the remaining patches that only removed rows may have covered
                gone_proj = project(np.asarray(index.bank)[removed_rows])
                limit = (radius * (1 + REL_TOL)) ** 2
                cand = []
                for s in range(0, shrunk.num_patches, 65536):
                    rows = np.arange(s, min(shrunk.num_patches, s + 65536))
                    d2 = faiss().knn(project(shrunk.embeddings(rows)), gone_proj, 1)[0][:, 0]
                    cand.append(rows[d2 <= limit])
                cand = np.concatenate(cand)
                if len(cand):  # else every remaining patch was farther than r from the removed rows
                    local, largest = cover(project(kept_bank), project(shrunk.embeddings(cand)), radius)
                    picked = cand[local]
            t_cover = time.perf_counter() - t0
            bank = np.concatenate([kept_bank, shrunk.embeddings(picked)]) if len(picked) else kept_bank
            if len(bank) == 0:
                raise InputError(f"removing {len(drop)} frame(s) would leave the memory bank of {index_dir} empty")
            src = shrunk.locations(picked)
            sources = {"store_row": np.concatenate([row_map[old_src["store_row"][keep_rows]], picked]).astype(np.int64),
                       "image_id": np.concatenate([id_map[old_src["image_id"][keep_rows]], src["image_id"]]
                                                  ).astype(np.int32),
                       **{k: np.concatenate([old_src[k][keep_rows], src[k]]).astype(np.int16)
                          for k in ("tile", "row", "col")}}
            t0 = time.perf_counter()
            support = None if index.support is None else \
                exact_support_sets(bank, KnnSearcher(bank), support_width(index.support, index.size))
            shards = shards_rebuilt(index, bank)
            t_index = time.perf_counter() - t0
            record = _record("remove", frames, index, store, len(bank), shrunk, radius, space, largest)
            record["bank_rows_removed"] = int(len(removed_rows))
            record["bank_rows_reselected"] = int(len(picked))
            if computed:
                record["radius_computed_at_update"] = True
            log(f"removed {len(drop)} frame(s): {store.num_patches - shrunk.num_patches} patches, "
                f"{len(removed_rows)} memory-bank rows; {len(picked)} re-selected ({index.size} -> {len(bank)} rows; "
                f"covering radius {radius:.4f}, {space}, L2) in {t_cover:.2f} s")
            t0 = time.perf_counter()
            built = _finish(index, bank, sources, support, shards, shrunk, new_parts, record, radius, space,
                            root, batch_size, log, index.embedder, weights, device)
            record["seconds"] = {"cover": round(t_cover, 3), "index": round(t_index, 3),
                                 "calibrate": round(time.perf_counter() - t0, 3),
                                 "total": round(time.perf_counter() - t_start, 3)}
            built.write(tmp)
            del shrunk, src  # their memory maps of tmp: Windows renames no directory with a mapped file
    finally:
        index.close()
    tidy(index_dir)
    return PatchIndex.load(index_dir, device="cpu")  # for inspection: nothing goes to a GPU for it


def history(manifest) -> list[dict]:
    """The update records of an index version (oldest first; empty for a fresh build)."""
    return list((manifest.extra or {}).get("history") or [])
