import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchsearch import data
from patchsearch.errors import InputError
from patchsearch.geometry import Geometry, choose_geometry, crop_geometry

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "patchsearch"


class _PaperProtocol:
    """The former ``data.Geometry`` (resize the shorter side, centre crop), kept here as the
    reference the crop mode must equal."""

    def __init__(self, resize, crop):
        self.resize, self.crop = resize, crop

    def _transform(self, interpolation):
        from torchvision.transforms import v2

        return v2.Compose([v2.Resize(self.resize, interpolation=interpolation, antialias=True),
                           v2.CenterCrop(self.crop)])

    def image_tensor(self, img):
        from torchvision.transforms import v2

        t = self._transform(v2.InterpolationMode.BILINEAR)(v2.functional.pil_to_tensor(img))
        t = v2.functional.to_dtype(t, torch.float32, scale=True)
        return v2.functional.normalize(t, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    def mask_array(self, path):
        from torchvision.transforms import v2

        t = v2.functional.pil_to_tensor(Image.open(path).convert("L"))
        return self._transform(v2.InterpolationMode.NEAREST)(t)[0].numpy() > 0

    def crop_box(self, width, height):
        if width <= height:
            new_w, new_h = self.resize, int(self.resize * height / width)
        else:
            new_w, new_h = int(self.resize * width / height), self.resize
        left, top = int(round((new_w - self.crop) / 2.0)), int(round((new_h - self.crop) / 2.0))
        sx, sy = width / new_w, height / new_h
        return (left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy)


def _noise_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_import_does_not_import_torch():
    code = ("import sys, types; p = types.ModuleType('patchsearch'); p.__path__ = [%r]; "
            "sys.modules['patchsearch'] = p; import patchsearch.geometry; "
            "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules" % str(PACKAGE_DIR))
    subprocess.run([sys.executable, "-c", code], check=True)


def test_choose_non_square_frames():
    line_scan = choose_geometry([(400, 100)] * 3)
    assert line_scan.mode == "frame" and line_scan.input_size == (256, 1024) and line_scan.crop is None
    portrait = choose_geometry([(600, 800)])
    # 256 / 0.75 = 341.3 -> nearest multiple of 16 is 336
    assert portrait.input_size == (336, 256)
    # median of w/h (0.5, 0.75, 0.8, 2.0, 3.0) = 0.8 -> height 320; the mean (1.41) would give landscape
    frames = [(100, 200), (300, 400), (400, 500), (400, 200), (600, 200)]
    mixed = choose_geometry(frames, orient="fixed")
    assert mixed.input_size == (320, 256) and mixed.orient == "fixed"
    # orient="auto": portrait input (median 0.8 < 1); the frames turned to portrait
    # have w/h (0.5, 0.75, 0.8, 0.5, 0.333), median 0.5 -> height 512
    turned = choose_geometry(frames, orient="auto")
    assert turned.input_size == (512, 256) and turned.orient == "auto"
    assert [turned.turned(f) for f in frames] == [False, False, False, True, True]
    assert not turned.turned((300, 300)) and not choose_geometry([(300, 300)], orient="auto").turned((400, 200))
    # shorter side rounded to the stride too, at least one stride
    assert choose_geometry([(300, 300)], resize=250).input_size == (256, 256)
    assert choose_geometry([(1000, 10)], resize=8).input_size == (16, 1600)
    assert choose_geometry([(500, 100)], resize=100, stride=32).input_size == (96, 480)
    assert all(v % 16 == 0 for v in choose_geometry([(123, 457)], resize=199).input_size)


def test_crop_mode_unchanged():
    g = choose_geometry([(400, 100), (600, 800)], resize=256, crop=224)
    assert (g.mode, g.input_size, g.resize, g.crop, g.tile) == ("crop", (224, 224), 256, 224, None)
    old = _PaperProtocol(256, 224)
    for w, h in [(400, 100), (600, 800), (224, 224), (333, 257)]:
        assert g.crop_box(w, h) == pytest.approx(old.crop_box(w, h))


@pytest.mark.parametrize("kwargs, message", [
    (dict(resize=0), "--resize must be a whole number of pixels >= 1"),
    (dict(resize=-5), "--resize must be a whole number of pixels >= 1"),
    (dict(crop=300), "--crop 300 is larger than --resize 256"),
    (dict(crop=0), "--crop must be a whole number"),
    (dict(crop=224, tile=112), "cannot be combined with --crop"),
    (dict(tile=512), "--tile 512 is larger than the input 256x256"),
    (dict(tile=100), "not a multiple of stride 16"),
    (dict(tile=0), "--tile must be a whole number"),
    (dict(tile=128, tile_overlap=128), "--tile-overlap 128 is too large"),
    (dict(tile=128, tile_overlap=-1), "--tile-overlap must be a whole number of pixels >= 0"),
    (dict(tile_overlap=1.5), "--tile-overlap must be a whole number of pixels >= 0"),
    (dict(stride=0), "stride must be a whole number"),
])
def test_option_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        choose_geometry([(300, 300)], **kwargs)


def test_frame_size_errors():
    with pytest.raises(InputError, match="at least one training frame"):
        choose_geometry([])
    with pytest.raises(InputError, match="frame height must be a whole number"):
        choose_geometry([(300, 0)])
    with pytest.raises(InputError, match=r"must be \(width, height\)"):
        choose_geometry([300])
    with pytest.raises(InputError, match="mode must be one of"):
        Geometry("squash", (224, 224), 224)
    with pytest.raises(InputError, match="not a multiple of stride"):
        Geometry("frame", (250, 256), 256)


def test_manifest_round_trip_and_old_form():
    for g in (choose_geometry([(400, 100)]), choose_geometry([(300, 300)], crop=224),
              choose_geometry([(2000, 1000)], resize=512, tile=256, tile_overlap=48)):
        d = json.loads(json.dumps(g.to_dict()))
        assert Geometry.from_dict(d) == g
    numpy_ints = choose_geometry([(np.int64(300), np.int64(200))], resize=np.int64(256), crop=np.int64(224))
    assert json.loads(json.dumps(numpy_ints.to_dict()))["crop"] == 224
    old = Geometry.from_dict({"resize": 256, "crop": 224})
    assert old == crop_geometry(256, 224) and old.mode == "crop" and old.input_size == (224, 224)
    with pytest.raises(InputError, match="--crop 300 is larger than --resize 256"):
        Geometry.from_dict({"resize": 256, "crop": 300})
    with pytest.raises(InputError, match="unknown keys"):
        Geometry.from_dict({"mode": "frame", "input_size": [256, 256], "resize": 256, "zoom": 2})
    # manifests from before orient never turned a frame
    before = Geometry.from_dict({"mode": "frame", "input_size": [320, 256], "resize": 256})
    assert before.orient == "fixed" and not before.turned((400, 200))
    assert Geometry.from_dict(choose_geometry([(200, 400)], orient="auto").to_dict()).orient == "auto"
    with pytest.raises(InputError, match="never turns frames"):
        Geometry("crop", (224, 224), 256, 224, orient="auto")
    with pytest.raises(InputError, match="--orient must be one of"):
        choose_geometry([(200, 400)], orient="rotate")


def test_frame_tensor_crop_mode_equals_today(tmp_path):
    old, new = _PaperProtocol(256, 224), crop_geometry(256, 224)
    for w, h in [(300, 200), (180, 400), (256, 256)]:
        img = _noise_image(w, h, seed=w)
        t = new.frame_tensor(img)
        assert t.shape == (1, 3, 224, 224) and t.dtype == torch.float32
        torch.testing.assert_close(t[0], old.image_tensor(img), rtol=0, atol=0)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 3:h // 2, w // 4:w // 2] = 255
        Image.fromarray(mask).save(tmp_path / "m.png")
        np.testing.assert_array_equal(new.eval_mask(Image.fromarray(mask), (w, h)),
                                      old.mask_array(tmp_path / "m.png"))


def test_frame_tensor_frame_mode_sees_whole_frame():
    g = choose_geometry([(400, 100)])  # input 256 x 1024, scale 2.56 both ways
    arr = np.zeros((100, 400, 3), np.uint8)
    arr[10:30, 360:390] = 255  # bright defect near the right edge, outside the centre square
    t = g.frame_tensor(Image.fromarray(arr).convert("L"))  # grayscale is converted to RGB
    assert t.shape == (1, 3, 256, 1024)
    ys, xs = np.nonzero(t[0, 0].numpy() > 2.0)
    assert 360 * 2.56 - 3 <= xs.min() and xs.max() <= 390 * 2.56 + 3
    assert 10 * 2.56 - 3 <= ys.min() and ys.max() <= 30 * 2.56 + 3
    crop = crop_geometry(256, 224).frame_tensor(Image.fromarray(arr))
    assert (crop[0, 0] > 2.0).sum() == 0  # the paper crop never sees it


@pytest.mark.parametrize("frame", [(400, 100), (600, 800)])
def test_defect_outside_centre_maps_back_to_frame(frame):
    w, h = frame
    g = choose_geometry([frame])
    H, W = g.input_size
    GH, GW = H // 8, W // 8
    cell = (1, GW - 2)  # near the top-right corner of the patch grid
    grid = np.zeros((GH, GW), np.float32)
    grid[cell] = 5.0
    amap = g.frame_map(grid, (w, h))
    assert amap.shape == (h, w) and amap.dtype == np.float32
    y, x = np.unravel_index(np.argmax(amap), amap.shape)
    # the cell's centre in input pixels is 8 * (index + 0.5); in frame pixels times w/W, h/H
    exp_x, exp_y = (cell[1] + 0.5) * 8 * w / W, (cell[0] + 0.5) * 8 * h / H
    assert abs(x + 0.5 - exp_x) <= 8 * w / W and abs(y + 0.5 - exp_y) <= 8 * h / H
    assert g.crop_box(w, h) == (0, 0, w, h) and g.scale((w, h)) == (1.0, 1.0)
    mask = np.zeros((h, w), bool)
    mask[int(exp_y) - 2:int(exp_y) + 2, int(exp_x) - 2:int(exp_x) + 2] = True
    np.testing.assert_array_equal(g.eval_mask(mask, (w, h)), mask)
    # crop mode: the defect lies outside the crop box, so its mask vanishes from the crop
    c = crop_geometry(256, 224)
    left, top, right, bottom = c.crop_box(w, h)
    assert not (left <= exp_x <= right and top <= exp_y <= bottom)
    assert not c.eval_mask(mask, (w, h)).any()
    cmap = c.frame_map(np.zeros((28, 28)), (w, h))
    assert cmap.shape == (224, 224)
    fx, fy = c.map_to_frame_xy([0, 224], [0, 224], (w, h))
    assert fx == pytest.approx([left, right]) and fy == pytest.approx([top, bottom])


def test_frame_map_batch_and_errors():
    g = choose_geometry([(400, 100)])
    grids = np.random.default_rng(0).random((3, 32, 128)).astype(np.float32)
    maps = g.frame_map(grids, (400, 100), sigma=0)
    assert maps.shape == (3, 100, 400)
    np.testing.assert_allclose(maps[1], g.frame_map(grids[1], (400, 100), sigma=0))
    with pytest.raises(InputError, match="does not have the aspect"):
        g.frame_map(np.zeros((32, 32)), (400, 100))
    with pytest.raises(InputError, match="does not match the frame"):
        g.eval_mask(np.zeros((100, 399), bool), (400, 100))


def test_tile_boxes_cover_input_with_overlap():
    for frame, resize, tile, overlap in [((3000, 2000), 1024, 512, 64), ((4000, 1000), 512, 256, 32),
                                         ((1000, 1000), 512, 512, 0), ((700, 500), 512, 224, 100)]:
        g = choose_geometry([frame], resize=resize, tile=tile, tile_overlap=overlap)
        H, W = g.input_size
        boxes = g.tile_boxes()
        assert boxes == sorted(boxes)  # row-major: tile index = row * ncols + col
        cover = np.zeros((H, W), int)
        for top, left, bottom, right in boxes:
            assert bottom - top == tile and right - left == tile
            assert top % 16 == 0 and left % 16 == 0 and bottom <= H and right <= W
            cover[top:bottom, left:right] += 1
        assert cover.min() >= 1
        for axis in (0, 1):
            starts = sorted({b[axis] for b in boxes})
            assert starts[0] == 0 and starts[-1] + tile == (H, W)[axis]
            assert all(tile - (b - a) >= overlap for a, b in zip(starts, starts[1:]))
    assert choose_geometry([(300, 300)]).tile_boxes() == [(0, 0, 256, 256)]


def test_stitch_places_tiles():
    g = choose_geometry([(2000, 1000)], resize=256, tile=256, tile_overlap=32)  # input 256 x 512
    boxes = g.tile_boxes()
    assert boxes == [(0, 0, 256, 256), (0, 128, 256, 384), (0, 256, 256, 512)]
    assert g.grid_shape((32, 32)) == (32, 64)
    # tiles span cells 0..31, 16..47 and 32..63
    consts = np.stack([np.full((32, 32), v, np.float32) for v in (2.0, 1.0, 3.0)])
    out = g.stitch(consts)
    assert out.shape == (32, 64)
    np.testing.assert_array_equal(out[:, :32], 2.0)  # tile 0, and its overlap with tile 1: max(2, 1)
    np.testing.assert_array_equal(out[:, 32:], 3.0)  # tile 2, and its overlap with tile 1: max(1, 3)
    mean = g.stitch(consts, reduce="mean")
    np.testing.assert_allclose(mean[0, [0, 20, 40, 60]], [2.0, 1.5, 2.0, 3.0])
    corner = np.zeros((3, 32, 32), np.float32)
    corner[2, 31, 31] = 7.0  # bottom-right cell of the last tile
    stitched = g.stitch(corner)
    assert np.unravel_index(np.argmax(stitched), stitched.shape) == (31, 63)
    # the pixels-per-cell factor comes from the tile grid: a stride-16 grid (16 cells) works too
    assert g.grid_shape((16, 16)) == (16, 32) and g.stitch(np.ones((3, 16, 16))).shape == (16, 32)
    with pytest.raises(InputError, match=r"expects \(3, gh, gw"):
        g.stitch(np.zeros((2, 32, 32)))
    with pytest.raises(InputError, match="does not align"):
        g.grid_shape((30, 30))


def test_tiled_real_embedder_stitches_to_grid_shape():
    from patchsearch.features import PatchEmbedder

    g = choose_geometry([(384, 224)], resize=224, tile=224, tile_overlap=32)
    assert g.input_size == (224, 384) and len(g.tile_boxes()) == 2
    x = g.frame_tensor(_noise_image(384, 224))
    assert x.shape == (2, 3, 224, 224)
    emb = PatchEmbedder()(x).numpy()
    GH, GW = g.grid_shape(emb.shape[1:3])
    assert (GH, GW) == (28, 48)
    grid = g.stitch(emb, reduce="mean")
    assert grid.shape == (GH, GW, emb.shape[-1])
    np.testing.assert_array_equal(grid[:, :20], emb[0][:, :20])     # left of the overlap: tile 0
    np.testing.assert_array_equal(grid[:, 28:], emb[1][:, 8:])      # right of the overlap: tile 1
    scores = g.stitch(np.linalg.norm(emb, axis=-1))
    assert g.frame_map(scores, (384, 224)).shape == (224, 384)


def _cell_means(t, cell=8):
    """Channel-0 means over cell x cell blocks of a (1, 3, H, W) input: a stand-in patch grid."""
    x = t[0, 0].numpy()
    H, W = x.shape
    return x.reshape(H // cell, cell, W // cell, cell).mean(axis=(1, 3))


@pytest.mark.parametrize("frame", [(330, 160), (160, 330)])
def test_turned_frame_defect_maps_back_to_its_place(frame):
    """A landscape frame for a portrait input (and the reverse) is turned counter-clockwise
    before it is resized: the input is the frame turned with PIL's ROTATE_90, and the
    anomaly map, the input-to-frame coordinates and patch boxes all land on the defect's
    place in the unturned frame. A wrong direction or axis puts them elsewhere."""
    from patchsearch.report import patch_box

    w, h = frame
    other = (h, w)
    g = choose_geometry([other, other, frame], orient="auto")  # the majority has the other orientation
    assert g.turned(frame) and not g.turned(other)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[20:40, w - 60:w - 30] = 255  # defect near the top-right corner of the frame
    img = Image.fromarray(arr)
    t = g.frame_tensor(img)
    H, W = g.input_size
    assert t.shape == (1, 3, H, W)
    fixed = Geometry("frame", g.input_size, g.resize)
    torch.testing.assert_close(t, fixed.frame_tensor(img.transpose(Image.Transpose.ROTATE_90)), rtol=0, atol=0)
    grid = _cell_means(t)
    amap = g.frame_map(grid, frame, sigma=0)
    assert amap.shape == (h, w)
    ys, xs = np.nonzero(amap > 0.5 * amap.max())
    assert 20 - 6 <= ys.min() and ys.max() <= 40 + 6 and w - 60 - 6 <= xs.min() and xs.max() <= w - 30 + 6
    # the hottest cells' boxes on the frame lie on the defect (x in [w - 60, w - 30), y in [20, 40))
    for row, col in zip(*np.nonzero(grid == grid.max())):
        left, top, right, bottom = patch_box(g, grid.shape, frame, 0, int(row), int(col), context=0)
        assert w - 60 <= left < right <= w - 30 and 20 <= top < bottom <= 40
        cx, cy = g.input_to_frame_xy((col + 0.5) * 8, (row + 0.5) * 8, frame)
        assert left < cx < right and top < cy < bottom
    # the input's corners land on the frame's corners
    xs, ys = g.input_to_frame_xy([0, W], [0, H], frame)
    assert sorted(xs) == pytest.approx([0, w]) and sorted(ys) == pytest.approx([0, h])

