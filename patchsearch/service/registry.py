"""The categories a service answers for: loaded index versions, hot reload, batched inference.

Each category of the index directory is one :class:`Loaded` version at a time. A
:class:`Registry` polls every category's ``CURRENT`` file; when it names another
version, that version is loaded in the poller's thread (the service keeps answering
from the old one meanwhile) and swapped in atomically. A request holds a reference to
the version it started on (:meth:`Registry.acquire`), so it finishes there; the old
:class:`~patchsearch.PatchIndex` is closed, releasing its lease on the version
directory, when the last request using it is done.

Categories whose indexes have the same backbone (name, layers, weights) share one
embedder, and frames of the same backbone and input size, from any of them, are
embedded in one backbone batch (:class:`~patchsearch.batcher.Batcher`); each frame is
then searched in its own category's index, all frames of one index at once.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from ..batcher import Batcher
from ..errors import PatchsearchError
from ..index import PatchIndex
from ..query import embedder_for, embedder_key, geometry_of, judge, thresholds_of
from ..versions import CURRENT, LEGACY_MANIFEST, current_version
from .limits import background_thread
from .pending import Pending

log = logging.getLogger("patchsearch.serve")
CATEGORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def valid_category(name: str) -> bool:
    """A category name the service accepts: 1-64 of ``[A-Za-z0-9_.-]``, starting with a
    letter or digit (so never ``..``, a path separator or a hidden file)."""
    return isinstance(name, str) and CATEGORY.fullmatch(name) is not None


class Loaded:
    """One loaded version of a category: its :class:`PatchIndex` (``index``), embedder,
    geometry and decode bit depth, and how many requests use it.

    ``close()`` happens once the version is retired (replaced) and unused.
    ``judgeable``: the version has a finite image threshold (else it answers ERROR).
    """

    def __init__(self, category: str, index: PatchIndex, embedder, device: str):
        self.category, self.index, self.embedder, self.device = category, index, embedder, device
        self.version = index.version
        self.geometry = geometry_of(index)
        self.bit_depth = (index.manifest.extra.get("decode") or {}).get("bit_depth")
        top, left, bottom, right = self.geometry.tile_boxes()[0]
        self.batch_key = (embedder_key(index), bottom - top, right - left)  # frames stack when these agree
        self._refs, self._retired, self._lock = 0, False, threading.Lock()
        self._images = None  # training image records, read on first use
        threshold = thresholds_of(index)[0]
        self.judgeable = threshold is not None and math.isfinite(threshold) and threshold > 0

    def acquire(self) -> "Loaded":
        with self._lock:
            self._refs += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            close = self._retired and self._refs == 0
        if close:
            self._close()

    def retire(self) -> None:
        """Mark replaced: closed now if unused, else when its last request releases it."""
        with self._lock:
            self._retired = True
            close = self._refs == 0
        if close:
            self._close()

    def _close(self) -> None:
        self.index.close()
        log.info("closed %s %s", self.category, self.version)

    def training_images(self) -> dict:
        """{relative path: (sha256, width, height)} of the training frames in the patch store."""
        if self._images is None:
            from ..store import PatchStore

            store = (self.index.manifest.store or {})
            table = PatchStore(self.index.directory, partitions=store.get("partitions")).images().to_pydict()
            self._images = {p: (s, w, h) for p, s, w, h in zip(table["path"], table["sha256"], table["width"],
                                                               table["height"])}
        return self._images


class Registry:
    """The loaded categories of ``index_dir`` and their batchers.

    Args:
        index_dir: holds one index directory per category (``<index-dir>/<category>/CURRENT``).
        device: where the backbone and the search run (``cpu``, ``cuda``, ``cuda:1``;
            :mod:`patchsearch.device`): FAISS shards on the GPUs where faiss-gpu sees them,
            else the torch search on the device (:meth:`PatchIndex.load`).
        max_batch, max_wait_s, max_queue: see :class:`~patchsearch.batcher.Batcher` (per
            backbone and input size).
        on_batch: callback(batch size); on_reload: callback(category, outcome) with outcome
            ``"loaded"``, ``"failed"`` (retried with back-off) or ``"refused"`` (uncalibrated,
            while a calibrated version answers).
    """

    def __init__(self, index_dir, device: str = "cpu", max_batch: int = 8, max_wait_s: float = 0.005,
                 max_queue: int = 64, on_batch: Callable[[int], None] | None = None,
                 on_reload: Callable[[str, str], None] | None = None):
        self.index_dir, self.device = Path(index_dir), device
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.on_batch, self.on_reload = on_batch, on_reload or (lambda c, o: None)
        self._current: dict[str, Loaded] = {}
        self._embedders: dict = {}
        self._batchers: dict = {}
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}  # category -> why CURRENT's version is not the one answering
        self._known: list[str] = []  # categories found by the last pass
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.ready = threading.Event()

    # categories ---------------------------------------------------------------------------
    def categories(self) -> dict[str, Loaded]:
        """{category: the version answering now}."""
        with self._lock:
            return dict(self._current)

    def acquire(self, category: str) -> Loaded | None:
        """The version of ``category`` answering now, referenced until ``release()``; None if unknown."""
        with self._lock:
            loaded = self._current.get(category)
            return loaded.acquire() if loaded is not None else None

    def _on_disk(self) -> list[str]:
        if not self.index_dir.is_dir():
            return []
        out = []
        for p in sorted(self.index_dir.iterdir()):
            if p.is_dir() and ((p / CURRENT).is_file() or (p / LEGACY_MANIFEST).is_file()):
                if valid_category(p.name):
                    out.append(p.name)
                else:
                    log.warning("ignoring %s: not a valid category name", p)
        return out

    def refresh(self) -> None:
        """Load every category whose ``CURRENT`` names a version other than the one answering
        (a version that failed to load is tried again after its back-off; one refused as
        uncalibrated only once ``CURRENT`` names another)."""
        found = self._on_disk()
        for category in found:
            path = self.index_dir / category
            try:
                version = current_version(path)
            except PatchsearchError as exc:
                log.warning("%s: %s", category, exc)
                self._set_pending(category, Pending(None, "unreadable_current", str(exc)))
                continue
            loaded = self._current.get(category)
            if loaded is not None and (version is None or version == loaded.version):
                self._set_pending(category, None if loaded.judgeable else Pending.uncalibrated(loaded.version, None))
                continue
            pending = self._pending.get(category)
            attempts = 0
            if pending is not None and pending.version == version:
                if not pending.due():
                    continue
                attempts = pending.attempts
            self._load(category, path, version, attempts)
        with self._lock:
            self._known = sorted(set(found) | set(self._current))

    def _load(self, category: str, path: Path, version: str | None, attempts: int = 0) -> None:
        try:
            index = PatchIndex.load(path, device=self.device)  # searches where the backbone runs
            try:
                embedder = embedder_for(index, cache=self._embedders)
                if self.device != "cpu":
                    embedder.to(self.device)
                new = Loaded(category, index, embedder, self.device)
            except BaseException:
                index.close()
                raise
        except Exception as exc:  # noqa: BLE001 - any failure to load is retried, never fatal
            pending = Pending.failed(version, exc, attempts + 1)
            log.error("%s: cannot load %s (attempt %d; next try in %.0f s): %s", category, version, pending.attempts,
                      pending.retry_in(), pending.message)
            self._set_pending(category, pending)
            self.on_reload(category, "failed")
            return
        old = self._current.get(category)
        if not new.judgeable and old is not None and old.judgeable:
            new.retire()  # never switch to a version that cannot judge: the old one keeps answering
            self._set_pending(category, Pending.uncalibrated(new.version, old.version))
            log.error("%s: not serving %s: %s", category, new.version, self._pending[category].message)
            self.on_reload(category, "refused")
            return
        with self._lock:
            self._current[category] = new
        self._set_pending(category, None if new.judgeable else Pending.uncalibrated(new.version, None))
        if old is not None:
            old.retire()
        log.info("%s: serving %s (%d x %d memory bank%s)", category, new.version, index.size, index.dim,
                 "" if new.judgeable else "; NOT CALIBRATED: every frame is answered ERROR")
        self.on_reload(category, "loaded")

    def _set_pending(self, category: str, pending: "Pending | None") -> None:
        with self._lock:
            if pending is None:
                self._pending.pop(category, None)
            else:
                self._pending[category] = pending

    def status(self) -> dict[str, dict]:
        """{category: {"ready", "version" (answering, or None), "calibrated", and when not
        ready "reason", "message", "pending_version", "attempts", "retry_in_s"}} for every
        category found on disk or loaded. Ready: answering with a calibrated version, the
        one ``CURRENT`` names."""
        with self._lock:
            known, current, pending = list(self._known), dict(self._current), dict(self._pending)
        out = {}
        for category in sorted(set(known) | set(current)):
            loaded, p = current.get(category), pending.get(category)
            entry = {"ready": loaded is not None and loaded.judgeable and p is None,
                     "version": loaded.version if loaded else None,
                     "calibrated": bool(loaded and loaded.judgeable)}
            if p is not None:
                entry.update(p.describe())
            elif loaded is None:
                entry.update(reason="loading", message="not loaded yet")
            out[category] = entry
        return out

    def start(self, poll_s: float = 1.0) -> None:
        """Load every category in a background thread, then poll for new versions every ``poll_s``
        seconds; ``ready`` is set after the first pass."""
        def loop():
            background_thread()
            while not self._stop.is_set():
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - the poller must survive anything
                    log.exception("reload pass failed")
                self.ready.set()
                self._stop.wait(poll_s)

        self._poller = threading.Thread(target=loop, name="patchsearch-reload", daemon=True)
        self._poller.start()

    def close(self) -> None:
        """Stop polling and batching; close every loaded index."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(10)
        for b in list(self._batchers.values()):
            b.close()
        with self._lock:
            current, self._current = self._current, {}
        for loaded in current.values():
            loaded.retire()

    # inference ----------------------------------------------------------------------------
    def submit(self, loaded: Loaded, tensor, frame_size: tuple[int, int], deadline: float | None = None):
        """Queue one frame (its (T, 3, th, tw) input tensor and (width, height)) for ``loaded``;
        returns a future of the frame's :class:`SearchResult` (one image, without its anomaly map).
        ``deadline``: ``time.monotonic()`` by which its batch must start, else the future
        fails with :class:`~patchsearch.batcher.Expired`.

        Raises:
            Overloaded: the batcher's queue is full.
        """
        with self._lock:
            batcher = self._batchers.get(loaded.batch_key)
            if batcher is None:
                batcher = self._batchers[loaded.batch_key] = Batcher(
                    _run_batch, self.max_batch, self.max_wait_s, self.max_queue, self.on_batch,
                    name=f"patchsearch-batch-{len(self._batchers)}")
        return batcher.submit((loaded, tensor, frame_size), deadline)

    def queue_depth(self) -> int:
        """Frames waiting in all batchers."""
        return sum(b.depth for b in list(self._batchers.values()))


