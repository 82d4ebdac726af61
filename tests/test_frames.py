"""Frame headers: format allow-list, pixel budget, decode cost (patchsearch.frameinfo via data)."""

import io

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from patchsearch import data
from patchsearch.data import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, FrameInfo, decode_cost_bytes, probe_frame
from patchsearch.geometry import choose_geometry, crop_geometry
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
        assert decode_cost_bytes(info, crop_geometry(256, 224)) < worst  # reduced right after decoding
    assert decode_cost_bytes(rgb, choose_geometry([(900, 700)])) < 2 * rgb.pixels * 4
    assert decode_cost_bytes(FrameInfo("PNG", 100, 100, "L", 8, 1, 1)) < decode_cost_bytes(rgb)


def _textured(h, w, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 40, (h // 40 + 1, w // 40 + 1, 3))
    img = np.kron(base, np.ones((40, 40, 1)))[:h, :w] + rng.normal(0, 5, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("ext", ["jpg", "png", "tif"])
@pytest.mark.parametrize("kind", ["frame", "crop", "turned"])
def test_large_frames_are_reduced_right_after_decoding(tmp_path, monkeypatch, ext, kind):
    """A frame 6+ times the input is decoded at reduced scale (JPEG) or box-reduced right
    after decoding, and gives about the input the full-size path gave."""
    from PIL import JpegImagePlugin

    from patchsearch.frames import prepare_frame

    path = tmp_path / f"big.{ext}"
    Image.fromarray(_textured(1800, 2400)).save(path, quality=95)
    geometry = {"frame": choose_geometry([(400, 300)], resize=96), "crop": crop_geometry(96, 80),
                "turned": choose_geometry([(300, 400)], resize=96, orient="auto")}[kind]
    seen = {"draft": [], "reduce": []}
    draft, reduce = JpegImagePlugin.JpegImageFile.draft, Image.Image.reduce
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: seen["draft"].append(size) or draft(self, mode, size))
    monkeypatch.setattr(Image.Image, "reduce", lambda self, f, box=None: seen["reduce"].append(f) or reduce(self, f, box))
    tensor, size = prepare_frame(path, geometry)
    assert size == (2400, 1800) and tensor.shape == (1, 3) + geometry.input_size
    if ext == "jpg":
        assert seen["draft"]  # decoded at 1/2 .. 1/8 scale
    else:
        assert seen["reduce"] and min(min(f) for f in seen["reduce"]) >= 2
    monkeypatch.undo()
    full = geometry.frame_tensor(data.load_image(path))
    diff = (tensor - full).abs()
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.15  # ImageNet-normalised units


def test_ordinary_frames_are_prepared_as_before(tmp_path):
    from patchsearch.frames import prepare_frame

    Image.fromarray(_textured(300, 400)).save(tmp_path / "a.png")
    Image.fromarray(_textured(300, 400)[..., 0]).save(tmp_path / "g.jpg")
    for geometry in (choose_geometry([(400, 300)], resize=96), crop_geometry(96, 80)):
        for name in ("a.png", "g.jpg"):
            tensor, size = prepare_frame(tmp_path / name, geometry)
            assert size == (400, 300)
            assert (tensor == geometry.frame_tensor(data.load_image(tmp_path / name))).all()


@pytest.mark.parametrize("value, reason", [(np.nan, "non_finite_pixels"), (np.inf, "non_finite_pixels"),
                                           (-np.inf, "non_finite_pixels"), (-0.01, "out_of_range_pixels"),
                                           (1.01, "out_of_range_pixels")])
def test_float_frames_with_unjudgeable_values_are_refused(tmp_path, value, reason):
    from patchsearch.frames import PixelValueError, error_reason, prepare_frame

    a = np.full((40, 40), 0.5, np.float32)
    a[3, 30] = value
    Image.fromarray(a, mode="F").save(tmp_path / "f.tif")
    for call in (lambda: data.load_image(tmp_path / "f.tif"),
                 lambda: prepare_frame(tmp_path / "f.tif", crop_geometry(32, 32))):
        with pytest.raises(PixelValueError, match="f.tif") as err:
            call()
        assert err.value.reason == reason and error_reason(err.value) == reason
    a[3, 30] = 1.0
    Image.fromarray(a, mode="F").save(tmp_path / "ok.tif")
    assert (np.asarray(data.load_image(tmp_path / "ok.tif"))[3, 30] == 255).all()


def test_integer_frames_above_full_scale_or_negative_are_refused(tmp_path):
    from patchsearch.frames import PixelValueError

    deep = np.full((40, 40), 1000, np.uint16)
    deep[0, 0] = 4096  # above a 12-bit camera's full scale
    Image.fromarray(deep).save(tmp_path / "d.png")
    with pytest.raises(PixelValueError, match="d.png: pixel values 1000..4096 are out of range.*4095") as err:
        data.load_image(tmp_path / "d.png", 12)
    assert err.value.reason == "out_of_range_pixels"
    assert (np.asarray(data.load_image(tmp_path / "d.png", 16))[1:] == 4).all()  # fine for a 16-bit camera
    i32 = np.full((40, 40), 500, np.int32)
    i32[5, 5] = -1
    Image.fromarray(i32, mode="I").save(tmp_path / "i.tif")
    with pytest.raises(PixelValueError, match="i.tif") as err:
        data.load_image(tmp_path / "i.tif")
    assert err.value.reason == "out_of_range_pixels"


def test_error_reasons_of_the_dataset(tmp_path):
    (tmp_path / "x.eps").write_bytes(EPS)
    a = np.full((40, 40), 0.5, np.float32)
    a[0, 0] = np.nan
    Image.fromarray(a, mode="F").save(tmp_path / "n.tif")
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    ds = data.ImageDataset([tmp_path / n for n in ("x.eps", "n.tif", "big.png", "ok.png")], crop_geometry(32, 32),
                           max_pixels=50_000)
    batch = data.collate([ds[i] for i in range(4)])
    assert batch.good == [3] and batch.reasons == {0: "unsupported_format", 1: "non_finite_pixels", 2: "too_large"}
    assert all(n in batch.errors[i] for i, n in enumerate(("x.eps", "n.tif", "big.png")))


@pytest.mark.parametrize("mode", ["P", "1", "LA", "RGBA", "CMYK"])
def test_reduced_path_takes_every_mode(tmp_path, mode):
    from patchsearch.frames import prepare_frame

    img = Image.fromarray(_textured(1200, 1500)).convert(mode)
    ext = "tif" if mode == "CMYK" else "png"
    img.save(tmp_path / f"m.{ext}")
    geometry = choose_geometry([(500, 400)], resize=64)
    tensor, size = prepare_frame(tmp_path / f"m.{ext}", geometry)
    full = geometry.frame_tensor(data.load_image(tmp_path / f"m.{ext}"))
    assert size == (1500, 1200) and float((tensor - full).abs().mean()) < 0.03
