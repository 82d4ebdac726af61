"""Distributed embedding of the training frames: a pool of Ray actors, one backbone each.

The sorted training list is cut into contiguous chunks of ``chunk_images`` frames (a
multiple of the batch size, so every backbone batch holds the very frames the
single-machine build batches together); chunk ``p`` becomes store partition ``p``
(``images-NNNNN.arrow``/``patches-NNNNN.arrow``, image ids from its first frame's position
on), written by whichever actor is free into the version being built. The assignment of
frames to partitions depends only on the list and the chunk size, never on scheduling, so
the store rows read in partition order, and the memory bank selected from them, equal the
single-machine build's (same backbone on the same kind of device).

Faults: an actor process that dies is restarted by Ray (``max_restarts``) and its chunk is
run again (``max_task_retries``; the chunk's half-written ``.partial`` files are removed
first). When the retries are spent the build stops with :class:`DistributedError`, the
other actors are killed and the version being built is discarded: the current version
keeps answering.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable, Sequence

from . import DistributedError, cluster_gpus, connect

CHUNK_IMAGES = 64  # frames per partition (rounded up to a multiple of the batch size)


def chunk_bounds(num_images: int, chunk: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of ``chunk`` frames (the last may be shorter)."""
    return [(s, min(num_images, s + chunk)) for s in range(0, num_images, chunk)]


class EmbedWorker:
    """One backbone in one Ray actor process: embeds chunks of frames into store partitions.

    Args:
        spec: :class:`~patchsearch.features.PatchEmbedder` keyword arguments
            (backbone, layers, weights, embed_dim, input_norm).
        device: torch device of the backbone (``cuda`` where the actor holds a GPU).
        threads: torch intra-op threads (the actor's CPUs).
    """

    def __init__(self, spec: dict, device: str = "cpu", threads: int = 1):
        import torch

        from ..features import PatchEmbedder

        torch.set_num_threads(threads)
        self.embedder = PatchEmbedder(**spec).to(device)
        self.device = device

    def embed(self, directory: str, partition: int, paths: list[str], first_image_id: int, root: str, geometry,
              batch_size: int, bit_depth: int | None) -> dict:
        """Write partition ``partition`` of the store in ``directory`` from ``paths``.

        Returns:
            {"partition", "num_images", "num_patches", "grid", "dim", "seconds" (decode, embed, write),
            "pid", "node"}.

        Raises:
            InputError: ``directory`` not visible on this node (not a shared filesystem), an
                unreadable frame.
        """
        from ..errors import InputError
        from ..ingest import embed_frames
        from ..store import PatchStoreWriter, partition_files

        directory = Path(directory)
        if not directory.is_dir():
            raise InputError(f"{directory}: not found on Ray node {socket.gethostname()}: the index directory "
                             f"must be on a filesystem every node of the cluster mounts")
        t0 = time.perf_counter()
        for name in partition_files(partition):  # left by an attempt whose actor died
            for leftover in (directory / name, directory / f"{name}.partial"):
                leftover.unlink(missing_ok=True)
        with PatchStoreWriter(directory, self.embedder.dim, partition, first_image_id) as writer:
            grid = embed_frames(writer, [Path(p) for p in paths], self.embedder, geometry, Path(root), batch_size,
                                0, bit_depth)
        return {"partition": partition, "num_images": writer.num_images, "num_patches": writer.num_patches,
                "grid": grid, "dim": self.embedder.dim, "seconds": time.perf_counter() - t0, "pid": os.getpid(),
                "node": socket.gethostname()}

    def pid(self) -> int:
        return os.getpid()


