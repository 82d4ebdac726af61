"""The index format: one version directory and its ``manifest.json``.

A version directory (see :mod:`patchsearch.versions`) holds::

    manifest.json            this module: what was built, how, and every file's size and SHA-256
    shard_NNN.faiss          FAISS shards over the memory bank       (searchers.py, ivf.py)
    memory_bank.arrow        memory bank, sources, support sets      (bank.py)
    patches-NNNNN.arrow      every raw training patch embedding      (store.py)
    images-NNNNN.arrow       one row per training image              (store.py)

:class:`Manifest` owns the schema. Format version 2 is written; version 1 manifests
(patchsearch 0.1) are read and migrated in :meth:`Manifest.from_dict`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path

from .errors import IndexFormatError
from .files import atomic_write, file_entry

MANIFEST = "manifest.json"
FORMAT = "patchsearch-index"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclasses.dataclass
class Manifest:
    """Everything recorded about one index version (``manifest.json``).

    Attributes:
        embedding_dim: d of the memory bank.
        memory_bank: {"file", "size" (rows M), "support_b" (b of the stored support sets, or None)}.
        index: {"type": "flat" | "ivf" | "ivfpq", "metric": "L2", "shards": [{"file", "start", "stop"}],
            "bytes_per_vector", "params": IVF layout, parameters and measured recall (or {})}.
        category: category name, or None.
        backbone: {"name", "layers", "layer_channels", "embed_dim", "reduced", "weights":
            {"source", "sha256"}, "input_norm": {"mean", "std"}} of the embedder, or None for an
            index built from raw embeddings (no ``input_norm``: built before it was recorded,
            ImageNet normalisation).
        geometry: how frames become backbone input (:mod:`patchsearch.data` Geometry dict), or None.
        grid: patch grid [h, w] per frame, or None.
        coreset: {"ratio", "seed", "projection_dim", "method"}, or None.
        store: {"files": [...], "partitions", "num_patches", "num_images"}, or None.
        calibration: thresholds fitted on good images only ({"image", "pixel",
            "min_region_area", "source", "images", "scores"}), or None.
        timings: seconds per build stage.
        versions: package versions at build.
        files: {file name: {"size", "sha256"}} of every other file of the version.
        created: build time, ISO 8601 UTC.
        extra: keys this patchsearch does not know (kept when rewriting).
    """

    embedding_dim: int
    memory_bank: dict
    index: dict
    category: str | None = None
    backbone: dict | None = None
    geometry: dict | None = None
    grid: list | None = None
    coreset: dict | None = None
    store: dict | None = None
    calibration: dict | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    versions: dict = dataclasses.field(default_factory=dict)
    files: dict = dataclasses.field(default_factory=dict)
    created: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def index_type(self) -> str:
        return self.index.get("type", "flat")

    @property
    def input_norm(self) -> dict | None:
        """{"mean", "std"} (RGB, of pixels scaled to 0..1) the backbone was fed: the recorded
        ``backbone["input_norm"]``, or ImageNet's for an index built before it was recorded
        (every backbone was fed ImageNet-normalised frames); None without a backbone."""
        if not self.backbone:
            return None
        from .frameinfo import IMAGENET_NORM

        return self.backbone.get("input_norm") or IMAGENET_NORM

    def frame_geometry(self):
        """The :class:`~patchsearch.geometry.Geometry` frames are turned into backbone input
        with: the recorded ``geometry``, or the default crop geometry where none is recorded."""
        from .geometry import Geometry, crop_geometry

        return Geometry.from_dict(self.geometry) if self.geometry else crop_geometry()

    def thresholds(self, threshold: float | None = None) -> tuple[float | None, float | None, int]:
        """(image threshold, pixel threshold, minimum region area in frame pixels) of the
        recorded ``calibration`` (None where uncalibrated); ``threshold`` overrides the image one."""
        cal = self.calibration or {}
        image = threshold if threshold is not None else (cal.get("image") or {}).get("threshold")
        return image, (cal.get("pixel") or {}).get("threshold"), int(cal.get("min_region_area", 0))

    def to_dict(self) -> dict:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **self.extra, **body}

    @classmethod
    def from_dict(cls, raw: dict, where: str = "manifest") -> "Manifest":
        """Parse (and migrate from version 1) a manifest dict.

        Raises:
            IndexFormatError: another format, an unknown version, or required keys missing.
        """
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise IndexFormatError(f"{where}: not a patchsearch index manifest")
        version = raw.get("format_version")
        if version not in READABLE_VERSIONS:
            raise IndexFormatError(f"{where}: index format version {version!r} is not supported (this patchsearch "
                                   f"reads versions {', '.join(map(str, READABLE_VERSIONS))}); rebuild the index")
        raw = dict(raw)
        if version == 1:
            raw = _migrate_v1(raw)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        try:
            return cls(**{k: raw[k] for k in names if k in raw},
                       extra={k: v for k, v in raw.items() if k not in names | {"format", "format_version"}})
        except TypeError as exc:
            raise IndexFormatError(f"{where}: incomplete manifest ({exc})") from None


def _migrate_v1(raw: dict) -> dict:
    """Version 1 (patchsearch 0.1): IVF-PQ parameters at top level, a single
    ``patches.arrow`` store, the weights file's absolute path in the backbone."""
    index = dict(raw.get("index") or {})
    index["params"] = raw.pop("ivfpq", None) or {}
    raw["index"] = index
    store = raw.get("store")
    if store and "file" in store:
        raw["store"] = {"files": [store["file"]], "num_patches": store.get("num_patches"),
                        "num_images": store.get("num_images"), "data_root": None}
    if raw.get("backbone"):
        backbone = dict(raw["backbone"])
        if backbone.pop("weights_path", None):  # a --weights file: keep its name, not its path
            backbone["weights"] = {**(backbone.get("weights") or {}),
                                   "source": "file:" + Path(backbone["weights"]["source"]).name}
        raw["backbone"] = backbone
    raw.pop("counts", None)
    return raw


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> None:
    """Record every other file of ``directory`` (size, SHA-256) and write ``manifest.json``
    atomically (fsynced)."""
    directory = Path(directory)
    manifest.files = {p.name: file_entry(p) for p in sorted(directory.iterdir())
                      if p.is_file() and p.name != MANIFEST}
    manifest.created = manifest.created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(directory / MANIFEST, text.encode())


