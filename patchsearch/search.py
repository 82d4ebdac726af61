"""The query layer: :class:`PatchIndex`, a PatchCore memory bank you can search.

For every test patch it returns the k nearest memory-bank distances (L2, not
squared) and locations (memory-bank rows, which map back to the training image and
patch position they came from), PatchCore's reweighted image score (paper Eq. 7,
:func:`patchsearch.score.reweighted_scores`) and, for images, the anomaly map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import index as faiss_index
from .data import Geometry, iter_batches
from .errors import IndexFormatError, InputError
from .manifest import (MANIFEST, atomic_directory, check_sizes, failpoint, file_entry, package_versions,
                       read_manifest, write_manifest)
from .score import SIGMA, anomaly_maps, reweighted_scores
from .store import BANK_FILE, read_bank, write_bank

K = 9  # nearest neighbours reported per patch
B = 9  # support-set size |N_b(m*)| of Eq. 7
AUTO_INT8_DIM = 512  # below this FAISS flat is already faster than the int8 pass


@dataclass
class SearchResult:
    """Search results for N images of P patches each.

    Attributes:
        distances: float32 (N, P, k) L2 distances to the k nearest memory-bank rows, ascending.
        locations: int64 (N, P, k) memory-bank rows of those neighbours.
        image_scores: float32 (N,) reweighted image scores (Eq. 7).
        top_patches: int64 (N,) flat index of the patch with the largest nearest-neighbour distance.
        grid: (h, w) patch grid, P = h * w (None for :meth:`PatchIndex.search` on flat patch lists).
        anomaly_maps: float32 (N, H, W) anomaly maps in crop pixels, or None.
        paths: image paths, or None.
        errors: {image position: message} for images that could not be read (their
            rows hold NaN scores and -1 locations).
    """

    distances: np.ndarray
    locations: np.ndarray
    image_scores: np.ndarray
    top_patches: np.ndarray
    grid: tuple[int, int] | None = None
    anomaly_maps: np.ndarray | None = None
    paths: list[str] | None = None
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def patch_scores(self) -> np.ndarray:
        """float32 (N, P): nearest-neighbour L2 distance of every patch."""
        return self.distances[..., 0]


def _check_bank(bank) -> np.ndarray:
    if not isinstance(bank, np.ndarray) or bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
        raise InputError(f"memory bank must be a non-empty (M, d) numpy array, got "
                         f"{getattr(bank, 'shape', type(bank).__name__)}")
    if not np.issubdtype(bank.dtype, np.floating):
        raise InputError(f"memory bank must be floating point, got {bank.dtype}")
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    for s in range(0, len(bank), 65536):  # chunked: no bank-sized temporary
        if not np.isfinite(bank[s:s + 65536]).all():
            raise InputError(f"memory bank contains NaN or infinite values (rows {s}..)")
    return bank


class PatchIndex:
    """A PatchCore memory bank in sharded FAISS indexes.

    Build one with :meth:`from_embeddings` (library use) or ``patchsearch build``
    (which also records the backbone so that :meth:`query` can embed images), open
    one with :meth:`load`.

    Attributes:
        bank: float32 (M, d) memory bank.
        meta: build metadata (backbone, geometry, coreset, ...), as in the manifest.
        sources: None, or where each bank row came from:
            {"store_row": (M,), "image": [M paths], "row": (M,), "col": (M,)}.
    """

    def __init__(self, bank: np.ndarray, shards: list, meta: dict | None = None,
                 sources: dict | None = None, support: np.ndarray | None = None,
                 gpu: bool | None = None, exact: str = "auto"):
        self.bank = bank
        self.shards = shards
        self.meta = dict(meta or {})
        self.sources = sources
        self.support = support
        self.path: Path | None = None
        self._searcher = faiss_index.ShardedSearcher(shards, gpu=gpu)
        self.params = dict(self.meta.get("ivfpq") or {})
        if self._searcher.is_ivf and "nprobe" in self.params:
            self._searcher.set_nprobe(self.params["nprobe"])
        self._int8 = None
        if exact not in ("faiss", "int8", "auto"):
            raise InputError(f"exact search must be faiss, int8 or auto, got {exact!r}")
        if not self._searcher.is_ivf and not self._searcher.on_gpu and (exact == "int8" or (
                exact == "auto" and self.dim >= AUTO_INT8_DIM and faiss_index.cpu_has_int8_dot())):
            self._int8 = faiss_index.Int8Flat(self.bank, self._searcher)
        self._embedder = None

    # construction -------------------------------------------------------------------
    @classmethod
    def from_embeddings(cls, bank: np.ndarray, shards: int = 1, index: str = "flat", *,
                        nlist: int | None = None, pq_m: int | None = None, pq_bits: int | None = None,
                        nprobe: int | None = None, rerank: int | None = None, target_recall: float = 0.95,
                        recall_queries: np.ndarray | None = None, support_sets: bool = True, b: int = B,
                        seed: int = 0, meta: dict | None = None, sources: dict | None = None,
                        gpu: bool | None = None, exact: str = "auto") -> "PatchIndex":
        """Index a memory bank.

        Args:
            bank: float (M, d) memory bank (converted to float32).
            shards: number of FAISS shards (results equal one shard; ids stay bank rows).
            index: ``"flat"`` (exact L2, ``faiss.IndexFlatL2``) or ``"ivfpq"``
                (``faiss.IndexIVFPQ`` candidates re-ranked with exact L2).
            nlist, pq_m, pq_bits, nprobe, rerank: IVF-PQ parameters; those not given are
                chosen by :func:`patchsearch.index.auto_ivfpq_params`, and nprobe is then
                raised (doubling) until recall@9 reaches ``target_recall``.
            recall_queries: float32 (n, d) held-aside patches for measuring IVF-PQ
                recall@9 against exact search (default: 1000 bank rows, themselves excluded).
            support_sets: precompute N_b(m) for every bank row (exact kNN graph of the
                bank) so that a query needs one search instead of two (Eq. 7).
            b: support-set size.
            seed: seeds the IVF-PQ training sample and k-means.
            meta, sources: build metadata and bank-row sources (see class attributes).
            gpu: place shards on GPUs; None = when faiss sees GPUs.
            exact: flat search on CPU: ``"faiss"`` (IndexFlatL2), ``"int8"`` (int8
                candidates re-ranked exactly, :class:`patchsearch.index.Int8Flat`) or
                ``"auto"`` (int8 where the CPU has VNNI and d >= 512, else faiss).

        Raises:
            InputError: not a non-empty 2-D float array, NaN/inf values, bad shard count or
                IVF-PQ parameters.
        """
        bank = _check_bank(bank)
        meta = {**(meta or {}), "index_type": index}
        params = None
        if index == "ivfpq":
            params = faiss_index.auto_ivfpq_params(len(bank), bank.shape[1], nlist, pq_m, pq_bits, nprobe, rerank)
            meta["ivfpq"] = params
        built = faiss_index.build_shards(bank, shards, index, params, seed=seed)
        out = cls(bank, built, meta=meta, sources=sources, gpu=gpu, exact=exact)
        if index == "ivfpq":
            out._tune(recall_queries, target_recall, tune=nprobe is None, seed=seed)
        if support_sets:
            out.support = out.exact_support_sets(b)
        return out

    def _tune(self, queries, target: float, tune: bool, seed: int) -> None:
        """Measure IVF-PQ recall@9 (and raise nprobe until it reaches ``target`` if ``tune``)."""
        rng = np.random.default_rng(seed)
        self_excluded = queries is None
        if self_excluded:
            queries = self.bank[np.sort(rng.choice(self.size, min(1000, self.size), replace=False))]
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(K, self.size - (1 if self_excluded else 0))
        truth = _exact_knn(self.bank, queries, k + self_excluded)[1]

        def recall():
            got = self.knn(queries, k + self_excluded)[1]
            hits = 0
            for t, g in zip(truth, got):
                if self_excluded:
                    t, g = t[1:], g[1:]  # the query itself (distance 0) comes first in both
                hits += len(np.intersect1d(t, g))
            return hits / (len(queries) * k)

        nlist = self.params["nlist"]
        r = recall()
        while tune and r < target and self.params["nprobe"] < nlist:
            self.set_nprobe(min(nlist, self.params["nprobe"] * 2))
            r = recall()
        self.params.update({"recall_at_9": round(r, 5), "recall_queries": len(queries),
                            "recall_queries_kind": "bank rows (self excluded)" if self_excluded else "held-aside"})
        self.meta["ivfpq"] = self.params

    def set_nprobe(self, nprobe: int) -> None:
        """IVF-PQ: inverted lists visited per query (a query-time override).

        Raises:
            InputError: not an IVF-PQ index, or nprobe outside [1, nlist].
        """
        if not self._searcher.is_ivf:
            raise InputError("--nprobe applies to IVF-PQ indexes only (this index is flat)")
        if not 1 <= nprobe <= self.params["nlist"]:
            raise InputError(f"--nprobe {nprobe} must be between 1 and nlist {self.params['nlist']}")
        self.params["nprobe"] = int(nprobe)
        self._searcher.set_nprobe(nprobe)

    @classmethod
    def load(cls, path: str | os.PathLike, gpu: bool | None = None, nprobe: int | None = None,
             exact: str = "auto", backbone: str | None = None, embed_dim: int | None = None) -> "PatchIndex":
        """Open an index directory written by :meth:`save` or ``patchsearch build``.

        All files are read from one version of the directory (opened once, read through
        its file descriptor), so a concurrent rebuild that swaps the directory cannot
        mix two versions; if the version being read is removed meanwhile, the load is
        retried on the new one.

        Args:
            path: the index directory.
            gpu: place shards on GPUs; None = when faiss sees GPUs.
            nprobe: IVF-PQ query-time override of the stored nprobe.
            exact: see :meth:`from_embeddings`.
            backbone, embed_dim: if given, the index must have been built with them.

        Raises:
            IndexFormatError: missing directory or manifest, unknown format version,
                missing, truncated or inconsistent files (file sizes are checked against
                the manifest), or another backbone / embedding dimension than asked.
        """
        path = Path(path)
        for attempt in range(5):
            try:
                inode = os.stat(path).st_ino
            except FileNotFoundError:
                raise IndexFormatError(f"no index at {path}: run 'patchsearch build' first") from None
            try:
                out = cls._load_version(path, gpu, exact)
                break
            except (IndexFormatError, FileNotFoundError):
                if attempt == 4 or not path.exists() or os.stat(path).st_ino == inode:
                    raise
        out._expect(backbone, embed_dim)
        if nprobe is not None:
            out.set_nprobe(nprobe)
        out.path = path
        return out

    @classmethod
    def _load_version(cls, path: Path, gpu, exact) -> "PatchIndex":
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            proc = Path(f"/proc/self/fd/{fd}")
            base = proc if proc.is_dir() else path
            manifest = read_manifest(base)
            try:
                bank_info = manifest["memory_bank"]
                shard_info = manifest["index"]["shards"]
                dim = manifest["embedding_dim"]
            except (KeyError, TypeError):
                raise IndexFormatError(f"{path / MANIFEST}: incomplete manifest") from None
            check_sizes(base, manifest)
            bank, sources, support = read_bank(base / bank_info["file"])
            if bank.shape != (bank_info["size"], dim):
                raise IndexFormatError(f"{path / bank_info['file']}: memory bank is {bank.shape}, manifest says "
                                       f"({bank_info['size']}, {dim})")
            shards = [faiss_index.read_shard(base / s["file"], dim, s["stop"] - s["start"]) for s in shard_info]
        except IndexFormatError as exc:  # name the index's own path, not /proc/self/fd/N
            raise IndexFormatError(str(exc).replace(str(base), str(path))) from None
        finally:
            os.close(fd)
        meta = {k: v for k, v in manifest.items() if k not in ("format", "format_version")}
        return cls(bank, shards, meta=meta, sources=sources, support=support, gpu=gpu, exact=exact)

    def _expect(self, backbone: str | None, embed_dim: int | None) -> None:
        built = (self.meta.get("backbone") or {}).get("name")
        where = f"the index at {self.path}" if self.path else "the index"
        if backbone is not None and built != backbone:
            raise IndexFormatError(f"{where} was built with backbone {built}, not {backbone}: "
                                   f"rebuild it with --backbone {backbone} or query without --backbone")
        if embed_dim is not None and embed_dim != self.dim:
            raise IndexFormatError(f"{where} holds {self.dim}-d embeddings, not {embed_dim}-d")

    def write(self, directory: str | os.PathLike, extra: dict | None = None) -> None:
        """Write shards, memory bank and manifest into an existing directory (not atomic)."""
        directory = Path(directory)
        names = faiss_index.write_shards(self.shards, directory)
        failpoint("index-write")
        bounds = faiss_index.shard_bounds(len(self.bank), len(self.shards))
        write_bank(directory / BANK_FILE, self.bank, self.sources, self.support)
        self.meta.update(extra or {})
        index_bytes = sum((directory / n).stat().st_size for n in names)
        self.meta.update({
            "embedding_dim": self.dim,
            "memory_bank": {"file": BANK_FILE, "size": self.size,
                            "support_b": None if self.support is None else int(self.support.shape[1])},
            "index": {"type": self.meta.get("index_type", "flat"), "metric": "L2",
                      "bytes_per_vector": round(index_bytes / self.size, 2),
                      "shards": [{"file": n, "start": a, "stop": b} for n, (a, b) in zip(names, bounds)]},
            "versions": package_versions(),
            "files": {p.name: file_entry(p) for p in sorted(directory.iterdir()) if p.name != MANIFEST},
        })
        write_manifest(directory, self.meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path``, replacing what is there only once complete."""
        with atomic_directory(path) as tmp:
            self.write(tmp)
        self.path = Path(path)

    # properties ---------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        return int(self.bank.shape[1])

    @property
    def size(self) -> int:
        """Memory-bank size M."""
        return int(self.bank.shape[0])

    @property
    def index_type(self) -> str:
        return "ivfpq" if self._searcher.is_ivf else "flat"

    @property
    def geometry(self) -> Geometry:
        g = self.meta.get("geometry") or {}
        return Geometry(**g) if g else Geometry()

    # search -------------------------------------------------------------------------
    def knn(self, queries: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
        """k nearest memory-bank rows: (L2 distances float32 (n, k), rows int64 (n, k)).

        Flat: exact. IVF-PQ: the ``rerank * k`` IVF-PQ candidates re-ranked with exact L2
        (distances exact, rows -1 where fewer than k candidates were found); with rerank 0
        the PQ-approximate distances.

        Raises:
            InputError: not (n, d), NaN/inf values, k outside [1, M].
        """
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InputError(f"queries must be (n, {self.dim}), got {queries.shape}")
        if not 1 <= k <= self.size:
            raise InputError(f"k={k} must be between 1 and the memory-bank size {self.size}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not np.isfinite(queries).all():
            raise InputError("query embeddings contain NaN or infinite values")
        if self._searcher.is_ivf and self.params.get("rerank", 0) > 0:
            _, cand = self._searcher.search(queries, min(self.size, k * self.params["rerank"]))
            d2, rows = faiss_index.rerank(queries, self.bank, cand, k)
        elif self._int8 is not None:
            d2, rows = self._int8.search(queries, k)
        else:
            d2, rows = self._searcher.search(queries, k)
        return np.sqrt(np.maximum(d2, 0.0)), rows

    def exact_support_sets(self, b: int = B, chunk: int = 4096) -> np.ndarray:
        """N_b(m) for every bank row by exact search (the bank's kNN graph): int64 (M, min(b, M)).

        Row m holds m itself first, then its nearest other bank rows by increasing L2.
        """
        b = min(b, self.size)
        # On CPU search the bank array in place (faiss.knn); an IndexFlatL2 would copy it.
        flat = faiss_index.ShardedSearcher(faiss_index.build_shards(self.bank, 1, "flat"), gpu=True) \
            if self._searcher.on_gpu else faiss_index.KnnSearcher(self.bank)
        out = np.empty((self.size, b), dtype=np.int64)
        for s in range(0, self.size, chunk):
            rows = np.arange(s, min(self.size, s + chunk))
            _, nn = flat.search(self.bank[rows], min(b + 1, self.size))
            out[rows] = _self_first(rows, nn, b)
        return out

    def support_sets(self, rows: np.ndarray, b: int = B) -> np.ndarray:
        """N_b(m) for memory-bank rows m: int64 (n, min(b, M)), m itself first, then its
        nearest other bank rows in increasing L2 distance. Taken from the precomputed
        support sets when the index has them (same b), else by a search."""
        rows = np.asarray(rows, dtype=np.int64)
        b = min(b, self.size)
        if self.support is not None and self.support.shape[1] == b:
            return np.asarray(self.support[rows])
        _, nn = self.knn(self.bank[rows], min(b + 1, self.size))
        return _self_first(rows, nn, b)

    def search(self, patches: np.ndarray, k: int = K, b: int = B) -> SearchResult:
        """Search the patch embeddings of N images.

        Args:
            patches: float32 (N, P, d) patch embeddings.
            k: neighbours reported per patch (1 <= k <= M).
            b: support-set size of Eq. 7 (clipped to M).

        Returns:
            :class:`SearchResult` with distances, locations, image scores and top patches.

        Raises:
            InputError: wrong shape or dimension, NaN/inf values, k outside [1, M].
        """
        patches = np.asarray(patches)
        if patches.ndim != 3 or patches.shape[2] != self.dim or patches.shape[1] == 0:
            raise InputError(f"patches must be (N, P, {self.dim}), got {patches.shape}")
        n, p, d = patches.shape
        dist, loc = self.knn(patches.reshape(n * p, d), k)
        dist, loc = dist.reshape(n, p, k), loc.reshape(n, p, k)
        top = dist[..., 0].argmax(axis=1)
        ar = np.arange(n)
        s_star = dist[ar, top, 0]
        support = self.support_sets(loc[ar, top, 0], b) if n else np.empty((0, 1), np.int64)
        scores = reweighted_scores(patches[ar, top], s_star, support, self.bank)
        return SearchResult(dist, loc, scores, top.astype(np.int64))

    # images -------------------------------------------------------------------------
    @property
    def embedder(self):
        """The :class:`~patchsearch.features.PatchEmbedder` this index was built with.

        Raises:
            IndexFormatError: the index records no backbone, or its weights changed.
        """
        if self._embedder is None:
            from .features import PatchEmbedder

            bb = self.meta.get("backbone")
            if not bb:
                raise IndexFormatError("this index was built from raw embeddings and records no backbone: "
                                       "use search() with patch embeddings")
            emb = PatchEmbedder(bb["name"], bb["layers"], bb.get("weights_path"),
                                bb["embed_dim"] if bb.get("reduced") else None)
            if emb.dim != self.dim:
                raise IndexFormatError(f"backbone {bb['name']} gives {emb.dim}-d embeddings, index holds {self.dim}-d")
            recorded = (bb.get("weights") or {}).get("sha256")
            if recorded and emb.weights_id.get("sha256") and recorded != emb.weights_id["sha256"]:
                raise IndexFormatError(f"the weights of {bb['name']} ({emb.weights_id['source']}) differ from "
                                       f"those the index was built with ({bb['weights']['source']})")
            self._embedder = emb
        return self._embedder

    def iter_query(self, images, k: int = K, b: int = B, batch_size: int = 16, maps: bool = True,
                   sigma: float = SIGMA) -> Iterator[SearchResult]:
        """Like :meth:`query`, one :class:`SearchResult` per batch of images (bounded memory)."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise InputError(f"image tensor must be (N, 3, H, W), got {tuple(images.shape)}")
            for start in range(0, len(images), batch_size):
                yield self._score_batch(images[start:start + batch_size].float(), k, b, maps, sigma)
            return
        paths = [Path(p) for p in images]
        for batch, good, errors in iter_batches(paths, self.geometry, batch_size):
            first = min(list(good) + list(errors))
            n = len(good) + len(errors)
            local = {i - first: e for i, e in errors.items()}
            part = self._score_batch(batch, k, b, maps, sigma) if batch is not None else None
            yield _expand(part, [i - first for i in good], n, local, [str(paths[i]) for i in range(first, first + n)],
                          k, self.patch_count(), self.geometry.crop if maps else None)

    def query(self, images, k: int = K, b: int = B, batch_size: int = 16, maps: bool = True,
              sigma: float = SIGMA) -> SearchResult:
        """Embed and search images with the backbone the index was built with.

        Args:
            images: image paths (str or Path), or a float32 tensor (N, 3, H, W) already
                preprocessed (normalised, cropped) like :meth:`patchsearch.data.Geometry.image_tensor`.
            k, b: see :meth:`search`.
            batch_size: images embedded at a time.
            maps: compute anomaly maps (N, H, W) (crop size for paths, H x W for tensors).
            sigma: Gaussian blur of the anomaly maps, pixels.

        Returns:
            :class:`SearchResult` with ``paths`` (for path input), ``anomaly_maps`` and
            ``errors`` for unreadable images.
        """
        parts = list(self.iter_query(images, k, b, batch_size, maps, sigma))
        if not parts:
            raise InputError("no image to query")
        out = SearchResult(
            np.concatenate([p.distances for p in parts]), np.concatenate([p.locations for p in parts]),
            np.concatenate([p.image_scores for p in parts]), np.concatenate([p.top_patches for p in parts]),
            grid=parts[0].grid,
            anomaly_maps=np.concatenate([p.anomaly_maps for p in parts]) if maps else None,
            paths=sum((p.paths for p in parts), []) if parts[0].paths is not None else None)
        offset = 0
        for p in parts:
            out.errors.update({offset + i: e for i, e in p.errors.items()})
            offset += len(p.image_scores)
        return out

    def _score_batch(self, batch: torch.Tensor, k: int, b: int, maps: bool, sigma: float) -> SearchResult:
        emb = self.embedder(batch).numpy()  # (B, h, w, d)
        n, h, w, d = emb.shape
        result = self.search(emb.reshape(n, h * w, d), k, b)
        result.grid = (h, w)
        if maps:
            result.anomaly_maps = anomaly_maps(result.patch_scores.reshape(n, h, w), tuple(batch.shape[-2:]), sigma)
        return result

    def patch_count(self) -> int:
        """Patches per image P = h * w for this index's backbone and crop size."""
        if "grid" in self.meta:
            h, w = self.meta["grid"]
            return int(h * w)
        crop = self.geometry.crop
        with torch.no_grad():
            emb = self.embedder(torch.zeros(1, 3, crop, crop))
        self.meta["grid"] = [int(emb.shape[1]), int(emb.shape[2])]
        return int(emb.shape[1] * emb.shape[2])

    def describe_locations(self, rows: Sequence[int]) -> list[dict]:
        """Training patch behind each memory-bank row: [{"bank_row", "image", "row", "col"}]."""
        out = []
        for r in rows:
            r = int(r)
            item = {"bank_row": r}
            if self.sources is not None and r >= 0:
                item.update(image=self.sources["image"][r], row=int(self.sources["row"][r]),
                            col=int(self.sources["col"][r]))
            out.append(item)
        return out


def _self_first(rows: np.ndarray, nn: np.ndarray, b: int) -> np.ndarray:
    """Support sets from neighbour lists: each row itself first, then its first b-1 other neighbours."""
    out = np.empty((len(rows), b), dtype=np.int64)
    for i, (m, cand) in enumerate(zip(rows, nn)):
        other = cand[(cand != m) & (cand >= 0)][:b - 1]
        out[i, 0] = m
        out[i, 1:1 + len(other)] = other
        out[i, 1 + len(other):] = m  # fewer than b found (IVF-PQ): pad with m itself
    return out


def _exact_knn(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared-L2 k-NN of queries in the bank (``faiss.knn``)."""
    return faiss_index.KnnSearcher(bank).search(queries, k)


def _expand(part: SearchResult | None, good: list[int], n: int, errors: dict, paths: list[str], k: int,
            p: int, crop: int | None) -> SearchResult:
    """Place the results of the readable images of a batch among its unreadable ones."""
    if part is not None and len(good) == n:
        part.paths, part.errors = paths, errors
        return part
    dist = np.full((n, p, k), np.nan, np.float32)
    loc = np.full((n, p, k), -1, np.int64)
    scores = np.full(n, np.nan, np.float32)
    top = np.full(n, -1, np.int64)
    amaps = np.full((n, crop, crop), np.nan, np.float32) if crop else None
    grid = None
    if part is not None:
        dist[good], loc[good], scores[good], top[good] = part.distances, part.locations, part.image_scores, \
            part.top_patches
        if amaps is not None:
            amaps[good] = part.anomaly_maps
        grid = part.grid
    return SearchResult(dist, loc, scores, top, grid=grid, anomaly_maps=amaps, paths=paths, errors=errors)