def _run_batch(jobs) -> None:
    """One backbone call for the frames of ``jobs`` (same embedder and input size), then one
    search per index; completes every job's future with its frame's SearchResult (no maps:
    each request thread draws its own map and regions, so that work runs in parallel
    rather than in this one worker)."""
    import torch

    background_thread()  # the backbone (and its compute threads) yield to the event loop
    first = jobs[0].payload[0]
    tensor = torch.cat([j.payload[1] for j in jobs])
    if first.device != "cpu":
        tensor = tensor.to(first.device)
    emb = first.embedder(tensor).cpu().numpy()  # (sum of tiles, h, w, d)
    starts = np.cumsum([0] + [len(j.payload[1]) for j in jobs])
    groups: dict[int, list[int]] = {}
    for n, j in enumerate(jobs):
        groups.setdefault(id(j.payload[0]), []).append(n)
    for members in groups.values():
        loaded = jobs[members[0]].payload[0]
        try:
            part = judge(loaded.index, np.concatenate([emb[starts[n]:starts[n + 1]] for n in members]),
                         [jobs[n].payload[2] for n in members], maps=False, regions=False)
        except Exception as exc:  # noqa: BLE001 - fails these frames only
            for n in members:
                jobs[n].future.set_exception(exc)
            continue
        for pos, n in enumerate(members):
            jobs[n].future.set_result(part.frame(pos))
