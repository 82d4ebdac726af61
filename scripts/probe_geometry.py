#!/usr/bin/env python
"""Frame sizes of an MVTec-layout category and the input geometry patchsearch would choose.

Reads image headers (and ground-truth masks) only; builds nothing and writes nothing.
Prints, per folder: frame count, width / height / aspect (w/h) ranges; then the geometry
:func:`patchsearch.geometry.choose_geometry` picks from ``train/good``, how much the
frame-mode resize distorts the aspect of each frame, and how much of each frame and of
each defect the paper's centre crop (``--crop``) sees.

    python scripts/probe_geometry.py [--root DIR/category] [--resize 256] [--crop 224]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from patchsearch.data import IMAGE_EXTENSIONS
from patchsearch.geometry import choose_geometry, crop_geometry

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile" / "magnetic_tile"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _sizes(paths) -> np.ndarray:
    out = []
    for p in paths:
        with Image.open(p) as img:
            out.append(img.size)
    return np.array(out, dtype=np.float64)  # (n, 2): width, height


def _q(values, qs=(0, 5, 25, 50, 75, 95, 100)) -> str:
    return " ".join(f"{v:6.2f}" for v in np.percentile(values, qs))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="category folder (train/, test/, ground_truth/)")
    ap.add_argument("--resize", type=int, default=256)
    ap.add_argument("--crop", type=int, default=224)
    args = ap.parse_args()
    root = args.root
    folders = [root / "train" / "good"] + sorted(p for p in (root / "test").iterdir() if p.is_dir())

    print(f"{'folder':16} {'n':>4}  {'width min/med/max':>18}  {'height min/med/max':>19}  "
          f"aspect w/h  p0     p5    p25    p50    p75    p95   p100")
    sizes = {}
    for folder in folders:
        wh = sizes[folder] = _sizes(_images(folder))
        w, h = wh[:, 0], wh[:, 1]
        print(f"{folder.parent.name + '/' + folder.name:16} {len(wh):4d}  {w.min():5.0f} {np.median(w):5.0f} "
              f"{w.max():5.0f}  {h.min():6.0f} {np.median(h):5.0f} {h.max():5.0f}  {'':10} {_q(w / h)}")

    train = sizes[folders[0]]
    ratio = train[:, 0] / train[:, 1]
    counts, edges = np.histogram(ratio, bins=[0, 0.5, 0.67, 0.83, 1.0, 1.2, 1.5, 2.0, 99])
    print("\ntrain/good aspect histogram (w/h): " +
          ", ".join(f"{lo:.2f}-{hi:.2f}: {c}" for lo, hi, c in zip(edges, edges[1:], counts)).replace("99.00", "inf"))
    print(f"long/short side ratio (orientation ignored): median {np.median(np.maximum(ratio, 1 / ratio)):.2f}")

    g = choose_geometry([tuple(map(int, s)) for s in train], resize=args.resize)
    H, W = g.input_size
    print(f"\nchoose_geometry(train/good, resize={args.resize}) -> input {H} x {W} (H x W), "
          f"median w/h {np.median(ratio):.3f} -> {W / H:.3f}, orient {g.orient}")
    print("frame mode, per folder: frames turned 90 degrees (orient auto); aspect distortion "
          "max(d, 1/d), d = (W/w)/(H/h) of the frame as turned [p50 p95 max]; "
          "crop mode: share of frame area in the crop [p50 min], share of defect pixels in the crop [sum]")
    crop = crop_geometry(args.resize, args.crop)
    for folder in folders:
        wh = sizes[folder]
        turned = np.array([g.turned((int(w), int(h))) for w, h in wh], bool)
        tw, th = np.where(turned, wh[:, 1], wh[:, 0]), np.where(turned, wh[:, 0], wh[:, 1])
        d = (W / tw) / (H / th)
        d = np.maximum(d, 1 / d)
        boxes = np.array([crop.crop_box(int(w), int(h)) for w, h in wh])
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (wh[:, 0] * wh[:, 1])
        line = (f"{folder.parent.name + '/' + folder.name:16} turned {turned.sum():4d}   "
                f"{np.median(d):5.2f} {np.percentile(d, 95):5.2f} "
                f"{d.max():5.2f}   crop area {np.median(area):5.2f} {area.min():5.2f}")
        gt = root / "ground_truth" / folder.name
        if gt.is_dir():
            inside = total = 0
            for p, (left, top, right, bottom) in zip(_images(folder), boxes):
                with Image.open(gt / f"{p.stem}_mask.png") as mask:
                    ys, xs = np.nonzero(np.asarray(mask.convert("L")) > 0)
                x, y = xs + 0.5, ys + 0.5  # pixel centres
                total += len(xs)
                inside += int(((x >= left) & (x <= right) & (y >= top) & (y <= bottom)).sum())
            line += f"   defect pixels in crop {inside / max(total, 1):5.2f}"
        print(line)


if __name__ == "__main__":
    main()
