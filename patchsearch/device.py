"""Where the backbone and the search run: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.

A device is a runtime choice, never part of an index: an index built on one device is
loaded and queried on any other, and nothing about the device is written into it.

* ``cpu``: everything on the CPU.
* ``cuda``: the GPUs. FAISS shards are spread over every GPU faiss-gpu sees; torch work
  (backbone, torch search, Eq. 7, anomaly maps) runs on torch's current CUDA device.
* ``cuda:N``: GPU N only.
* ``auto``: ``cuda`` where torch sees a CUDA device or faiss-gpu sees a GPU, else ``cpu``.

Asking for ``cuda`` where there is none is an error (:func:`resolve_device`), never a
silent fall back to the CPU; only ``auto`` chooses. Importing this module imports
neither torch nor faiss; resolving anything but ``cpu`` imports torch (if installed),
then faiss.
"""

from __future__ import annotations

import re

from .errors import InputError

CHOICES = "cpu, cuda, cuda:N or auto"
HELP = ("where the backbone and the search run: cpu, cuda (every GPU), cuda:N (GPU N), or auto "
        "(cuda where torch or faiss-gpu sees a GPU, else cpu); a runtime choice, never part of the index")
_FORM = re.compile(r"^(cpu|auto|cuda)(?::(\d+))?$")


def parse_device(value, name: str = "device") -> str:
    """Normalise a device name without looking at the hardware.

    Args:
        value: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (N >= 0), ``"auto"`` (any case,
            surrounding spaces ignored), or a ``torch.device``.
        name: how the caller's parameter is named in the error (``device``, ``--device``).

    Returns:
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.

    Raises:
        InputError: anything else (one line naming ``name``).
    """
    text = str(value).strip().lower() if value is not None else ""
    m = _FORM.match(text)
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise InputError(f"{name} must be {CHOICES}, got {value!r}")
    return text if m.group(2) is None else f"cuda:{int(m.group(2))}"


def torch_cuda_count() -> int:
    """CUDA devices torch sees (0 without torch or without CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def faiss_gpu_count() -> int:
    """GPUs faiss sees (0 with faiss-cpu). torch is imported first where installed:
    faiss-gpu-cuvs finds the CUDA libraries torch loaded."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    from .searchers import num_gpus

    return num_gpus()


def _versions() -> str:
    parts = []
    try:
        import torch

        parts.append(f"torch {torch.__version__} sees no CUDA device")
    except ImportError:
        parts.append("torch is not installed")
    import faiss

    gpu = hasattr(faiss, "StandardGpuResources")
    parts.append(f"faiss {faiss.__version__} {'sees no GPU' if gpu else 'has no GPU support (faiss-cpu)'}")
    return "; ".join(parts)


def resolve_device(value, name: str = "device") -> str:
    """The device to use now: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (``auto`` decided).

    Args:
        value: see :func:`parse_device`.
        name: the parameter's name in errors (``device`` in the library, ``--device`` on
            the command line).

    Raises:
        InputError: a malformed value; ``cuda`` where neither torch nor faiss sees a GPU;
            ``cuda:N`` beyond the GPUs there are.
    """
    dev = parse_device(value, name)
    if dev == "cpu":
        return dev
    count = max(torch_cuda_count(), faiss_gpu_count())
    if dev == "auto":
        return "cuda" if count else "cpu"
    want = 0 if dev == "cuda" else int(dev.split(":")[1])
    if want >= count:
        flag = name.startswith("--")
        shown = f"{name} {dev}" if flag else f"{name}={dev!r}"
        fix = f"use {name} cpu or auto" if flag else f"use {name}='cpu' or 'auto'"
        where = f"no CUDA device here ({_versions()})" if not count else \
            f"only {count} CUDA device(s) here (0..{count - 1})"
        raise InputError(f"{shown}: {where}: {fix}")
    return dev


def gpu_ids(device: str) -> list[int] | None:
    """The GPUs FAISS shards go to: None for every GPU (``cuda``), [N] for ``cuda:N``."""
    return [int(device.split(":")[1])] if device.startswith("cuda:") else None


def is_tensor(x) -> bool:
    """True for a torch tensor (checked without importing torch)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def module_device(module) -> str:
    """The device of a torch module's first parameter or buffer, as a string (``"cpu"`` if none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        return str(t.device)
    return "cpu"


def move_module(module, device: str | None):
    """``module.to(device)`` unless ``device`` is None or the module is already there; returns it."""
    if device is not None and module_device(module) != _torch_name(device):
        module.to(device)
    return module


def _torch_name(device: str) -> str:
    """``str(torch.device(device))`` for resolved names (``cuda`` is torch's current device)."""
    if device == "cuda":
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return device
