"""patchsearch: FAISS-backed similarity search for PatchCore anomaly detection.

Library entry points (``import patchsearch`` and searching embeddings need no torch)::

    from patchsearch import PatchIndex, kcenter_greedy
    index = PatchIndex.from_embeddings(bank, shards=2)     # bank: float32 (M, d)
    res = index.search(patches, k=9)                       # patches: float32 (N, P, d)
    index = PatchIndex.load("indexes/bottle")
    res = patchsearch.query(index, ["img.png"])            # + anomaly_maps (N, H, W)
    new = patchsearch.add_images(index, ["good.png"])      # a new index version

:func:`query`, :func:`iter_query`, :func:`add_images` and :func:`remove_images` are thin
wrappers that import their module (and torch) on first call, so ``import patchsearch``
stays light and the index layer imports nothing that embeds frames.
"""

from .coreset import covering_radius, kcenter_greedy
from .errors import IndexFormatError, InputError, PatchsearchError, WeightsUnavailableError
from .index import PatchIndex
from .result import SearchResult

__all__ = ["PatchIndex", "SearchResult", "kcenter_greedy", "covering_radius", "PatchsearchError",
           "InputError", "IndexFormatError", "WeightsUnavailableError", "query", "iter_query",
           "add_images", "remove_images"]
__version__ = "0.2.0"


def query(index, images, **kwargs):
    """Embed and search frames with the backbone ``index`` was built with: see
    :func:`patchsearch.query.query` (arguments, shapes, errors)."""
    from .query import query as run

    return run(index, images, **kwargs)


def iter_query(index, images, **kwargs):
    """One :class:`SearchResult` per batch of frames (bounded memory): see
    :func:`patchsearch.query.iter_query`."""
    from .query import iter_query as run

    return run(index, images, **kwargs)


def add_images(index, paths, **kwargs):
    """Add good frames to an index directory (or a loaded :class:`PatchIndex`'s) without a
    rebuild; returns the new version: see :func:`patchsearch.update.add_images`."""
    from .update import add_images as run

    return run(index, paths, **kwargs)


def remove_images(index, paths, **kwargs):
    """Take frames back out of an index directory (or a loaded :class:`PatchIndex`'s);
    returns the new version: see :func:`patchsearch.update.remove_images`."""
    from .update import remove_images as run

    return run(index, paths, **kwargs)
