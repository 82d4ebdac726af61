"""How a frame becomes backbone input, and how patch scores go back onto the frame.

Two modes, chosen once per category at build (:func:`choose_geometry`):

* ``"frame"``: every frame is resized (bilinear, antialiased; aspect squashed to the
  category's size) to one ``input_size`` (H, W) whose shorter side is ``resize`` and
  whose aspect ratio is the median of the training frames', both sides multiples of
  ``stride``. Nothing is cut off. Optionally the input is cut into ``tile`` x ``tile``
  tiles overlapping by at least ``tile_overlap`` pixels, embedded separately and
  stitched back (:meth:`Geometry.stitch`). With ``orient="auto"`` (opt-in,
  ``patchsearch build --orient auto``) a frame whose longer side lies across the input's longer side
  (a landscape frame for a portrait input, or the reverse) is first turned 90 degrees
  counter-clockwise, so that it is squashed less; its map is turned back
  (:meth:`Geometry.turned`). Square frames and square inputs are never turned.
* ``"crop"``: the paper protocol (PatchCore: resize the shorter side to ``resize``,
  centre-crop ``crop`` x ``crop``), for MVTec AD comparisons. Borders are not seen.

Coordinate conventions (all in pixels; a point (x, y) is continuous, pixel i spans [i, i+1)):

* input pixels: the resized (frame mode) or cropped (crop mode) backbone input, (H, W)
  = ``input_size``; tile boxes are (top, left, bottom, right) in these pixels.
* patch grid: (GH, GW) cells of the whole input, one cell = ``input / grid`` pixels.
* map pixels: what :meth:`Geometry.frame_map` and :meth:`Geometry.eval_mask` return.
  Frame mode: the original frame, (h, w) - map pixel (x, y) is frame pixel (x, y).
  Crop mode: the crop, (crop, crop) - map pixel (x, y) is frame pixel
  ``crop_box[:2] + (x, y) * scale``; use :meth:`Geometry.map_to_frame_xy`.
* a turned frame (w, h) is the input resized from the frame turned counter-clockwise,
  which is h wide and w high: turned pixel (x', y') is frame pixel (w - y', x');
  :meth:`Geometry.input_to_frame_xy` maps input pixels onto the frame, turning included.

Errors are :class:`patchsearch.errors.InputError`. torch is imported only inside functions.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

import numpy as np

from .errors import InputError

STRIDE = 16
TILE_OVERLAP = 32
MODES = ("frame", "crop")
ORIENTS = ("auto", "fixed")  # the choices of ``patchsearch build --orient``


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def _whole(name: str, value, minimum: int = 1) -> int:
    """``value`` as int if it is a whole number >= ``minimum``, else InputError naming ``name``."""
    _check(not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= minimum,
           f"{name} must be a whole number of pixels >= {minimum}, got {value!r}")
    return int(value)


def _frame_size(frame_size) -> tuple[int, int]:
    _check(isinstance(frame_size, (tuple, list, np.ndarray)) and len(frame_size) == 2,
           f"frame size must be (width, height), got {frame_size!r}")
    return _whole("frame width", frame_size[0]), _whole("frame height", frame_size[1])


def _nearest(value: float, stride: int) -> int:
    """The multiple of ``stride`` nearest to ``value`` (halves round up)."""
    return int(math.floor(value / stride + 0.5)) * stride


def _tile_starts(length: int, tile: int, overlap: int, stride: int) -> list[int]:
    """Evenly spaced tile starts, multiples of ``stride``, first 0, last ``length - tile``,
    with every step at most ``tile - overlap`` (fewest tiles that achieve it)."""
    span = length - tile
    if span == 0:
        return [0]
    n = 2
    while True:
        starts = [_nearest(i * span / (n - 1), stride) for i in range(n)]
        if max(b - a for a, b in zip(starts, starts[1:])) <= tile - overlap:
            return starts
        n += 1  # ends by n - 1 = span / stride (all steps = stride <= tile - overlap)


@dataclass(frozen=True)
class Geometry:
    """Preprocessing geometry of one category (see the module docstring for coordinates).

    Attributes:
        mode: ``"frame"`` (whole frame resized to ``input_size``) or ``"crop"`` (paper protocol).
        input_size: (H, W) of the backbone input in pixels (crop mode: (crop, crop)).
        resize: shorter side of the resized frame, pixels.
        crop: side of the centre crop (crop mode), None in frame mode.
        tile: side of the square tiles in input pixels, or None (no tiling; frame mode only).
        tile_overlap: minimum overlap of neighbouring tiles, pixels.
        stride: frame-mode input sizes and tile sizes / starts are multiples of it.
        orient: ``"fixed"`` (frames are never turned; manifests without the key) or
            ``"auto"`` (frame mode only: :meth:`turned` frames are turned 90 degrees first).

    Raises InputError on inconsistent or non-positive values (the message names them).
    """

    mode: str
    input_size: tuple[int, int]
    resize: int
    crop: int | None = None
    tile: int | None = None
    tile_overlap: int = TILE_OVERLAP
    stride: int = STRIDE
    orient: str = "fixed"

    def __post_init__(self):
        _check(self.mode in MODES, f"geometry mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check(self.orient in ORIENTS, f"--orient must be one of {', '.join(ORIENTS)}, got {self.orient!r}")
        _check(self.mode == "frame" or self.orient == "fixed",
               "crop mode (the paper protocol) never turns frames: orient must be 'fixed'")
        stride, resize = _whole("stride", self.stride), _whole("--resize", self.resize)
        if self.mode == "crop":
            crop = _whole("--crop", self.crop)
            _check(crop <= resize, f"--crop {crop} is larger than --resize {resize}")
            _check(self.tile is None, "--tile cannot be combined with --crop (crop mode is the paper protocol)")
        size = tuple(self.input_size) if isinstance(self.input_size, (tuple, list)) else ()
        _check(len(size) == 2, f"input size must be (height, width), got {self.input_size!r}")
        size = tuple(_whole("input size", v) for v in size)
        object.__setattr__(self, "input_size", size)
        if self.mode == "crop":
            _check(size == (crop, crop), f"crop mode input size must be ({crop}, {crop}), got {size}")
        else:
            _check(self.crop is None, f"frame mode has no crop, got crop={self.crop!r}")
            _check(not any(v % stride for v in size), f"input size {size} is not a multiple of stride {stride}")
        overlap = _whole("--tile-overlap", self.tile_overlap, 0)
        if self.tile is not None:
            tile = _whole("--tile", self.tile)
            _check(tile % stride == 0, f"--tile {tile} is not a multiple of stride {stride}")
            _check(tile <= min(size), f"--tile {tile} is larger than the input {size[0]}x{size[1]} "
                                      f"(raise --resize or lower --tile)")
            _check(overlap <= tile - stride, f"--tile-overlap {overlap} is too large for --tile {tile}: "
                                             f"at most tile - stride = {tile - stride}")
        for name in ("resize", "crop", "tile", "tile_overlap", "stride"):  # numpy ints -> JSON-safe ints
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else _whole(name, value, 0))

    def to_dict(self) -> dict:
        """JSON-safe dict (ints, lists, None) for the manifest."""
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        """Inverse of :meth:`to_dict`; also reads the old form ``{"resize": 256, "crop": 224}``
        (crop mode). Raises InputError: not a dict, unknown or missing keys, invalid values."""
        _check(isinstance(d, dict), f"geometry must be a dict, got {type(d).__name__}")
        if "mode" not in d:  # old manifests: resize + centre crop only
            _check(set(d) <= {"resize", "crop"}, f"old-form geometry has unknown keys: {d}")
            return crop_geometry(d.get("resize", 256), d.get("crop", 224))
        _check(set(d) <= set(cls.__dataclass_fields__) and {"input_size", "resize"} <= set(d),
               f"geometry dict has unknown keys or lacks input_size/resize: {d}")
        return cls(**d)

    def tile_boxes(self) -> list[tuple[int, int, int, int]]:
        """Tiles as (top, left, bottom, right) input pixels, row-major (tile index = row * ncols + col).

        One box, the whole input, without tiling. Neighbouring tiles overlap by at least
        ``tile_overlap`` pixels; the boxes cover the input exactly.
        """
        H, W = self.input_size
        if self.tile is None:
            return [(0, 0, H, W)]
        t = self.tile
        rows = _tile_starts(H, t, self.tile_overlap, self.stride)
        cols = _tile_starts(W, t, self.tile_overlap, self.stride)
        return [(r, c, r + t, c + t) for r in rows for c in cols]

    def turned(self, frame_size) -> bool:
        """Whether a frame of ``frame_size`` (width, height) is turned 90 degrees
        counter-clockwise before it is resized: ``orient="auto"``, neither the frame nor the
        input square, and the frame's longer side across the input's longer side."""
        w, h = _frame_size(frame_size)
        H, W = self.input_size
        return self.orient == "auto" and H != W and w != h and (w > h) != (W > H)

    def _fit(self, t, interpolation):
        """uint8 (C, h, w) frame tensor -> (C, H, W) input: resize (+ centre crop in crop mode)."""
        from torchvision.transforms import v2

        if self.mode == "crop":
            t = v2.functional.resize(t, [self.resize], interpolation=interpolation, antialias=True)
            return v2.functional.center_crop(t, [self.crop, self.crop])
        return v2.functional.resize(t, list(self.input_size), interpolation=interpolation, antialias=True)

    def frame_tensor(self, img):
        """RGB PIL image -> ImageNet-normalised float32 tensor (T, 3, th, tw), one row per tile.

        T = 1 and (th, tw) = ``input_size`` without tiling, else (tile, tile) in
        :meth:`tile_boxes` order. A :meth:`turned` frame is turned before it is resized.
        Crop mode equals the former ``data.Geometry.image_tensor``.
        """
        import torch
        from torchvision.transforms import v2

        from .frameinfo import IMAGENET_MEAN, IMAGENET_STD

        if img.mode != "RGB":
            img = img.convert("RGB")
        t = v2.functional.pil_to_tensor(img)
        if self.turned(img.size):
            t = torch.rot90(t, 1, dims=(1, 2))  # counter-clockwise, as PIL's ROTATE_90
        t = self._fit(t, v2.InterpolationMode.BILINEAR)
        t = v2.functional.normalize(v2.functional.to_dtype(t, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
        return torch.stack([t[:, top:bottom, left:right] for top, left, bottom, right in self.tile_boxes()])

    def grid_shape(self, tile_grid) -> tuple[int, int]:
        """Patch grid (GH, GW) of the whole input from one tile's grid (gh, gw).

        The input pixels per patch cell are tile side / gh (8 for stride-8 layers:
        tile 224 -> 28). Without tiling the tile is the whole input and (gh, gw) is returned.
        Raises InputError if the tile grid does not divide the tile and the tile starts evenly.
        """
        gh, gw = (_whole("tile grid", v) for v in tile_grid)
        boxes = self.tile_boxes()
        if len(boxes) == 1:
            return gh, gw
        t = self.tile
        _check(t % gh == 0 and gh == gw and not any(v % (t // gh) for box in boxes for v in box),
               f"tile grid {gh}x{gw} does not align with tiles of {t} px at multiples of {self.stride}")
        f = t // gh
        return self.input_size[0] // f, self.input_size[1] // f

    def stitch(self, tile_scores, reduce: str = "max") -> np.ndarray:
        """Per-tile grids (T, gh, gw, ...) -> float32 grid (GH, GW, ...) of the whole input.

        Each tile's grid goes at (top, left) / (tile / gh) cells. Where tiles overlap,
        ``reduce="max"`` (default, for scores) keeps the highest: a detector must not dilute a
        defect that one tile sees well with a neighbour's lower score near its border;
        ``"mean"`` averages (for embeddings or smooth visualisation).
        Raises InputError: T differs from the number of tiles, bad shapes or ``reduce``.
        """
        s = np.asarray(tile_scores, dtype=np.float32)
        boxes = self.tile_boxes()
        _check(s.ndim >= 3 and s.shape[0] == len(boxes),
               f"stitch expects ({len(boxes)}, gh, gw, ...) tile grids, got shape {s.shape}")
        _check(reduce in ("max", "mean"), f"stitch reduce must be 'max' or 'mean', got {reduce!r}")
        GH, GW = self.grid_shape(s.shape[1:3])
        if len(boxes) == 1:
            return s[0].copy()
        gh, gw = s.shape[1:3]
        f = self.tile // gh
        out = np.full((GH, GW) + s.shape[3:], -np.inf if reduce == "max" else 0.0, np.float32)
        count = np.zeros((GH, GW) + (1,) * (s.ndim - 3), np.float32)
        for (top, left, _, _), grid in zip(boxes, s):
            cells = (slice(top // f, top // f + gh), slice(left // f, left // f + gw))
            if reduce == "max":
                np.maximum(out[cells], grid, out=out[cells])
            else:
                out[cells] += grid
                count[cells] += 1
        return out if reduce == "max" else out / count

    def frame_map(self, grid_scores, frame_size, sigma: float = 4.0, device: str | None = None) -> np.ndarray:
        """Patch-score grid (GH, GW), or (N, GH, GW) for N frames of one size -> float32 map(s).

        The grid is upsampled bilinearly to ``input_size`` and blurred there with a Gaussian
        of ``sigma`` input pixels (:func:`patchsearch.score.anomaly_maps`). Frame mode: then
        resized bilinearly to the frame, (h, w) for ``frame_size`` (w, h) (a :meth:`turned`
        frame's map to the turned frame, then turned back clockwise). Crop mode:
        returned as is, (crop, crop), covering only :meth:`crop_box` of the frame.
        ``device``: the torch device the upsampling and blur run on (default: the CPU).
        Raises InputError: bad frame size, or a grid without the input's aspect (e.g. an
        unstitched tile grid: pass :meth:`stitch`'s output).
        """
        from .score import anomaly_maps

        w, h = _frame_size(frame_size)
        g = np.asarray(grid_scores, dtype=np.float32)
        _check(g.ndim in (2, 3) and 0 not in g.shape, f"grid scores must be (GH, GW) or (N, GH, GW), got {g.shape}")
        (H, W), (GH, GW) = self.input_size, g.shape[-2:]
        _check(abs(GH * W / H - GW) <= 1,
               f"score grid {GH}x{GW} does not have the aspect of the input {H}x{W} (stitch tile grids first)")
        maps = self.map_to_frame(anomaly_maps(g.reshape(-1, GH, GW), (H, W), sigma, device=device), (w, h))
        return maps[0] if g.ndim == 2 else maps

    def map_to_frame(self, input_maps, frame_size) -> np.ndarray:
        """float32 (N, H, W) maps in input pixels (``input_size``) -> the maps
        :meth:`frame_map` returns, (N, h, w) for ``frame_size`` (w, h): resized once
        (bilinear) to the frame, a :meth:`turned` frame's turned back; crop mode: as is."""
        import torch
        import torch.nn.functional as F

        w, h = _frame_size(frame_size)
        maps = np.asarray(input_maps, dtype=np.float32)
        H, W = self.input_size
        turned = self.turned((w, h))
        mh, mw = (w, h) if turned else (h, w)  # the turned frame is h wide and w high
        if self.mode == "frame" and (mh, mw) != (H, W):
            t = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps))[:, None], size=(mh, mw), mode="bilinear",
                              align_corners=False)
            maps = t[:, 0].numpy()
        if turned:
            maps = np.ascontiguousarray(np.rot90(maps, -1, axes=(1, 2)))
        return maps

    def eval_mask(self, mask_img, frame_size) -> np.ndarray:
        """Ground-truth mask (PIL image or array (h, w), > 0 = defect) -> bool array in map pixels.

        Frame mode: the mask itself, (h, w). Crop mode: nearest resize + centre crop,
        (crop, crop), as the former ``data.Geometry.mask_array``.
        Raises InputError if the mask is not 2-D of the frame's size.
        """
        import torch
        from torchvision.transforms import v2

        w, h = _frame_size(frame_size)
        arr = np.asarray(mask_img.convert("L") if hasattr(mask_img, "convert") else mask_img)
        _check(arr.shape == (h, w), f"mask of shape {arr.shape} does not match the frame ({h}, {w})")
        if self.mode == "frame":
            return arr > 0
        t = torch.from_numpy((arr > 0).astype(np.uint8))[None]
        return self._fit(t, v2.InterpolationMode.NEAREST)[0].numpy() > 0

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in frame pixels of the region the map covers.

        Crop mode: the centre crop (torchvision Resize(int) + CenterCrop arithmetic);
        frame mode: the whole frame (0, 0, width, height).
        """
        w, h = _frame_size((width, height))
        if self.mode == "frame":
            return 0.0, 0.0, float(w), float(h)
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize * long / short)
        new_w, new_h = (self.resize, new_long) if w <= h else (new_long, self.resize)
        left = int(round((new_w - self.crop) / 2.0))
        top = int(round((new_h - self.crop) / 2.0))
        sx, sy = w / new_w, h / new_h
        return left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy

    def scale(self, frame_size) -> tuple[float, float]:
        """(sx, sy): frame pixels per map pixel; (1, 1) in frame mode."""
        w, h = _frame_size(frame_size)
        left, top, right, bottom = self.crop_box(w, h)
        map_w, map_h = (self.crop, self.crop) if self.mode == "crop" else (w, h)
        return (right - left) / map_w, (bottom - top) / map_h

    def map_to_frame_xy(self, x, y, frame_size):
        """Map-pixel coordinates (scalars or arrays, continuous) -> frame-pixel (x, y)."""
        left, top, _, _ = self.crop_box(*_frame_size(frame_size))
        sx, sy = self.scale(frame_size)
        return left + np.asarray(x, dtype=np.float64) * sx, top + np.asarray(y, dtype=np.float64) * sy

    def input_to_frame_xy(self, x, y, frame_size):
        """Input-pixel coordinates (scalars or arrays, continuous; the whole input, not a tile)
        -> frame-pixel (x, y) of a frame of ``frame_size`` (width, height): resized back, and
        turned back for a :meth:`turned` frame (its x then follows the input's y)."""
        w, h = _frame_size(frame_size)
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if self.mode == "crop":  # map pixels are crop (= input) pixels
            return self.map_to_frame_xy(x, y, (w, h))
        H, W = self.input_size
        if self.turned((w, h)):  # turned frame: h wide, w high; its (x', y') is frame (w - y', x')
            tx, ty = x * h / W, y * w / H
            return w - ty, tx
        return x * w / W, y * h / H


def crop_geometry(resize: int = 256, crop: int = 224) -> Geometry:
    """The paper protocol: shorter side ``resize``, centre crop ``crop`` x ``crop``."""
    return Geometry("crop", (crop, crop), resize, crop)


def choose_geometry(frame_sizes, resize: int = 256, crop: int | None = None, tile: int | None = None,
                    tile_overlap: int = TILE_OVERLAP, stride: int = STRIDE, orient: str = "fixed") -> Geometry:
    """One backbone input size for a category, from its training frames.

    ``frame_sizes``: (width, height) of each training frame. With ``crop``: crop mode
    (:func:`crop_geometry`; frame sizes and ``orient`` unused). Else frame mode: ratio =
    median of w / h; with ``orient="auto"`` the input is landscape if that median
    is >= 1, else portrait, and the ratio is the median again over the frames turned to
    that orientation (:meth:`Geometry.turned`); ``"fixed"`` (default) never turns a frame. The
    shorter input side is ``resize`` and the longer ``resize * ratio`` (or ``/ ratio``),
    both rounded to the nearest multiple of ``stride`` (at least ``stride``). ``tile``,
    ``tile_overlap``: see :class:`Geometry`; ``resize`` is then the shorter side of the whole
    resized frame, which the tiles cover.

    Raises:
        InputError: no frames, bad sizes, non-positive options, crop > resize, tile with
            crop, tile larger than the input, overlap too large for the tile, unknown orient.
    """
    if crop is not None:
        return Geometry("crop", (crop, crop), resize, crop, tile)
    resize, stride = _whole("--resize", resize), _whole("stride", stride)
    sizes = [_frame_size(s) for s in frame_sizes]
    _check(bool(sizes), "choose_geometry needs the size of at least one training frame")
    ratio = statistics.median(w / h for w, h in sizes)
    if orient == "auto":  # every frame turned to the majority's orientation
        landscape = ratio >= 1
        ratio = statistics.median(max(w, h) / min(w, h) if landscape else min(w, h) / max(w, h) for w, h in sizes)
    short = max(stride, _nearest(resize, stride))
    long = max(stride, _nearest(short * max(ratio, 1 / ratio), stride))
    size = (short, long) if ratio >= 1 else (long, short)
    return Geometry("frame", size, short, None, tile, tile_overlap, stride, orient)