def embed_store(address: str | None, directory: str | os.PathLike, paths: Sequence[Path], root: Path, geometry,
                dim: int, spec: dict, batch_size: int = 16, bit_depth: int | None = None, *,
                num_workers: int | None = None, cpus_per_worker: int = 1, chunk_images: int = CHUNK_IMAGES,
                max_restarts: int = 2,
                max_task_retries: int = 2, on_partition: Callable[[dict], None] | None = None,
                log: Callable[[str], None] = lambda msg: None) -> tuple[int, int, list[int]]:
    """Embed ``paths`` on a Ray cluster into store partitions 0, 1, ... of ``directory``.

    Args:
        address: the Ray cluster (see :func:`patchsearch.distributed.connect`).
        directory: the version being built (:func:`patchsearch.versions.new_version`), on a
            filesystem every node mounts.
        paths, root, geometry, batch_size, bit_depth: as :func:`patchsearch.pipeline.build`.
        dim: embedding dimension d (checked against every partition).
        spec: PatchEmbedder keyword arguments (backbone, layers, weights, embed_dim, input_norm).
        num_workers: actors (default: one per GPU of the cluster, else one per ``cpus_per_worker``
            CPUs), at most one per chunk.
        cpus_per_worker: CPUs each actor reserves and torch threads it runs. Embeddings are
            bit-identical to a single-machine build with as many torch threads
            (``torch.set_num_threads``): oneDNN's convolutions sum in a thread-dependent order
            (float32 differences of about 1e-5 otherwise).
        chunk_images: frames per partition, rounded up to a multiple of ``batch_size``.
        max_restarts, max_task_retries: Ray's actor restarts and per-chunk retries after a
            worker process died.
        on_partition: called on the driver with each finished partition's dict (see
            :meth:`EmbedWorker.embed`), in completion order.

    Returns:
        (images, patches, feature grid [h, w]).

    Raises:
        DistributedError: Ray missing or unreachable, a worker died past its retries.
        InputError: an unreadable frame (as the single-machine build), directory not shared.
    """
    ray = connect(address)
    from ray.exceptions import RayActorError, RayTaskError
    from ray.util import ActorPool

    from ..errors import PatchsearchError

    chunk = -(-max(1, chunk_images) // batch_size) * batch_size
    chunks = chunk_bounds(len(paths), chunk)
    gpus = cluster_gpus(ray)
    if num_workers is None:
        num_workers = gpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_worker)
    num_workers = max(1, min(num_workers, len(chunks)))
    actor = ray.remote(EmbedWorker).options(num_cpus=cpus_per_worker, num_gpus=1 if gpus else 0,
                                             max_restarts=max_restarts, max_task_retries=max_task_retries)
    workers = [actor.remote(spec, "cuda" if gpus else "cpu", cpus_per_worker) for _ in range(num_workers)]
    log(f"embedding {len(paths)} frames as {len(chunks)} partitions of {chunk} on {num_workers} Ray workers"
        f"{' (1 GPU each)' if gpus else ''}")
    pool, done = ActorPool(workers), {}
    args = [(str(directory), p, [str(x) for x in paths[a:b]], a, str(root), geometry, batch_size, bit_depth)
            for p, (a, b) in enumerate(chunks)]
    try:
        pending = iter(args)
        for w, job in zip(workers, pending):  # one chunk per worker at a time; the next as one finishes
            pool.submit(lambda worker, a: worker.embed.remote(*a), job)
        while pool.has_next():
            try:
                info = pool.get_next_unordered()
            except RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                raise (cause if isinstance(cause, PatchsearchError) else
                       DistributedError(f"a Ray embedding worker failed: {cause or exc}")) from None
            except RayActorError as exc:
                raise DistributedError(f"a Ray embedding worker died and its {max_restarts} restarts / "
                                       f"{max_task_retries} retries are spent ({type(exc).__name__}); the build "
                                       f"was abandoned and the current version is unchanged") from None
            job = next(pending, None)
            if job is not None:
                pool.submit(lambda worker, a: worker.embed.remote(*a), job)
            done[info["partition"]] = info
            log(f"partition {info['partition']}: {info['num_images']} frames, {info['num_patches']} patches "
                f"(worker pid {info['pid']} on {info['node']})")
            if on_partition is not None:
                on_partition(info)
    finally:
        for w in workers:
            ray.kill(w)
    if sorted(done) != list(range(len(chunks))):
        raise DistributedError(f"partitions {sorted(set(range(len(chunks))) - set(done))} were not written")
    dims = {i["dim"] for i in done.values()}
    if dims != {dim}:
        raise DistributedError(f"workers embed to dimension {sorted(dims)}, this machine's backbone to {dim}")
    grids = {tuple(i["grid"]) for i in done.values()}
    if len(grids) != 1:
        raise DistributedError(f"workers disagree on the feature grid: {sorted(grids)}")
    return (sum(i["num_images"] for i in done.values()), sum(i["num_patches"] for i in done.values()),
            list(grids.pop()))
