"""patchsearch: FAISS-backed similarity search for PatchCore anomaly detection.

Library entry points (``import patchsearch`` and searching embeddings need no torch)::

    from patchsearch import PatchIndex, kcenter_greedy
    index = PatchIndex.from_embeddings(bank, shards=2)     # bank: float32 (M, d)
    res = index.search(patches, k=9)                       # patches: float32 (N, P, d)
    index = PatchIndex.load("indexes/bottle")
    res = index.query(["img.png"])                         # + anomaly_maps (N, H, W)
"""

from .coreset import covering_radius, kcenter_greedy
from .errors import IndexFormatError, InputError, PatchsearchError, WeightsUnavailableError
from .index import PatchIndex
from .result import SearchResult

__all__ = ["PatchIndex", "SearchResult", "kcenter_greedy", "covering_radius", "PatchsearchError",
           "InputError", "IndexFormatError", "WeightsUnavailableError"]
__version__ = "0.2.0"
