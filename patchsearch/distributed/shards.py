"""A memory bank served by Ray shard actors: search fans out, the top k is merged exactly.

Each :class:`ShardActor` loads one shard file of an index version (``shard_NNN.faiss``) and
the memory-bank rows of its range [start, stop) (flat shards: contiguous rows, local ids;
IVF shards: the same range, bank-row ids), with their precomputed support sets. A search
sends the queries to every actor and merges their sorted lists with
``faiss.merge_knn_results`` (the merge ``faiss.IndexShards`` runs, same tie rule), so a flat
index answers exactly what a local :class:`~patchsearch.searchers.ShardedSearcher` answers.
IVF (every layout, whether the manifest says ``ivf`` or ``ivfpq``:
:func:`patchsearch.searchers.reranked` decides, as for the local index): the ``rerank * k``
code-distance candidates are merged the same way, then each actor computes
the exact squared L2 of the candidates it holds (:func:`patchsearch.searchers.rerank`) and
those lists are merged to the exact top k. Eq. 7's support sets and the bank rows it
needs come from the actors that hold them; the bank never travels to the caller.

Faults: an actor that dies is restarted by Ray from its shard file (``max_restarts``).
A query in flight when it died gets :class:`ShardUnavailableError` (never a partial answer);
queries sent while it restarts wait for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import DistributedError, cluster_gpus, connect
from ..bank import B, MemoryBank, read_bank
from ..errors import PatchsearchError
from ..format import check_sizes, read_manifest
from ..index import PatchIndex
from ..ivf import sharded_searcher
from ..searchers import ShardedSearcher, faiss, read_shard, rerank, reranked
from ..versions import open_version


class ShardUnavailableError(DistributedError):
    """A shard actor died while answering (Ray restarts it from its shard file: retry)."""


class ShardActor:
    """One shard of an index version and its memory-bank rows, in one Ray actor process.

    Args:
        version_dir: the version directory (``<index-dir>/<category>/vNNNNNN``), on storage
            this node mounts.
        shard: the shard's number in the manifest.
        nprobe: IVF override of the stored nprobe.

    Raises:
        IndexFormatError: missing or inconsistent files.
    """

    def __init__(self, version_dir: str, shard: int, nprobe: int | None = None):
        base = Path(version_dir)
        man = read_manifest(base)
        entry = man.index["shards"][shard]
        self.start, self.stop = int(entry["start"]), int(entry["stop"])
        index = read_shard(base / entry["file"], man.embedding_dim, self.stop - self.start)
        reranked(man.index.get("type"), index, str(base / entry["file"]))  # manifest and shard file agree
        self.searcher = sharded_searcher([index]) if faiss().try_extract_index_ivf(index) is not None \
            else ShardedSearcher([index])
        self.is_ivf = self.searcher.is_ivf
        if self.is_ivf:
            for placed in self.searcher.placed:  # as IVFPQSearcher.set_nprobe (CPU or GPU shard)
                ivf = faiss().try_extract_index_ivf(placed)
                (ivf if ivf is not None else placed).nprobe = int(nprobe or man.index["params"]["nprobe"])
        bank = read_bank(base / man.memory_bank["file"])  # memory-mapped: only this range is read
        self.rows = np.array(bank.embeddings[self.start:self.stop])
        self.support = None if bank.support is None else np.array(bank.support[self.start:self.stop])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 float32 (n, k), bank rows int64 (n, k)), nearest first; -1 rows (float
        max distance) where the shard has fewer than k (IVF: PQ distances)."""
        d2, ids = self.searcher.search(queries, k)
        if not self.is_ivf:
            ids = np.where(ids >= 0, ids + self.start, -1)
        return d2, ids

    def exact(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact squared L2 top k among the candidate bank rows (n, c) this shard holds
        (:func:`patchsearch.searchers.rerank`); -1 rows where it holds fewer than k."""
        own = (candidates >= self.start) & (candidates < self.stop)
        order = np.argsort(~own, axis=1, kind="stable")  # owned first, in candidate order
        local = np.where(own, candidates - self.start, -1)
        local = np.take_along_axis(local, order, axis=1)
        d2, ids = rerank(queries, self.rows, local, k)
        return d2, np.where(ids >= 0, ids + self.start, -1)

    def brute_force(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact squared L2 top k over all the bank rows this shard holds (``faiss.knn``),
        whatever the index type; -1 rows (float max distance) where it holds fewer than k."""
        n, kk = len(queries), min(k, len(self.rows))
        d2 = np.full((n, k), np.finfo(np.float32).max, np.float32)
        ids = np.full((n, k), -1, np.int64)
        d2[:, :kk], found = faiss().knn(np.ascontiguousarray(queries, dtype=np.float32), self.rows, kk)
        ids[:, :kk] = np.where(found >= 0, found + self.start, -1)
        return d2, ids

    def embeddings(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), d) bank rows (all in this shard's range)."""
        return self.rows[np.asarray(rows) - self.start]

    def support_sets(self, rows: np.ndarray) -> np.ndarray | None:
        """int64 (len(rows), b) precomputed support sets of these bank rows, or None."""
        return None if self.support is None else self.support[np.asarray(rows) - self.start]

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """The Ray node id this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()


class RemoteShardedSearcher:
    """:class:`~patchsearch.searchers.Searcher` over shard actors: ``search(queries float32
    (n, d), k) -> (squared L2 float32 (n, k), bank rows int64 (n, k))``, equal to a local
    ``faiss.IndexShards`` search over the same shard files (flat), or to the local IVF
    search with exact re-ranking (:class:`patchsearch.ivf.IVFPQSearcher`).

    Args:
        actors: one :class:`ShardActor` handle per shard, in shard order.
        bounds: [start, stop) bank rows of each.
        params: IVF parameters (with ``rerank``: candidates re-ranked exactly, 0 = code
            distances) where :func:`patchsearch.searchers.reranked`, {} for flat.
        where: the index directory, for messages.
    """

    def __init__(self, actors: list, bounds: list[tuple[int, int]], params: dict, where: str):
        self.actors, self.bounds, self.params, self.where = actors, bounds, dict(params), where
        self.size = bounds[-1][1]

    def _get(self, refs: list, what: str):
        ray = connect(None)
        from ray.exceptions import RayActorError

        try:
            return ray.get(refs)
        except RayActorError as exc:
            cause = getattr(exc.args[0] if exc.args else None, "cause", None)
            if getattr(exc, "actor_init_failed", False) and isinstance(cause, PatchsearchError):
                raise cause from None  # a shard that cannot load (IndexFormatError): its reason, not "retry"
            dead = []
            for i, ref in enumerate(refs):
                try:
                    ray.get(ref)
                except RayActorError:
                    dead.append(i)
            names = ", ".join(f"{i} (rows {self.bounds[i][0]}..{self.bounds[i][1] - 1})" for i in dead)
            raise ShardUnavailableError(f"{self.where}: shard {names} died during {what}; Ray restarts it from "
                                        f"its shard file: retry") from None

    def _merge(self, parts: list) -> tuple[np.ndarray, np.ndarray]:
        d2 = np.ascontiguousarray(np.stack([p[0] for p in parts]), dtype=np.float32)
        ids = np.ascontiguousarray(np.stack([p[1] for p in parts]), dtype=np.int64)
        return faiss().merge_knn_results(d2, ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ray = connect(None)
        q = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        rr = self.params.get("rerank", 0) if self.params else 0
        c = min(self.size, k * rr) if rr > 0 else k
        d2, ids = self._merge(self._get([a.search.remote(q, c) for a in self.actors], "a search"))
        if rr <= 0:  # flat (exact), or IVF asked for code distances; else re-rank, also when c == k
            return d2, ids
        cand = ray.put(ids)
        return self._merge(self._get([a.exact.remote(q, cand, k) for a in self.actors], "re-ranking"))

    def exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest bank rows of every index type: each actor's brute force over its
        rows (:meth:`ShardActor.brute_force`), merged; as ``faiss.knn`` over the whole bank."""
        ray = connect(None)
        q = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        return self._merge(self._get([a.brute_force.remote(q, k) for a in self.actors], "an exact search"))

    def embeddings(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), d) bank rows, each fetched from the actor that holds it."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        starts = np.array([a for a, _ in self.bounds])
        owner = np.searchsorted(starts, rows, side="right") - 1
        parts = {int(s): np.nonzero(owner == s)[0] for s in np.unique(owner)}
        got = self._get([self.actors[s].embeddings.remote(rows[sel]) for s, sel in parts.items()], "a row fetch")
        out = np.empty((len(rows), got[0].shape[1]), np.float32) if got else np.empty((0, 0), np.float32)
        for sel, emb in zip(parts.values(), got):
            out[sel] = emb
        return out

    def support_sets(self, rows: np.ndarray) -> np.ndarray | None:
        """int64 (len(rows), b) precomputed support sets from the actors, or None."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        starts = np.array([a for a, _ in self.bounds])
        owner = np.searchsorted(starts, rows, side="right") - 1
        parts = {int(s): np.nonzero(owner == s)[0] for s in np.unique(owner)}
        got = self._get([self.actors[s].support_sets.remote(rows[sel]) for s, sel in parts.items()],
                        "a support-set fetch")
        if not got or any(g is None for g in got):
            return None
        out = np.empty((len(rows), got[0].shape[1]), np.int64)
        for sel, sup in zip(parts.values(), got):
            out[sel] = sup
        return out


class _RemoteRows:
    """Array-like (M, d) memory bank whose rows are fetched from the shard actors on
    indexing with an integer array (of any shape): what Eq. 7 needs, never the whole bank."""

    def __init__(self, searcher: RemoteShardedSearcher, dim: int):
        self.searcher, self.shape, self.dtype, self.ndim = searcher, (searcher.size, dim), np.dtype(np.float32), 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        key = np.asarray(key, dtype=np.int64)
        if key.ndim == 0:
            return self.searcher.embeddings(key.reshape(1))[0]
        return self.searcher.embeddings(key).reshape(*key.shape, self.shape[1])


class _ExactSearch:
    """:class:`~patchsearch.searchers.Searcher` of the exact search over the shard actors."""

    def __init__(self, searcher: RemoteShardedSearcher):
        self.search = searcher.exact_search


class RemotePatchIndex(PatchIndex):
    """:class:`~patchsearch.index.PatchIndex` whose shards and memory-bank rows live in Ray
    shard actors (one per shard file; a GPU each where the cluster has GPUs).

    ``knn``, ``support_sets``, ``search`` (Eq. 7) and ``query`` answer as the local index
    loaded from the same directory (flat: identical rows and distances); the caller holds
    only the manifest and each bank row's source (image, tile, row, col).

    Args:
        path: the index directory; its current version is leased until :meth:`close`.
        address: the Ray cluster (:func:`patchsearch.distributed.connect`).
        nprobe: IVF override of the stored nprobe.
        max_restarts: restarts of a dead shard actor (-1: always).
        num_cpus: CPUs each shard actor reserves.

    Raises:
        IndexFormatError: no index, damaged files.
        DistributedError: Ray missing or unreachable.
    """

    def __init__(self, path: str | os.PathLike, address: str | None = "auto", nprobe: int | None = None,
                 max_restarts: int = -1, num_cpus: float = 1):
        ray = connect(address)
        path = Path(path)
        lease = open_version(path)
        actors = []
        try:
            man = read_manifest(lease.path, path)
            check_sizes(lease.path, man)
            images = None
            if man.store and man.store.get("files"):
                from ..store import read_image_paths

                images = read_image_paths(lease.path, man.store.get("partitions"))
            local = read_bank(lease.path / man.memory_bank["file"], images)  # memory-mapped: sources only
            sources = None if local.sources is None else {k: np.array(v) for k, v in local.sources.items()}
            del local
            bounds = [(int(s["start"]), int(s["stop"])) for s in man.index["shards"]]
            approximate = reranked(man.index.get("type"), where=str(path))  # each actor checks its shard file
            params = (man.index.get("params") or {}) if approximate else {}
            if nprobe is not None:
                if not params or not 1 <= nprobe <= params["nlist"]:
                    raise DistributedError(f"--nprobe {nprobe} applies to IVF indexes, between 1 and nlist")
                params = {**params, "nprobe": int(nprobe)}
            actor = ray.remote(ShardActor).options(num_cpus=num_cpus, num_gpus=1 if cluster_gpus(ray) else 0,
                                                   max_restarts=max_restarts, max_task_retries=0)
            actors = [actor.remote(str(lease.path), i, params.get("nprobe")) for i in range(len(bounds))]
            self._actors = actors
            searcher = RemoteShardedSearcher(actors, bounds, params, str(path))
            searcher._get([a.pid.remote() for a in actors], "loading")  # fail here if a shard cannot load
        except BaseException:
            for a in actors:  # the shards that did load must not stay behind, holding CPUs
                ray.kill(a, no_restart=True)
            lease.release()
            raise
        self.manifest, self.path, self._lease, self.searcher = man, path, lease, searcher
        self.reranked = approximate
        self._init_search_state()
        self._support_b = (man.memory_bank or {}).get("support_b")
        self.memory_bank = MemoryBank(_RemoteRows(searcher, man.embedding_dim), sources, images)

    def support_sets(self, rows: np.ndarray, b: int = B) -> np.ndarray:
        """N_b(m) of bank rows m (see :meth:`PatchIndex.support_sets`), from the actors'
        precomputed support sets where they have this b, else as the local index computes
        them (cached; an exact search of the rows fetched from the actors, :meth:`_exact`)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        inside = not rows.size or (rows.min() >= 0 and rows.max() < self.size)  # else the InputError below
        if inside and self._support_b == min(b, self.size):
            got = self.searcher.support_sets(rows)
            if got is not None:
                return got
        return super().support_sets(rows, b)

    def _exact(self):
        """An exact searcher over the memory bank: the flat shards' own fan-out, or for IVF
        the actors' brute force over their rows (:meth:`RemoteShardedSearcher.exact_search`),
        as the local index (:meth:`PatchIndex._exact`): N_b(m*) and the patches with fewer
        than k IVF candidates stay exact."""
        return _ExactSearch(self.searcher) if self.reranked else self.searcher

    @property
    def shards(self) -> list:
        """The shard actor handles."""
        return list(self._actors)

    @property
    def params(self) -> dict:
        return dict(self.searcher.params)

    def set_nprobe(self, nprobe: int) -> None:
        raise DistributedError("set nprobe when opening a RemotePatchIndex (nprobe=...)")

    def write(self, directory) -> None:
        raise DistributedError("a RemotePatchIndex serves an index version; it does not write one")

    def close(self) -> None:
        """Stop the shard actors and release the lease on the version."""
        ray = connect(None)
        for a in getattr(self, "_actors", []):
            ray.kill(a, no_restart=True)
        self._actors = []
        super().close()
