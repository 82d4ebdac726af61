import numpy as np
import pytest
import torch
from PIL import Image

from patchsearch import data
from patchsearch.data import ImageDataset, collate, list_images, load_image, train_images
from patchsearch.geometry import crop_geometry
from patchsearch.errors import InputError


def test_mvtec_layout(mvtec_root):
    train = train_images(mvtec_root, "widget")
    assert [p.name for p in train] == [f"{i:03d}.png" for i in range(6)]
    samples = data.test_samples(mvtec_root, "widget")
    assert [s.label for s in samples] == [1, 1, 1, 0, 0, 0]  # "blob" sorts before "good"
    assert all(s.mask_path.name == f"{s.path.stem}_mask.png" for s in samples if s.label)
    assert all(s.mask_path is None for s in samples if not s.label)


def test_layout_errors(tmp_path, mvtec_root):
    with pytest.raises(InputError, match="does not exist"):
        train_images(tmp_path / "nowhere", "widget")
    with pytest.raises(InputError, match="category 'gadget' not found.*widget"):
        train_images(mvtec_root, "gadget")
    for p in (mvtec_root / "widget/train/good").iterdir():
        p.unlink()
    with pytest.raises(InputError, match="train/good holds no image"):
        train_images(mvtec_root, "widget")
    (mvtec_root / "widget/ground_truth/blob/000_mask.png").unlink()
    with pytest.raises(InputError, match="000_mask.png is missing"):
        data.test_samples(mvtec_root, "widget")


def test_list_images(tmp_path, mvtec_root):
    folder = mvtec_root / "widget/test/good"
    single = mvtec_root / "widget/train/good/001.png"
    assert list_images([folder, single]) == sorted(folder.iterdir()) + [single]
    with pytest.raises(InputError, match="no such file"):
        list_images([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no image"):
        list_images([tmp_path / "empty"])


@pytest.mark.parametrize("fmt", ["png", "jpeg", "bmp", "tiff"])
def test_formats_decode_to_rgb(tmp_path, fmt):
    arr = np.full((32, 40, 3), (200, 100, 50), np.uint8)
    path = tmp_path / f"img.{fmt}"
    Image.fromarray(arr).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (40, 32)
    assert np.abs(np.asarray(img).astype(int) - arr).max() <= 3  # jpeg is lossy


def test_grayscale_rgba_16bit(tmp_path):
    Image.fromarray(np.full((20, 20), 77, np.uint8)).save(tmp_path / "gray.png")
    assert (np.asarray(load_image(tmp_path / "gray.png")) == 77).all()
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[..., 3] = 128
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert (np.asarray(load_image(tmp_path / "rgba.png")) == (10, 20, 30)).all()
    Image.fromarray(np.full((20, 20), 65535 // 2, np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "deep.png"))
    assert out.shape == (20, 20, 3) and (out == 127).all()


def test_bad_files(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(InputError, match="zero.png: empty file"):
        load_image(tmp_path / "zero.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError, match="text.png: not a readable image"):
        load_image(tmp_path / "text.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="trunc.png"):
        load_image(tmp_path / "trunc.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(InputError, match="tiny.png: image is 8x8"):
        load_image(tmp_path / "tiny.png")


def test_dataset_reports_bad_image_and_keeps_others(tmp_path):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"")
    ds = ImageDataset([tmp_path / "ok.png", tmp_path / "bad.png"], crop_geometry(32, 32))
    batch = collate([ds[0], ds[1]])
    assert batch.tensor.shape == (1, 3, 32, 32) and batch.good == [0] and "bad.png" in batch.errors[1]
    assert batch.frame_sizes == [(40, 40)]


def test_geometry_resize_crop_and_mask():
    g = crop_geometry(resize=64, crop=48)
    # a 128 x 96 (w x h) image: short side 96 -> 64, long 128 -> 85; crop 48 centred
    img = np.zeros((96, 128, 3), np.uint8)
    img[40:56, 56:72] = 255  # a centred bright square
    t = g.frame_tensor(Image.fromarray(img))[0]
    assert t.shape == (3, 48, 48) and t.dtype == torch.float32
    bright = (t[0] > t[0].mean() + 2 * t[0].std()).nonzero().float()  # the square, after resize and crop
    assert bright.mean(0).tolist() == pytest.approx([23.5, 23.5], abs=1.0)  # still centred
    assert 9 ** 2 <= len(bright) <= 12 ** 2  # 16 px scaled by 64/96: about 10.7 px a side
    left, top, right, bottom = g.crop_box(128, 96)
    assert (right - left) == pytest.approx(48 * 96 / 64, abs=1) and (bottom - top) == pytest.approx(72, abs=1)
    assert (left + right) / 2 == pytest.approx(64, abs=1) and (top + bottom) / 2 == pytest.approx(48, abs=1)
    with pytest.raises(InputError):
        crop_geometry(resize=100, crop=200)


def test_mask_threshold(tmp_path):
    m = np.zeros((64, 64), np.uint8)
    m[:, 32:] = 1  # any value > 0 is defect
    Image.fromarray(m).save(tmp_path / "m.png")
    out = crop_geometry(64, 64).eval_mask(Image.open(tmp_path / "m.png"), (64, 64))
    assert out.dtype == bool and out[:, 32:].all() and not out[:, :32].any()


def test_bit_depth_is_a_fixed_rule_per_camera(tmp_path):
    dark = np.full((20, 20), 1000, np.uint16)
    bright = dark.copy()
    bright[:10] = 4095  # a 12-bit camera's full scale in one half of the frame
    Image.fromarray(dark).save(tmp_path / "dark.png")
    Image.fromarray(bright).save(tmp_path / "bright.png")
    for depth, expect in ((12, 62), (16, 4), (None, 4)):  # 1000 * 255 / (2**depth - 1), rounded
        a = np.asarray(load_image(tmp_path / "dark.png", depth))
        b = np.asarray(load_image(tmp_path / "bright.png", depth))
        assert (a == expect).all() and (b[10:] == expect).all()  # the same value, whatever else is in the frame
    assert (np.asarray(load_image(tmp_path / "bright.png", 12))[:10] == 255).all()
