#!/usr/bin/env python
"""End-to-end build and query times on MVTec AD bottle, per stage (this machine, CPU).

Builds the bottle index into a temporary directory with the default settings
(the default backbone, coreset ratio 0.1, flat) and reads the per-stage build times
from its manifest; then queries the 83 test images and times each query stage
per image: decode + preprocess, backbone + patch embedding, search + Eq. 7 score,
anomaly map.

    python scripts/bench_build.py [--index ivfpq]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import benchdata
from patchsearch import PatchIndex
from patchsearch.data import load_image, test_samples, train_images
from patchsearch.pipeline import build
from patchsearch.query import embedder_for, geometry_of


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default="flat", choices=["flat", "ivfpq"])
    ap.add_argument("--crop", type=int, default=None, help="the paper protocol instead of the whole frame")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    root = benchdata.data_root()
    train = train_images(root, "bottle")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        index = build(train, Path(tmp) / "bottle", category="bottle", index=args.index, crop=args.crop)
        total = time.perf_counter() - t
        tm = index.manifest.timings
        print(f"\nbuild, {len(train)} training images, {index.manifest.calibration['image']['n']} of them held aside"
              f" for calibration ({index.manifest.store['num_patches']:,} patches -> "
              f"memory bank {index.size:,} x {index.dim}, {args.index})\n")
        print("| stage | seconds | per image (ms) |")
        print("|---|---|---|")
        for stage in ("load_backbone", "extract", "coreset", "index", "calibrate"):
            print(f"| {stage} | {tm[stage]:.2f} | {1000 * tm[stage] / len(train):.1f} |")
        print(f"| total (incl. writing, fsync) | {total:.2f} | {1000 * total / len(train):.1f} |")

        index = PatchIndex.load(Path(tmp) / "bottle")
        g = geometry_of(index)
        paths = [s.path for s in test_samples(root, "bottle")]
        times = {"decode + preprocess": 0.0, "backbone + patch embedding": 0.0, "search + Eq. 7 score": 0.0,
                 "anomaly map": 0.0}
        for i in range(0, len(paths), 16):
            t = time.perf_counter()
            frames = [load_image(p) for p in paths[i:i + 16]]
            batch = torch.cat([g.frame_tensor(f) for f in frames])
            times["decode + preprocess"] += time.perf_counter() - t
            t = time.perf_counter()
            emb = embedder_for(index)(batch).numpy()
            times["backbone + patch embedding"] += time.perf_counter() - t
            n, h, w, d = emb.shape
            t = time.perf_counter()
            res = index.search(emb.reshape(n, h * w, d))
            times["search + Eq. 7 score"] += time.perf_counter() - t
            t = time.perf_counter()
            for grid, f in zip(res.patch_scores.reshape(n, h, w), frames):
                g.frame_map(grid, f.size)
            times["anomaly map"] += time.perf_counter() - t
        print(f"\nquery, {len(paths)} test images (900x900 PNG), batches of 16, {g.mode} {g.input_size}\n")
        print("| stage | ms per image |")
        print("|---|---|")
        for k, v in times.items():
            print(f"| {k} | {1000 * v / len(paths):.1f} |")
        print(f"| total | {1000 * sum(times.values()) / len(paths):.1f} |")


if __name__ == "__main__":
    main()
