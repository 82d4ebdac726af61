"""patchsearch beyond one machine, on Ray (the ``[ray]`` extra).

* :mod:`.embed`: the distributed build's embedding stage, a pool of Ray actors (one backbone
  each) writing the Arrow patch store as one partition per fixed chunk of training frames.
* :mod:`.shards`: a memory bank served by shard actors (one FAISS shard file each), searched
  by fan-out and an exact merge (:class:`~.shards.RemoteShardedSearcher`,
  :class:`~.shards.RemotePatchIndex`).
* :mod:`.coreset`: the composable (two-round) greedy k-center coreset for stores beyond one node.

Nothing here is imported by ``import patchsearch``; Ray itself is imported on first use
(:func:`ray_module`), so single-machine users need not install it.
"""

from __future__ import annotations

from ..errors import PatchsearchError


class DistributedError(PatchsearchError):
    """Ray is missing or unreachable, or a Ray worker died past its retries (the message says
    which and what was left unchanged)."""


def ray_module():
    """The ``ray`` module, imported on first use.

    Raises:
        DistributedError: Ray is not installed (``pip install 'patchsearch[ray]'``).
    """
    try:
        import ray
    except ImportError:
        raise DistributedError("Ray is not installed: pip install 'patchsearch[ray]'") from None
    return ray


def connect(address: str | None):
    """Join the Ray cluster at ``address`` unless this process already has (``ray.init``);
    returns the ray module.

    Args:
        address: ``"auto"`` (the cluster this node belongs to, or ``$RAY_ADDRESS``),
            ``"local"`` (start a one-node cluster here), ``"host:port"`` or ``"ray://host:port"``.

    Raises:
        DistributedError: Ray missing, or no cluster at ``address``.
    """
    ray = ray_module()
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise DistributedError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
    return ray


def cluster_gpus(ray) -> int:
    """GPUs in the connected Ray cluster (0 when none)."""
    return int(ray.cluster_resources().get("GPU", 0))
