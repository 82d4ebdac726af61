"""A :class:`~patchsearch.index.PatchIndex` on a device: which searcher, and the tensor path.

:func:`choose` decides at load where the search runs; :func:`search_tensor` is
:meth:`PatchIndex.search` for torch tensors: on a device-resident searcher the query
embeddings, the k-NN, the top patch and Eq. 7 stay on the device and only distances,
locations, scores and top patches come back (as numpy). Indexes searched on the CPU by
FAISS take the tensor as numpy (the same path as numpy input).

Importing this module imports neither torch nor faiss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .device import gpu_ids, is_tensor, parse_device, resolve_device  # noqa: F401  (is_tensor: for index.py)
from .errors import InputError
from .result import SearchResult

EXACT = ("auto", "fp32", "faiss", "bf16", "int8", "torch")


@dataclass
class Plan:
    """Where an index searches.

    Attributes:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (resolved).
        faiss_gpu: FAISS shards go onto the GPUs (faiss-gpu sees them).
        torch: flat search by :class:`patchsearch.torch_search.TorchSearcher` on ``device``.
        gpu_ids: GPUs the FAISS shards go to (None = all).
    """

    device: str
    faiss_gpu: bool
    torch: bool
    gpu_ids: list[int] | None


def index_device(device, gpu) -> str:
    """The resolved device of an index from ``device=`` and the older ``gpu=``.

    ``gpu=True`` is ``device="cuda"``, ``gpu=False`` is ``device="cpu"``; with neither,
    ``"cuda"`` where faiss-gpu sees a GPU, else ``"cpu"`` (without importing torch).

    Raises:
        InputError: a bad ``device`` (:func:`patchsearch.device.resolve_device`), or
            ``gpu`` contradicting it.
    """
    if device is None:
        if gpu is None:  # the older default: where faiss-gpu sees a GPU (torch not imported)
            from .searchers import num_gpus

            return "cuda" if num_gpus() else "cpu"
        device = "cuda" if gpu else "cpu"
    elif gpu is not None and bool(gpu) != (parse_device(device) != "cpu"):
        raise InputError(f"gpu={gpu!r} contradicts device={device!r}: pass device only (gpu= is its older form)")
    return resolve_device(device, "device")


def choose(device: str, exact: str, is_ivf: bool) -> Plan:
    """Which searcher an index on ``device`` (resolved) uses for ``exact``.

    * CPU: FAISS (``fp32``/``faiss``), reduced-precision candidates re-ranked exactly
      (``bf16``/``int8``, or ``auto`` where :func:`patchsearch.lowp.choose` finds them
      faster) or torch (``torch``).
    * CUDA: FAISS GPU shards where faiss-gpu sees the GPUs (``faiss``/``auto``), else
      torch exact search on the device (``torch``, or ``auto`` without faiss-gpu). IVF
      indexes without faiss-gpu search on the CPU (their layouts have no torch path);
      the backbone and the anomaly maps still run on the device.

    Raises:
        InputError: unknown ``exact``; ``bf16``/``int8`` on a CUDA device.
    """
    if exact not in EXACT:
        raise InputError(f"exact must be one of {', '.join(EXACT)}, got {exact!r}")
    if device == "cpu":
        return Plan(device, False, exact == "torch" and not is_ivf, None)
    if exact in ("bf16", "int8"):
        raise InputError(f"exact={exact!r} is a CPU search: load the index with device='cpu', not {device!r}")
    from .searchers import num_gpus

    faiss_gpu = num_gpus() > 0 and exact != "torch"
    return Plan(device, faiss_gpu, not faiss_gpu and not is_ivf and exact not in ("faiss", "fp32"), gpu_ids(device))


def resident(index) -> str | None:
    """How ``index`` searches tensors on its device: ``"torch"``, ``"faiss"`` (flat FAISS GPU
    shards), or None (the search runs on the CPU: tensors are taken as numpy)."""
    from .torch_search import TorchSearcher

    if isinstance(index.searcher, TorchSearcher):
        return "torch"
    sharded = getattr(index, "_sharded", None)  # None: an index searched elsewhere (Ray shard actors)
    if sharded is not None and sharded.on_gpu and not sharded.is_ivf:
        return "faiss"
    return None


def _check(index, patches, k: int):
    import torch

    if patches.ndim != 3 or patches.shape[2] != index.dim or patches.shape[1] == 0:
        raise InputError(f"patches must be (N, P, {index.dim}), got {tuple(patches.shape)}")
    if not 1 <= k <= index.size:
        raise InputError(f"k={k} must be between 1 and the memory-bank size {index.size}")
    bad = (~torch.isfinite(patches)).flatten(1).any(1).nonzero().flatten()
    if len(bad):
        raise InputError(f"query embeddings contain NaN or infinite values (image {int(bad[0])})")


def knn_tensor(index, queries, k: int):
    """(squared L2 float32 (n, k), rows int64 (n, k)) tensors on the device of a resident index."""
    from .gpu_placement import check_gpu_limit
    from .torch_search import faiss_knn

    if resident(index) == "torch":
        return index.searcher.search_tensor(queries, k)
    sharded = index._sharded
    check_gpu_limit("k", k)
    starts = np.cumsum([0] + [int(s.ntotal) for s in sharded.cpu_shards[:-1]]).tolist()  # flat: contiguous rows
    with sharded._gpu_lock:
        return faiss_knn(sharded.placed, starts, queries, k)


def search_tensor(index, patches, k: int, b: int) -> SearchResult:
    """:meth:`PatchIndex.search` of a float (N, P, d) torch tensor.

    On a resident index (:func:`resident`) the tensor goes to the index's device, and
    k-NN, top patch, support-set rows and Eq. 7 (float64, as
    :func:`patchsearch.score.reweighted_scores`) run there; N_b(m*) comes from
    :meth:`PatchIndex.support_sets` (precomputed, cached, or one exact search of the n
    rows m*). Otherwise the tensor is copied to the CPU and searched as numpy.

    Raises:
        InputError: wrong shape or dimension, NaN/inf values, k outside [1, M].
    """
    import torch

    from .torch_search import as_tensor, reweighted_scores

    how = resident(index)
    if how is None:
        return index.search(patches.detach().cpu().numpy(), k, b)
    dev = index.searcher.device if how == "torch" else torch.device(index.device)
    patches = as_tensor(patches.detach(), dev)
    _check(index, patches, k)
    n, p, d = patches.shape
    with torch.no_grad():
        d2, loc = knn_tensor(index, patches.reshape(n * p, d), k)
        dist = d2.clamp_min(0).sqrt().view(n, p, k)
        loc = loc.view(n, p, k)
        top = dist[..., 0].argmax(1)
        ar = torch.arange(n, device=dev)
        m_star, s_star = loc[ar, top, 0], dist[ar, top, 0]
        support = index.support_sets(m_star.cpu().numpy(), b)
        if how == "torch":
            rows = index.searcher.bank[torch.from_numpy(support).to(dev)]
        else:
            rows = as_tensor(np.asarray(index.bank)[support], dev)
        scores = reweighted_scores(patches[ar, top], s_star, rows)
        out = dist.cpu().numpy(), loc.cpu().numpy(), scores.cpu().numpy(), top.cpu().numpy().astype(np.int64)
    return SearchResult(*out)


def embed(embedder, tensor):
    """Run ``embedder`` (a torch module) on ``tensor`` moved to the embedder's device; the
    embeddings stay there."""
    from .device import module_device

    return embedder(tensor.to(module_device(embedder), non_blocking=True))
