"""Benchmark: ``patchsearch add`` of 10 good bottle frames against a full rebuild with them.

The 209 MVTec AD bottle ``train/good`` frames are split (seeded) into 21 held aside for
calibration (given to both builds as ``validation/good``, so both are calibrated on the
same frames), 10 to add, and the rest for the initial build. A data root of symlinks is
made under ``--work`` (nothing is copied; the test split is linked as it is):

* initial: ``build`` over 178 frames, then ``add`` of the 10 (timed, in-process, backbone
  loaded by the add as the CLI does);
* reference: ``build`` over the same 188 frames with the same seed (timed).

Both are evaluated on the bottle test split (image and pixel AUROC). The machine is shared,
so the add is timed ``--repeat`` times (3; each on a fresh copy of the index before it) and
the full build twice, alternating, and the table gives the fastest and the median, of wall
time and of the process's CPU time (all threads; much less sensitive to other load).
Prints a markdown table.

    python scripts/bench_add.py [--data-root ../shared/data/mvtec_ad] [--work /tmp/bench_add] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patchsearch import PatchIndex  # noqa: E402
from patchsearch.data import train_images  # noqa: E402
from patchsearch.evaluate import evaluate  # noqa: E402
from patchsearch.pipeline import build  # noqa: E402
from patchsearch.update import add_images, history  # noqa: E402


def link_root(src: Path, dst: Path, train: list[Path], held: list[Path], extra: dict[str, list[Path]]) -> Path:
    """A bottle data root of symlinks: train/good, validation/good, the real test and ground truth."""
    if dst.exists():
        shutil.rmtree(dst)
    cat = dst / "bottle"
    for sub, frames in {"train/good": train, "validation/good": held, **extra}.items():
        (cat / sub).mkdir(parents=True)
        for f in frames:
            os.symlink(f.resolve(), cat / sub / f.name)
    for sub in ("test", "ground_truth"):
        os.symlink((src / "bottle" / sub).resolve(), cat / sub)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("PATCHSEARCH_DATA_ROOT",
                                                                          "../shared/data/mvtec_ad")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_add"))
    ap.add_argument("--add", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="times the add is timed (the full build: twice)")
    args = ap.parse_args()

    frames = train_images(args.data_root, "bottle")
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(frames))
    held = sorted(frames[i] for i in order[:21])
    new = sorted(frames[i] for i in order[21:21 + args.add])
    initial = sorted(frames[i] for i in order[21 + args.add:])
    args.work.mkdir(parents=True, exist_ok=True)
    root_a = link_root(args.data_root, args.work / "data_initial", initial, held, {"line/good": new})
    root_b = link_root(args.data_root, args.work / "data_all", sorted(initial + new), held, {})
    idx_a, idx_b = args.work / "idx_initial" / "bottle", args.work / "idx_all" / "bottle"
    for d in (idx_a, idx_b):
        shutil.rmtree(d, ignore_errors=True)
    log = lambda m: print("  " + m, file=sys.stderr)  # noqa: E731

    def run_build(root: Path, out: Path):
        cat = root / "bottle"
        t0, c0 = time.perf_counter(), time.process_time()
        index = build(train_images(root, "bottle"), out, category="bottle", data_root=cat,
                      calibration_images=sorted((cat / "validation/good").iterdir()), seed=args.seed, log=log)
        cpu.append(time.process_time() - c0)
        return index, time.perf_counter() - t0

    cpu = []

    print(f"initial build: {len(initial)} frames", file=sys.stderr)
    first, t_first = run_build(root_a, idx_a)
    before = args.work / "idx_before_add"
    shutil.rmtree(before, ignore_errors=True)
    shutil.copytree(idx_a.parent, before, symlinks=True)
    ev_first = evaluate(PatchIndex.load(idx_a), root_a, "bottle")
    t_adds, t_refs, recs, c_adds, c_refs = [], [], [], [], []
    c_first = cpu.pop()
    for rep in range(max(args.repeat, 2)):
        if rep < args.repeat:
            print(f"add {rep + 1}: {len(new)} frames", file=sys.stderr)
            shutil.rmtree(idx_a.parent)
            shutil.copytree(before, idx_a.parent, symlinks=True)
            t0, c0 = time.perf_counter(), time.process_time()
            added = add_images(idx_a, sorted((root_a / "bottle/line/good").iterdir()), data_root=root_a / "bottle",
                               log=log)
            t_adds.append(time.perf_counter() - t0)
            c_adds.append(time.process_time() - c0)
            recs.append(history(added.manifest)[-1])
        if rep < 2:
            print(f"full build {rep + 1}: {len(initial) + len(new)} frames", file=sys.stderr)
            shutil.rmtree(idx_b, ignore_errors=True)
            ref, t = run_build(root_b, idx_b)
            t_refs.append(t)
            c_refs.append(cpu.pop())
    ev_added = evaluate(added, root_a, "bottle")
    ev_ref = evaluate(PatchIndex.load(idx_b), root_b, "bottle")
    rec = min(recs, key=lambda r: r["seconds"]["total"])
    sec = rec["seconds"]
    t_add, t_ref = min(t_adds), min(t_refs)

    print(f"| index | frames in store | memory bank | wall seconds | CPU seconds | image AUROC | pixel AUROC | "
          f"image threshold |")
    print("|---|---|---|---|---|---|---|---|")
    med = lambda xs: float(np.median(xs))  # noqa: E731
    rows = [(f"initial build ({len(initial)} frames)", first, f"{t_first:.1f}", f"{c_first:.1f}", ev_first),
            (f"+ `add` of {len(new)} frames", added, f"{t_add:.1f} (median {med(t_adds):.1f} of {len(t_adds)})",
             f"{min(c_adds):.1f} (median {med(c_adds):.1f})", ev_added),
            (f"full build with them ({len(initial) + len(new)} frames, same seed)", ref,
             f"{t_ref:.1f} (median {med(t_refs):.1f} of {len(t_refs)})", f"{min(c_refs):.1f} (median {med(c_refs):.1f})",
             ev_ref)]
    for name, index, secs, cpus, ev in rows:
        store = index.manifest.store
        print(f"| {name} | {store['num_images']} | {index.size:,} | {secs} | {cpus} | {ev['image_auroc']:.4f} | "
              f"{ev['pixel_auroc']:.4f} | {index.manifest.calibration['image']['threshold']:.4f} |")
    print()
    print(f"add times {', '.join(f'{t:.1f}' for t in t_adds)} s; full builds {', '.join(f'{t:.1f}' for t in t_refs)} s")
    print(f"add / full build: wall {t_add / t_ref:.1%} (fastest of each; medians {med(t_adds) / med(t_refs):.1%}), "
          f"CPU {min(c_adds) / min(c_refs):.1%} (medians {med(c_adds) / med(c_refs):.1%}); "
          f"bank growth {rec['bank_rows'][0]:,} -> "
          f"{rec['bank_rows'][1]:,} (+{rec['bank_rows'][1] - rec['bank_rows'][0]:,} rows of "
          f"{rec['store_patches'][1] - rec['store_patches'][0]:,} new patches; the full build's bank: "
          f"{ref.size:,}); covering radius {rec['covering_radius']:.4f} ({rec['radius_space']}, L2)")
    print(f"add stages (s): embed {sec['embed']} (backbone load before it: "
          f"{sec['total'] - sec['embed'] - sec['cover'] - sec['index'] - sec['calibrate']:.2f} incl. reading), "
          f"cover {sec['cover']}, support sets + shards {sec['index']}, threshold re-fit {sec['calibrate']}; "
          f"pixel AUROC difference add - full build: {ev_added['pixel_auroc'] - ev_ref['pixel_auroc']:+.4f}")
    print(f"calibration: {rec['calibration']}")


if __name__ == "__main__":
    main()
