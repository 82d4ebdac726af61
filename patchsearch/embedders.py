"""The backbone an index embeds frames with, loaded once and shared.

An index records its backbone (``manifest.backbone``: name, layers, weights, reduced
dimension, input normalisation); :func:`embedder_for` loads the matching
:class:`~patchsearch.features.PatchEmbedder` and keeps it on the index
(:attr:`PatchIndex.embedder <patchsearch.index.PatchIndex.embedder>`); an
:class:`EmbedderCache` shares one embedder between indexes with equal
:func:`embedder_key` (a service holding many categories loads each backbone once).
torch is imported only when an embedder is loaded.
"""

from __future__ import annotations

from .device import move_module
from .errors import IndexFormatError
from .index import PatchIndex


class EmbedderCache(dict):
    """Loaded embedders by :func:`embedder_key` ({key: PatchEmbedder}); pass it as
    ``cache=`` to :func:`embedder_for`, or call :meth:`get_for`."""

    def get_for(self, index: PatchIndex, weights: str | None = None):
        """:func:`embedder_for` ``index`` through this cache."""
        return embedder_for(index, weights, cache=self)


def embedder_key(index: PatchIndex) -> tuple | None:
    """What identifies the embedder ``index`` needs: (backbone name, layers, weights source,
    weights SHA-256, reduced dimension or None, input normalisation); None for an index
    without a backbone. Indexes with equal keys can share one embedder (and one backbone batch)."""
    bb = index.manifest.backbone
    if not bb:
        return None
    weights = bb.get("weights") or {}
    norm = input_norm_of(bb)
    return (bb["name"], tuple(bb["layers"]), weights.get("source"), weights.get("sha256"),
            bb["embed_dim"] if bb.get("reduced") else None, tuple(norm["mean"]), tuple(norm["std"]))


def input_norm_of(backbone: dict) -> dict:
    """The input normalisation a manifest's ``backbone`` record was built with: its
    ``input_norm``, or ImageNet's for indexes built before it was recorded (which fed
    every backbone ImageNet-normalised frames); :attr:`Manifest.input_norm
    <patchsearch.format.Manifest.input_norm>` of a whole manifest."""
    from .frameinfo import IMAGENET_NORM

    return backbone.get("input_norm") or IMAGENET_NORM


def embedder_for(index: PatchIndex, weights: str | None = None, cache: dict | None = None):
    """The :class:`~patchsearch.features.PatchEmbedder` ``index`` was built with (cached on it).

    One made here is put on the index's device (:attr:`PatchIndex.device`); one from
    ``cache`` or set on the index stays where it is (its owner placed it).

    Args:
        weights: the state-dict file, for an index built with ``--weights`` (the
            manifest records its name and SHA-256, not a path on the build machine).
        cache: optional {:func:`embedder_key`: embedder} shared by several indexes (a
            service holding many categories loads each backbone once); filled here.

    Raises:
        IndexFormatError: the index records no backbone, its weights file is needed and
            not given, or the weights differ from those it was built with.
    """
    cached = index.embedder
    if cached is not None:
        return cached
    from .features import PatchEmbedder

    bb = index.manifest.backbone
    if not bb:
        raise IndexFormatError("this index was built from raw embeddings and records no backbone: "
                               "use search() with patch embeddings")
    recorded = bb.get("weights") or {}
    if str(recorded.get("source", "")).startswith("file:") and weights is None:
        raise IndexFormatError(f"the index was built with the weights file {recorded['source'][5:]} "
                               f"(SHA-256 {recorded.get('sha256')}): pass --weights PATH to that file")
    key = embedder_key(index)
    emb = cache.get(key) if cache is not None else None
    if emb is None:
        emb = move_module(PatchEmbedder(bb["name"], bb["layers"], weights,
                                        bb["embed_dim"] if bb.get("reduced") else None, input_norm_of(bb)),
                          getattr(index, "device", None))
    if emb.dim != index.dim:
        raise IndexFormatError(f"backbone {bb['name']} gives {emb.dim}-d embeddings, index holds {index.dim}-d")
    if recorded.get("sha256") and emb.weights_id.get("sha256") and recorded["sha256"] != emb.weights_id["sha256"]:
        raise IndexFormatError(f"the weights of {bb['name']} ({emb.weights_id['source']}) differ from "
                               f"those the index was built with ({recorded.get('source')})")
    index.embedder = emb
    if cache is not None:
        cache[key] = emb
    return emb
