"""Frame headers: format allow-list, pixel budget, decode cost (patchsearch.frameinfo via data)."""

import io

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from patchsearch import data
from patchsearch.data import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, FrameInfo, decode_cost_bytes, probe_frame
from patchsearch.errors import FrameTooLargeError, InputError, UnsupportedFormatError

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\nshowpage\n"


@pytest.mark.parametrize("ext, fmt, mode, bits, nbytes", [
    ("png", "PNG", "RGB", 8, 4), ("jpg", "JPEG", "RGB", 8, 4), ("bmp", "BMP", "RGB", 8, 4),
    ("tif", "TIFF", "RGB", 8, 4), ("webp", "WEBP", "RGB", 8, 4), ("ppm", "PPM", "RGB", 8, 4),
    ("pgm", "PPM", "L", 8, 1)])
def test_probe_reads_the_header_of_each_allowed_format(tmp_path, ext, fmt, mode, bits, nbytes):
    img = Image.new(mode, (40, 24), 90)
    img.save(tmp_path / f"f.{ext}")
    info = probe_frame(tmp_path / f"f.{ext}")
    assert info == FrameInfo(fmt, 40, 24, mode, bits, len(mode) if mode != "L" else 1, nbytes)
    assert fmt in ALLOWED_FORMATS and info.pixels == 960
    assert probe_frame((tmp_path / f"f.{ext}").read_bytes()) == info  # bytes, as a service receives them


def test_probe_high_bit_depth_modes(tmp_path):
    Image.fromarray(np.zeros((20, 30), np.uint16)).save(tmp_path / "d.png")
    Image.fromarray(np.zeros((20, 30), np.float32)).save(tmp_path / "f.tif")
    for name, expect in (("d.png", ("I;16", 16, 1, 2)), ("f.tif", ("F", 32, 1, 4))):
        info = probe_frame(tmp_path / name)
        assert (info.mode, info.bits, info.bands, info.bytes_per_pixel) == expect


def test_probe_decodes_no_pixel(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("probe_frame decoded pixels"))
    assert probe_frame(tmp_path / "a.png").width == 64


def test_eps_never_reaches_its_decoder(tmp_path, monkeypatch):
    (tmp_path / "x.eps").write_bytes(EPS)
    (tmp_path / "x.png").write_bytes(EPS)  # the extension does not matter
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: pytest.fail("EPS plugin opened"))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript called"))
    for name in ("x.eps", "x.png"):
        with pytest.raises(UnsupportedFormatError, match=f"{name}: PostScript/EPS frames are not accepted"):
            probe_frame(tmp_path / name)
        with pytest.raises(UnsupportedFormatError, match=name):
            data.load_image(tmp_path / name)
    with pytest.raises(UnsupportedFormatError, match="upload: PostScript"):
        data.decode_image(EPS, name="upload")


def test_other_formats_and_non_images_are_unsupported(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.gif")
    with pytest.raises(UnsupportedFormatError, match="a.gif: GIF frames are not accepted.*PNG"):
        probe_frame(tmp_path / "a.gif")
    (tmp_path / "t.png").write_text("not an image at all")
    with pytest.raises(UnsupportedFormatError, match="t.png: not a readable image in an accepted format"):
        probe_frame(tmp_path / "t.png")


def test_too_large_is_refused_from_the_header(tmp_path, monkeypatch):
    Image.new("L", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(FrameTooLargeError, match=r"big.png: image is 300x200 = 60000 pixels, larger than "
                                                 r"the 59999 pixel limit") as err:
        probe_frame(tmp_path / "big.png", max_pixels=59999)
    assert (err.value.width, err.value.height, err.value.limit) == (300, 200, 59999)
    assert err.value.path.endswith("big.png") and isinstance(err.value, InputError)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("a frame over the budget was decoded"))
    with pytest.raises(FrameTooLargeError):
        data.load_image(tmp_path / "big.png", max_pixels=59999)
    assert probe_frame(tmp_path / "big.png", max_pixels=60000).pixels == 60000
    assert 40_000_000 <= DEFAULT_MAX_PIXELS < 9900 * 9900


def test_unreadable_headers_are_input_errors(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "sig.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    Image.new("L", (8, 40)).save(tmp_path / "thin.png")
    for name, match in (("zero.png", "empty file"), ("sig.png", "not a readable image"),
                        ("thin.png", "image is 8x40, smaller than 16 pixels"), ("none.png", "no such file")):
        with pytest.raises(InputError, match=f"{name}: {match}") as err:
            probe_frame(tmp_path / name)
        assert not isinstance(err.value, (UnsupportedFormatError, FrameTooLargeError))


def test_probe_accepts_a_file_object(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (50, 20)).save(buf, "PNG")
    buf.seek(0)
    assert probe_frame(buf, name="cam1").width == 50
    with pytest.raises(UnsupportedFormatError, match="cam2: PostScript"):
        probe_frame(io.BytesIO(EPS), name="cam2")


def test_decode_cost_bounds_the_decoded_frame():
    rgb = FrameInfo("PNG", 9000, 7000, "RGB", 8, 3, 4)
    gray16 = FrameInfo("TIFF", 9000, 7000, "I;16", 16, 1, 2)
    for info in (rgb, gray16):
        worst = decode_cost_bytes(info)
        assert worst >= info.pixels * info.bytes_per_pixel
        assert decode_cost_bytes(info, (256, 256)) < worst  # reduced right after decoding
    assert decode_cost_bytes(rgb, (256, 256)) < 2 * rgb.pixels * 4
    assert decode_cost_bytes(FrameInfo("PNG", 100, 100, "L", 8, 1, 1)) < decode_cost_bytes(rgb)
