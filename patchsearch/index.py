""":class:`PatchIndex`: a PatchCore memory bank you can search (no images, no torch).

For every query patch embedding it returns the k nearest memory-bank distances (L2,
not squared) and locations (memory-bank rows, which map back to the training image
and patch they came from), and per image PatchCore's reweighted score (paper Eq. 7,
:func:`patchsearch.score.reweighted_scores`). Images go through
:mod:`patchsearch.query`, which embeds them and calls :meth:`PatchIndex.search`.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from . import device_search, ivf, lowp, searchers
from .bank import B, BANK_FILE, MemoryBank, check_embeddings, exact_support_sets, read_bank, \
    support_from_neighbours, write_bank
from .errors import IndexFormatError, InputError, check_finite
from .format import Manifest, check_sizes, package_versions, read_manifest, write_manifest
from .result import SearchResult
from .score import reweighted_scores
from .versions import Lease, current_version, new_version, open_version

K = 9  # nearest neighbours reported per patch
# Precompute the bank's exact kNN graph (support sets of every row) only where it is cheap:
# M^2 d <= this (about 16k x 152 or 5k x 1536; measured 1.6 s / 0.7 s on the 2-core Xeon,
# see the README's support-set table). Larger banks and IVF indexes search N_b(m*) at
# query time (:meth:`PatchIndex.support_sets`).
SUPPORT_GRAPH_MAX_FLOPS = 4e10
SUPPORT_CACHE = 4096  # support sets kept per index (LRU, keyed by bank row)


class PatchIndex:
    """A memory bank (:class:`~patchsearch.bank.MemoryBank`) with a searcher over it.

    Build one with :meth:`from_embeddings` or ``patchsearch build``, open one with
    :meth:`load`. A loaded index holds a lease on its version of the index directory
    (:mod:`patchsearch.versions`) until :meth:`close`.

    Attributes:
        memory_bank: the :class:`~patchsearch.bank.MemoryBank`.
        manifest: the :class:`~patchsearch.format.Manifest` (build metadata).
        searcher: the :class:`~patchsearch.searchers.Searcher` answering :meth:`knn`.
        reranked: True for IVF indexes (approximate candidates re-ranked with exact L2),
            False for flat: :func:`patchsearch.searchers.reranked` of the manifest's type.
        precision: candidate precision of exact search: ``"fp32"``, ``"bf16"`` or ``"int8"``
            on the CPU (:mod:`patchsearch.lowp`), the torch search's on a device
            (:mod:`patchsearch.torch_search`); ``"fp32"`` for IVF and FAISS GPU indexes.
        path: the index directory it was loaded from or saved to, or None.
        device: where this index searches and embeds (``"cpu"``, ``"cuda"``, ``"cuda:N"``):
            a runtime choice (:mod:`patchsearch.device`), not part of the index.
    """

    device = "cpu"  # set by __init__; an index searched elsewhere (Ray shard actors) embeds here on the CPU
    # The patch embedder frames are embedded with for this index, once loaded
    # (patchsearch.embedders.embedder_for) or handed over by whoever built it; None until then.
    # Frames are embedded and searched by patchsearch.query, not here.
    embedder = None

    def __init__(self, memory_bank: MemoryBank, shards: list, manifest: Manifest, gpu: bool | None = None,
                 exact: str = "auto", lease: Lease | None = None, device: str | None = None,
                 precision: str = "fp32"):
        self.device = device_search.index_device(device, gpu)
        plan = device_search.choose(self.device, exact, searchers.faiss().try_extract_index_ivf(shards[0]) is not None)
        self.memory_bank = memory_bank
        self.manifest = manifest
        self.path: Path | None = None
        self._lease = lease
        # approximate candidates that need exact re-ranking (the manifest's type, checked
        # against the shard files): searchers.reranked, asked by RemotePatchIndex too
        self.reranked = searchers.reranked(manifest.index.get("type"), shards[0],
                                           str(lease.path) if lease is not None else "the index")
        make = ivf.sharded_searcher if searchers.faiss().try_extract_index_ivf(shards[0]) is not None \
            else searchers.ShardedSearcher
        self._sharded = make(shards, gpu=plan.faiss_gpu, gpu_ids=plan.gpu_ids)
        self.searcher = self._sharded
        self._init_search_state()
        self.precision = "fp32"
        if self.reranked:
            self.searcher = ivf.IVFPQSearcher(self._sharded, self.bank, manifest.index["params"])
        elif plan.torch:
            from .torch_search import TorchSearcher

            self.searcher = TorchSearcher(self.bank, self.device, precision)  # the bank goes to the device here
            self.precision = precision
        elif not self._sharded.on_gpu:
            kind = lowp.choose("fp32" if exact == "torch" else exact, memory_bank.size, memory_bank.dim)
            if kind != "fp32":
                self.searcher = lowp.LowpSearcher(self.bank, self._sharded, kind)  # codes built on first search
                self.precision = kind

    def _init_search_state(self) -> None:
        """The support-set cache and the lazily made exact searcher (subclasses that do not
        run ``__init__`` call this)."""
        self._support_cache: OrderedDict = OrderedDict()  # (bank row, b) -> int64 (b,)
        self._support_lock = threading.Lock()
        self._exact_bank = None  # exact searcher for IVF indexes (_exact), made on first need

    # construction -------------------------------------------------------------------
    @classmethod
    def from_embeddings(cls, bank: np.ndarray, shards: int = 1, index: str = "flat", *,
                        nlist: int | None = None, pq_m: int | None = None, pq_bits: int | None = None,
                        nprobe: int | None = None, rerank: int | None = None, target_recall: float = ivf.TARGET_RECALL,
                        recall_queries: np.ndarray | None = None, support_sets: bool | str = "auto", b: int = B,
                        seed: int = 0, sources: dict | None = None, images: list[str] | None = None,
                        manifest: dict | None = None, gpu: bool | None = None, exact: str = "auto",
                        layout: str | None = None, device: str | None = None,
                        precision: str = "fp32") -> "PatchIndex":
        """Index a memory bank.

        Args:
            bank: float (M, d) memory bank (converted to float32).
            shards: number of FAISS shards (results equal one shard; ids stay bank rows).
            index: index type, ``"flat"`` (exact L2, ``faiss.IndexFlatL2``) or ``"ivf"``
                (``"ivfpq"`` is the older name of the same): IVF candidates in the layout
                ``layout`` (:data:`patchsearch.ivf.LAYOUTS`) re-ranked with exact L2.
            nlist, pq_m, pq_bits, nprobe, rerank: IVF parameters; those not given are
                chosen by :func:`patchsearch.ivf.auto_params`, and nprobe is then tuned to
                the smallest value whose recall@9 reaches ``target_recall``.
            layout: IVF code layout (``"rabitqfs"``, ``"rabitq"``, ``"pqfs"``,
                ``"opq-pqfs"``, ``"pq"``); None = :func:`patchsearch.ivf.choose_layout`.
            target_recall: recall@9 that nprobe is tuned to on ``recall_queries``
                (default :data:`patchsearch.ivf.TARGET_RECALL`, 0.97).
            recall_queries: float32 (n, d) held-aside patches for measuring IVF
                recall@9 (default: min(1000, M / 10) seeded bank rows held aside, left
                out of the exact and IVF neighbours while measuring:
                :func:`patchsearch.ivf.held_aside_recall`).
            support_sets: precompute N_b(m) for every bank row (the bank's exact kNN
                graph, O(M^2 d)) so that a query needs one search instead of two (Eq. 7).
                ``"auto"`` or True: only for flat indexes where M^2 d <=
                :data:`SUPPORT_GRAPH_MAX_FLOPS` (never for IVF); ``"always"``: every
                index; False: never. Without them :meth:`support_sets` searches N_b(m*)
                exactly at query time (same result).
            b: support-set size.
            seed: seeds the IVF-PQ training sample and k-means.
            sources, images: where each bank row came from (see :class:`MemoryBank`).
            manifest: build metadata for the manifest (category, backbone, geometry, ...).
            device: where the index searches (and :meth:`query` embeds): ``"cpu"``,
                ``"cuda"`` (every GPU), ``"cuda:N"`` or ``"auto"`` (cuda where torch or
                faiss-gpu sees a GPU); None: the ``gpu`` rule. A runtime choice: nothing
                of it is written into the index (:mod:`patchsearch.device`).
            gpu: another form of ``device``: True = ``"cuda"``, False = ``"cpu"``; with
                neither, ``"cuda"`` where faiss-gpu sees a GPU, else ``"cpu"`` (this
                default imports no torch).
            exact: how flat search finds its exact neighbours: ``"fp32"`` (also
                ``"faiss"``: ``faiss.IndexFlatL2`` only, on the GPUs where faiss-gpu sees
                them), ``"bf16"`` or ``"int8"`` (CPU only: reduced-precision candidates on
                the CPU's matrix units, re-ranked in fp32 with a completeness check per
                query and an fp32 fallback, :class:`patchsearch.lowp.LowpSearcher`; needs
                torch; its codes are built on the first search, not on load), ``"torch"``
                (:class:`patchsearch.torch_search.TorchSearcher`: exact search in torch on
                ``device``, the bank copied there on load) or ``"auto"``: on the CPU the
                kind :func:`patchsearch.lowp.choose` measured faster for this CPU and bank
                size, else fp32; on a CUDA device FAISS GPU shards, or torch without
                faiss-gpu. Results are the same exact neighbours either way; the kind
                chosen is :attr:`precision`.
            precision: candidate precision of the torch search (``"fp32"``, ``"tf32"``,
                ``"bf16"``, ``"fp16"``; results stay exact: :mod:`patchsearch.torch_search`).

        Raises:
            InputError: not a non-empty 2-D float array, NaN/inf values, bad shard count,
                index type or IVF-PQ parameters; a bad ``device``/``exact``/``precision``,
                or ``device`` naming a GPU that is not there.
        """
        bank = check_embeddings(bank)
        searchers.check_index_type(index)
        params = {}
        if searchers.reranked(index):
            params = ivf.auto_params(len(bank), bank.shape[1], nlist, pq_m, pq_bits, nprobe, rerank, layout)
            built = ivf.build_shards(bank, shards, params, seed=seed)
        else:
            built = searchers.build_flat_shards(bank, shards)
        man = Manifest(embedding_dim=int(bank.shape[1]), memory_bank={"file": BANK_FILE, "size": len(bank)},
                       index={"type": index, "metric": "L2", "params": params}, **(manifest or {}))
        out = cls(MemoryBank(bank, sources, images), built, man, gpu=gpu, exact=exact, device=device,
                  precision=precision)
        if out.reranked:
            man.index["params"] = ivf.tune_nprobe(out.searcher, recall_queries, target_recall, tune=nprobe is None,
                                                  seed=seed)
        if support_sets not in (True, False, "auto", "always"):
            raise InputError(f"support_sets must be True, False, 'auto' or 'always', got {support_sets!r}")
        cheap = not out.reranked and float(len(bank)) ** 2 * bank.shape[1] <= SUPPORT_GRAPH_MAX_FLOPS
        if support_sets == "always" or (support_sets in (True, "auto") and cheap):
            # on a device: the index's own exact searcher (no second copy of the bank there)
            on_device = out.device != "cpu" and index == "flat" and \
                (out._sharded.on_gpu or device_search.resident(out) == "torch")
            exact_searcher = out.searcher if on_device else searchers.KnnSearcher(bank)
            out.memory_bank.support = exact_support_sets(bank, exact_searcher, b)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, gpu: bool | None = None, nprobe: int | None = None,
             exact: str = "auto", backbone: str | None = None, embed_dim: int | None = None,
             device: str | None = None, precision: str = "fp32") -> "PatchIndex":
        """Open the current version of an index directory.

        The version is leased (:func:`patchsearch.versions.open_version`): a rebuild
        installing a newer version meanwhile neither mixes files of two versions into
        this load nor removes this version while the returned index is open.

        Args:
            path: the index directory (``<index-dir>/<category>``).
            device, gpu: where it searches and embeds (see :meth:`from_embeddings`);
                any device, whatever device built the index.
            nprobe: IVF-PQ query-time override of the stored nprobe.
            exact, precision: see :meth:`from_embeddings`.
            backbone, embed_dim: if given, the index must have been built with them.

        Raises:
            IndexFormatError: no index, unknown format version, missing, truncated or
                inconsistent files, or another backbone / embedding dimension than asked.
        """
        path = Path(path)
        for attempt in range(5):
            lease = open_version(path)
            try:
                out = cls._read(lease, path, gpu, exact, device, precision)
                break
            except (IndexFormatError, FileNotFoundError):
                lease.release()
                if attempt == 4 or lease.version is None or current_version(path) == lease.version:
                    raise  # not a version replaced under us: a real error
        out.path = path
        out._expect(backbone, embed_dim)
        if nprobe is not None:
            out.set_nprobe(nprobe)
        return out

    @classmethod
    def _read(cls, lease: Lease, shown: Path, gpu, exact, device=None, precision="fp32") -> "PatchIndex":
        base = lease.path
        man = read_manifest(base, shown)
        try:
            check_sizes(base, man)
            images = None
            if man.store and man.store.get("files"):
                from .store import read_image_paths

                images = read_image_paths(base, man.store.get("partitions"))
            bank = read_bank(base / man.memory_bank["file"], images)
            dim = man.embedding_dim
            if bank.embeddings.shape != (man.memory_bank["size"], dim):
                raise IndexFormatError(f"{base / man.memory_bank['file']}: memory bank is {bank.embeddings.shape}, "
                                       f"manifest says ({man.memory_bank['size']}, {dim})")
            shards = [searchers.read_shard(base / s["file"], dim, s["stop"] - s["start"]) for s in man.index["shards"]]
        except KeyError as exc:
            raise IndexFormatError(f"{shown}: incomplete manifest (no {exc})") from None
        return cls(bank, shards, man, gpu=gpu, exact=exact, lease=lease, device=device, precision=precision)

    def _expect(self, backbone: str | None, embed_dim: int | None) -> None:
        built = (self.manifest.backbone or {}).get("name")
        where = f"the index at {self.path}" if self.path else "the index"
        if backbone is not None and built != backbone:
            raise IndexFormatError(f"{where} was built with backbone {built}, not {backbone}: "
                                   f"rebuild it with --backbone {backbone} or query without --backbone")
        if embed_dim is not None and embed_dim != self.dim:
            raise IndexFormatError(f"{where} holds {self.dim}-d embeddings, not {embed_dim}-d")

    def write(self, directory: str | os.PathLike) -> None:
        """Write shards, memory bank and manifest into ``directory`` (a version being built)."""
        directory = Path(directory)
        names = searchers.write_shards(self._sharded.cpu_shards, directory)
        write_bank(directory / BANK_FILE, self.memory_bank)
        ends = np.cumsum([int(s.ntotal) for s in self._sharded.cpu_shards]).tolist()  # IVF adds go to the last shard
        bounds = list(zip([0] + ends[:-1], ends))
        support = self.memory_bank.support
        self.manifest.memory_bank = {"file": BANK_FILE, "size": self.size,
                                     "support_b": None if support is None else int(support.shape[1])}
        self.manifest.index.update({
            "shards": [{"file": n, "start": a, "stop": b} for n, (a, b) in zip(names, bounds)],
            "bytes_per_vector": round(sum((directory / n).stat().st_size for n in names) / self.size, 2)})
        self.manifest.versions = package_versions()
        write_manifest(directory, self.manifest)

    def save(self, path: str | os.PathLike) -> None:
        """Install this index as a new version of the index directory ``path``
        (crash-safe: :func:`patchsearch.versions.new_version`)."""
        with new_version(path) as tmp:
            self.write(tmp)
        self.path = Path(path)

    def close(self) -> None:
        """Release this index's lease on its version (writers may then remove it)."""
        if self._lease is not None:
            self._lease.release()

    # properties ---------------------------------------------------------------------
    @property
    def version(self) -> str | None:
        """The version of the index directory this index was loaded from (e.g. ``v000042``)."""
        return None if self._lease is None else self._lease.version

    @property
    def directory(self) -> Path | None:
        """The version directory this index was loaded from (its files), or None."""
        return None if self._lease is None else self._lease.path

    @property
    def bank(self) -> np.ndarray:
        """float32 (M, d) memory-bank embeddings."""
        return self.memory_bank.embeddings

    @property
    def support(self) -> np.ndarray | None:
        """int64 (M, b) precomputed support sets, or None."""
        return self.memory_bank.support

    @property
    def dim(self) -> int:
        return self.memory_bank.dim

    @property
    def size(self) -> int:
        return self.memory_bank.size

    @property
    def shards(self) -> list:
        """The CPU FAISS shards."""
        return self._sharded.cpu_shards

    @property
    def index_type(self) -> str:
        """``"flat"``, or the IVF name it was built with (``"ivf"``, or ``"ivfpq"`` as before)."""
        return self.manifest.index.get("type") or ("ivf" if self.reranked else "flat")

    @property
    def params(self) -> dict:
        """IVF parameters (layout, nlist, nprobe, rerank, ...) and measured recall ({} for flat)."""
        return self.searcher.params if isinstance(self.searcher, ivf.IVFPQSearcher) else {}

    @property
    def meta(self) -> dict:
        """Deprecated alias: the manifest as a dict (use :attr:`manifest`)."""
        return self.manifest.to_dict()

    def set_nprobe(self, nprobe: int) -> None:
        """IVF-PQ: inverted lists visited per query (a query-time override).

        Raises:
            InputError: not an IVF-PQ index, or nprobe outside [1, nlist].
        """
        if not isinstance(self.searcher, ivf.IVFPQSearcher):
            raise InputError("--nprobe applies to IVF indexes only (this index is flat)")
        self.searcher.set_nprobe(nprobe)

    # search -------------------------------------------------------------------------
    def knn(self, queries: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
        """k nearest memory-bank rows: (L2 distances float32 (n, k), rows int64 (n, k)).

        Flat: exact. IVF: the ``rerank * k`` candidates re-ranked with exact L2 (the
        distances are the exact L2 of the rows returned; code distances with rerank 0),
        rows -1 and distance inf where fewer than k candidates were found (:meth:`search`
        searches those patches exactly).

        Raises:
            InputError: not (n, d), NaN/inf values, k outside [1, M].
        """
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InputError(f"queries must be (n, {self.dim}), got {queries.shape}")
        if not 1 <= k <= self.size:
            raise InputError(f"k={k} must be between 1 and the memory-bank size {self.size}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        check_finite(queries, "query embeddings")
        d2, rows = self.searcher.search(queries, k)
        dist = np.sqrt(np.maximum(d2, 0.0))
        dist[rows < 0] = np.inf  # no neighbour: FAISS fast-scan shards leave a finite code distance there
        return dist, rows

    def support_sets(self, rows: np.ndarray, b: int = B) -> np.ndarray:
        """N_b(m) for memory-bank rows m (Eq. 7): int64 (n, min(b, M)), m itself first, then
        its nearest other bank rows by increasing L2.

        From the precomputed support sets when the index has them (same b); else by one
        exact search of the bank for the rows not in a small LRU cache (keyed by bank row,
        :data:`SUPPORT_CACHE` entries): the index's own searcher where it is exact (flat),
        ``faiss.knn`` over the memory bank for IVF indexes, so N_b stays exact.

        Raises:
            InputError: a row outside [0, M).
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.size):
            raise InputError(f"memory-bank rows must be in [0, {self.size}), got {rows.min()}..{rows.max()}")
        b = min(b, self.size)
        if self.support is not None and self.support.shape[1] == b:
            return np.asarray(self.support[rows])
        out = np.empty((len(rows), b), np.int64)
        with self._support_lock:
            hit = [self._support_cache.get((int(r), b)) for r in rows]
            for r, h in zip(rows, hit):
                if h is not None:
                    self._support_cache.move_to_end((int(r), b))
        todo = np.array([i for i, h in enumerate(hit) if h is None], np.int64)
        for i, h in enumerate(hit):
            if h is not None:
                out[i] = h
        if todo.size:
            need = np.unique(rows[todo])
            _, nn = self._exact().search(np.asarray(self.bank[need]), min(b + 1, self.size))
            found = support_from_neighbours(need, nn, b)
            out[todo] = found[np.searchsorted(need, rows[todo])]
            with self._support_lock:
                for r, sup in zip(need, found):
                    self._support_cache[(int(r), b)] = sup
                while len(self._support_cache) > SUPPORT_CACHE:
                    self._support_cache.popitem(last=False)
        return out

    def _exact(self):
        """An exact searcher over the memory bank: the index's own for flat, else ``faiss.knn``."""
        if not self.reranked:
            return self.searcher
        if self._exact_bank is None:
            self._exact_bank = searchers.KnnSearcher(self.bank)
        return self._exact_bank

    def search(self, patches: np.ndarray, k: int = K, b: int = B) -> SearchResult:
        """Search the patch embeddings of N images.

        Args:
            patches: float32 (N, P, d) patch embeddings: numpy, or a torch tensor (on an
                index searching on a GPU it stays there: k-NN and Eq. 7 run on the device
                and only the results come back, :func:`patchsearch.device_search.search_tensor`).
            k: neighbours reported per patch (1 <= k <= M).
            b: support-set size of Eq. 7 (clipped to M).

        Returns:
            :class:`SearchResult` with distances, locations, image scores and top patches.

        Raises:
            InputError: wrong shape or dimension, NaN/inf values, k outside [1, M].
        """
        if device_search.is_tensor(patches):
            return device_search.search_tensor(self, patches, k, b)
        patches = np.asarray(patches)
        if patches.ndim != 3 or patches.shape[2] != self.dim or patches.shape[1] == 0:
            raise InputError(f"patches must be (N, P, {self.dim}), got {patches.shape}")
        n, p, d = patches.shape
        dist, loc = self.knn(patches.reshape(n * p, d), k)
        missing = np.nonzero((loc < 0).any(axis=1))[0]
        if missing.size:  # fewer than k candidates (IVF): search those patches exactly, so no -1 is m*
            d2, r = self._exact().search(patches.reshape(n * p, d)[missing], k)
            dist[missing], loc[missing] = np.sqrt(np.maximum(d2, 0.0)), r
        dist, loc = dist.reshape(n, p, k), loc.reshape(n, p, k)
        top = dist[..., 0].argmax(axis=1)
        ar = np.arange(n)
        support = self.support_sets(loc[ar, top, 0], b) if n else np.empty((0, 1), np.int64)
        scores = reweighted_scores(patches[ar, top], dist[ar, top, 0], support, self.bank)
        return SearchResult(dist, loc, scores, top.astype(np.int64))

    def describe_locations(self, rows) -> list[dict]:
        """Training patch behind each memory-bank row: [{"bank_row", "image", "tile", "row", "col"}].

        (tile, row, col) is a cell of the backbone input's patch grid (of the turned frame
        for a frame :meth:`~patchsearch.geometry.Geometry.turned`); :func:`patchsearch.report.patch_box`
        gives its box on the original frame."""
        return self.memory_bank.describe(rows)
