"""Placement of FAISS shards on GPUs: which shard on which GPU, with which options.

Pure decisions (:func:`gpu_plan`, :func:`check_gpu_limit`) are kept apart from the
FAISS calls (:func:`place_on_gpus`) so that they are tested without a GPU.
:class:`patchsearch.searchers.ShardedSearcher` uses them where faiss sees GPUs.
"""

from __future__ import annotations

from .errors import InputError

# FAISS GPU indexes select at most GPU_MAX_SELECTION_K = 2048 results (k) and inverted
# lists (nprobe) per query (faiss/gpu/utils/DeviceDefs.cuh; cuVS-backed indexes allow
# more, getMaxKSelection in faiss/gpu/impl/IndexUtils.cu): beyond, FAISS throws.
GPU_MAX_K = 2048
GPU_MAX_NPROBE = 2048
# GpuClonerOptions fields that gpu_plan sets (faiss/gpu/GpuClonerOptions.h).
GPU_OPTION_FIELDS = ("useFloat16",)


def check_gpu_limit(name: str, value: int, limit: int = GPU_MAX_K, hint: str = "") -> None:
    """Raises InputError (one line, naming ``name``) where ``value`` exceeds FAISS GPU's
    ``limit``; ``hint`` says what to lower (default: ``name`` itself)."""
    if value > limit:
        raise InputError(f"{name} = {value} exceeds the FAISS GPU limit of {limit}: "
                         f"{hint or f'use {name} <= {limit}'}, or load the index with gpu=False")


def gpu_plan(n_shards: int, ngpu: int, pq_m: int | None = None, float16: bool = False) -> list[dict]:
    """Where each shard goes on the GPUs, and how it is copied there (pure; no faiss).

    Shard i goes to GPU ``i % ngpu`` with its own ``StandardGpuResources`` (resources
    i): ``IndexShards(threaded=True)`` searches each shard from its own thread, and a
    FAISS GPU resources object must not be used by two threads at once (FAISS wiki,
    "Threads and asynchronous calls").

    Args:
        n_shards: number of shards (>= 1).
        ngpu: GPUs to use (>= 1).
        pq_m: IVF-PQ sub-quantizers (bytes per code), None for flat shards; above 48
            the lookup tables are float16 (``useFloat16``; FAISS GPU holds float32 tables
            for at most 48 sub-quantizers in shared memory).
        float16: flat shards stored as float16 (``useFloat16``; halves GPU memory,
            approximate distances).

    Returns:
        [{"shard": i, "device": GPU id, "resources": i, "options": {GpuClonerOptions
        field: value}}], one per shard; the options use only :data:`GPU_OPTION_FIELDS`.

    Raises:
        InputError: n_shards or ngpu below 1.
    """
    if n_shards < 1 or ngpu < 1:
        raise InputError(f"GPU placement needs at least 1 shard and 1 GPU, got {n_shards} shards, {ngpu} GPUs")
    use16 = pq_m > 48 if pq_m is not None else bool(float16)
    options = {"useFloat16": use16} if use16 else {}
    return [{"shard": i, "device": i % ngpu, "resources": i, "options": dict(options)} for i in range(n_shards)]


def place_on_gpus(shards: list, plan: list[dict], f=None) -> tuple[list, list]:
    """Copy CPU shards to GPUs as :func:`gpu_plan` says (``faiss.index_cpu_to_gpu``).

    Args:
        shards: CPU faiss indexes.
        plan: :func:`gpu_plan` of ``len(shards)`` shards.
        f: the faiss module (default: ``import faiss``).

    Returns:
        (GPU indexes in shard order, the ``StandardGpuResources`` objects, one per plan
        entry's "resources"); the resources must outlive the indexes.
    """
    if f is None:
        import faiss as f
    resources = [f.StandardGpuResources() for _ in range(1 + max(p["resources"] for p in plan))]
    placed = []
    for p in plan:
        co = f.GpuClonerOptions()
        for name, value in p["options"].items():
            setattr(co, name, value)
        placed.append(f.index_cpu_to_gpu(resources[p["resources"]], p["device"], shards[p["shard"]], co))
    return placed, resources
