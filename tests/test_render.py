import os

import numpy as np
import pytest
from PIL import Image

from patchsearch import render
from patchsearch.errors import InputError
from patchsearch.render import BOX_COLOUR, heatmap_rgb, overlay, read_raw_map, save_png, write_raw_map


def frame(seed=0, shape=(40, 60)):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_heatmap_scale_is_anchored_on_the_threshold():
    t = 2.0
    values = np.array([[0.0, 0.5 * t, 0.75 * t, 0.875 * t, t, 2 * t, 10 * t]])
    rgb = heatmap_rgb(values, t)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 7, 3)
    assert rgb[0].tolist() == [[0, 0, 128], [0, 0, 128], [0, 220, 255], [255, 230, 0], [255, 0, 0],
                               [170, 0, 0], [170, 0, 0]]
    assert heatmap_rgb(values, t, vmax=4 * t)[0, 5].tolist() == [227, 0, 0]   # 2 t: a third of red -> dark red


def test_same_value_same_colour_in_every_frame():
    t = 1.0
    calm = np.full((20, 20), 0.7)
    calm[5, 5] = 0.9
    loud = np.random.default_rng(0).random((20, 20)) * 30.0     # a per-image normalisation would differ
    loud[5, 5] = 0.9
    assert heatmap_rgb(calm, t)[5, 5].tolist() == heatmap_rgb(loud, t)[5, 5].tolist()
    a, b = frame(1, (20, 20)), frame(1, (20, 20))
    assert overlay(a, calm, t)[5, 5].tolist() == overlay(b, loud, t)[5, 5].tolist()


def test_overlay_leaves_good_areas_and_marks_defects_red():
    image, t = frame(), 1.5
    amap = np.random.default_rng(2).random((40, 60)) * 0.5 * t   # all <= 0.5 t
    assert np.array_equal(overlay(image, amap, t), image)
    gray = np.full((40, 60, 3), 128, np.uint8)
    amap[10:20, 30:45] = 1.2 * t
    out = overlay(gray, amap, t)
    blob = out[10:20, 30:45].reshape(-1, 3).astype(int)
    assert (blob[:, 0] > blob[:, 1] + 80).all() and (blob[:, 0] > blob[:, 2] + 80).all()
    assert np.array_equal(out[:10], gray[:10])
    assert np.array_equal(overlay(gray, amap, t, alpha=0.0), gray)
    # opacity alpha * ((v - 0.5) / 0.5) ** 2: a quarter of alpha at 0.75 t (cyan, 0 220 255)
    mid = overlay(gray, np.full((40, 60), 0.75 * t), t, alpha=0.8)[0, 0]
    assert mid.tolist() == [round(0.8 * 128), round(0.8 * 128 + 0.2 * 220), round(0.8 * 128 + 0.2 * 255)]


def test_region_outlines_are_drawn_at_the_bbox():
    image = np.full((30, 40, 3), 50, np.uint8)
    out = overlay(image, np.zeros((30, 40)), 1.0, regions=[{"bbox": [5, 6, 15, 12]}])
    is_box = (out == BOX_COLOUR).all(axis=-1)
    expected = np.zeros((30, 40), bool)
    expected[6:12, 5:15] = True
    expected[8:10, 7:13] = False                             # 2-pixel outline inside the box
    assert np.array_equal(is_box, expected)
    assert np.array_equal(out[~expected], image[~expected])


def test_render_errors():
    with pytest.raises(InputError, match="NaN"):
        heatmap_rgb(np.full((2, 2), np.nan), 1.0)
    with pytest.raises(InputError, match="threshold"):
        heatmap_rgb(np.zeros((2, 2)), 0.0)
    with pytest.raises(InputError, match="vmax"):
        heatmap_rgb(np.zeros((2, 2)), 1.0, vmax=1.0)
    with pytest.raises(InputError, match="uint8"):
        overlay(np.zeros((4, 4, 3)), np.zeros((4, 4)), 1.0)
    with pytest.raises(InputError, match="does not match"):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5)), 1.0)


def test_raw_map_round_trip(tmp_path):
    amap = np.random.default_rng(3).gamma(2.0, 1.5, (33, 47)).astype(np.float32)
    amap[0, :3] = [0.0, 70.0, -1.0]                          # 70 and -1 clip in a PNG
    write_raw_map(tmp_path / "m.npy", amap)
    assert np.array_equal(read_raw_map(tmp_path / "m.npy"), amap)
    write_raw_map(tmp_path / "m.png", amap)
    with Image.open(tmp_path / "m.png") as png:
        assert png.mode.startswith("I") and np.asarray(png).max() == 65535   # 16-bit
    back = read_raw_map(tmp_path / "m.png")
    assert back.dtype == np.float32 and back.shape == amap.shape
    assert np.abs(back - np.clip(amap, 0, 65.535)).max() <= 0.0005 + 1e-6
    assert back[0, :3].tolist() == pytest.approx([0.0, 65.535, 0.0])
    write_raw_map(tmp_path / "coarse.png", amap, png_scale=10.0)         # the scale travels with the file
    assert np.abs(read_raw_map(tmp_path / "coarse.png") - np.clip(amap, 0, 6553.5)).max() <= 0.05 + 1e-5
    assert sorted(os.listdir(tmp_path)) == ["coarse.png", "m.npy", "m.png"]  # no temporary file left


def test_raw_map_errors(tmp_path):
    with pytest.raises(InputError, match=".npy or .png"):
        write_raw_map(tmp_path / "m.tif", np.zeros((2, 2)))
    with pytest.raises(InputError, match="NaN"):
        write_raw_map(tmp_path / "m.png", np.full((2, 2), np.nan))
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "plain.png")
    with pytest.raises(InputError, match="not a patchsearch raw map"):
        read_raw_map(tmp_path / "plain.png")
    assert sorted(os.listdir(tmp_path)) == ["plain.png"]


def test_writes_are_atomic(tmp_path):
    target = tmp_path / "map.npy"
    write_raw_map(target, np.ones((3, 3)))
    before = target.read_bytes()

    def broken(f):
        f.write(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        render._atomic_write(target, broken)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["map.npy"]
    write_raw_map(target, np.zeros((5, 5)))                  # replaces the old file whole
    assert np.array_equal(read_raw_map(target), np.zeros((5, 5)))
    save_png(tmp_path / "o.png", frame())
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png")), frame())