def read_manifest(directory: str | os.PathLike, shown: str | os.PathLike | None = None) -> Manifest:
    """Read and check ``manifest.json`` of a version directory.

    Args:
        directory: the version directory.
        shown: the path to name in error messages (default ``directory``).

    Raises:
        IndexFormatError: missing, not JSON, another format or an unknown version.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    where = Path(shown or directory) / MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(f"no index at {shown or directory} ({MANIFEST} missing): "
                               "run 'patchsearch build' first") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{where}: not valid JSON ({exc})") from None
    return Manifest.from_dict(raw, str(where))


def check_sizes(directory: str | os.PathLike, manifest: Manifest) -> None:
    """Fast integrity check: every file the manifest lists exists with its recorded size.

    Raises:
        IndexFormatError: a file is missing or has another size (names it, and says
            whether the Arrow patch store can rebuild the index).
    """
    directory = Path(directory)
    for name, entry in manifest.files.items():
        path = directory / name
        size = path.stat().st_size if path.is_file() else None
        if size != entry["size"]:
            what = "missing" if size is None else f"{size} bytes, the manifest says {entry['size']}"
            raise IndexFormatError(f"{path}: damaged index file ({what}){_rebuild_hint(directory, manifest, name)}")


def verify(directory: str | os.PathLike) -> list[str]:
    """Full integrity check of a version directory: size and SHA-256 of every file.

    Returns:
        one line per damaged file (empty when the version is intact).

    Raises:
        IndexFormatError: no readable manifest.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    for name, entry in sorted(manifest.files.items()):
        path = directory / name
        hint = _rebuild_hint(directory, manifest, name)
        if not path.is_file():
            problems.append(f"{path}: missing{hint}")
            continue
        got = file_entry(path)
        if got["size"] != entry["size"]:
            problems.append(f"{path}: {got['size']} bytes, the manifest says {entry['size']}{hint}")
        elif got["sha256"] != entry["sha256"]:
            problems.append(f"{path}: checksum mismatch (content damaged){hint}")
    return problems


def _rebuild_hint(directory: Path, manifest: Manifest, damaged: str) -> str:
    store = (manifest.store or {}).get("files") or []
    if not store or damaged in store or any(f not in manifest.files for f in store):
        return ""
    if all((directory / f).is_file() and (directory / f).stat().st_size == manifest.files[f]["size"] for f in store):
        category = manifest.category or directory.parent.name
        return f"; its Arrow patch store is intact: 'patchsearch rebuild --category {category}' restores it"
    return ""


def package_versions() -> dict:
    """Versions of the packages an index depends on (None where not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("patchsearch", "torch", "torchvision", "numpy", "pyarrow", "faiss-cpu", "faiss-gpu"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
