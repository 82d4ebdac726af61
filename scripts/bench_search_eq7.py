#!/usr/bin/env python
"""Search + Eq. 7 benchmark: one table, one run, patchsearch against anomalib's own code.

Two cases, same bank and embeddings for every method:

* **bottle**: the memory bank of a default bottle build (``patchsearch build --category
  bottle``: efficientnet_lite1, whole frame 256, 19,251 x 152) and the patch embeddings of
  bottle's 83 test frames (83 x 1024 x 152, embedded once with the index's backbone and
  cached under ~/.cache/patchsearch-bench);
* **16k x 1536**: 16,384 rows of the build's patch store lifted to 1536-d
  (``benchdata.lift``, a stand-in for wide_resnet50_2's embeddings) and the lifted
  embeddings of ``--frames-1536`` of the test frames.

Methods (frames in batches of 16, as inference sees them):

* ``anomalib 2.7``: ``PatchcoreModel.nearest_neighbors(embedding, n_neighbors=1)`` then
  ``compute_anomaly_score`` (b = 9) of a ``PatchcoreModel`` whose memory bank is the bank
  (its backbone, random weights, is not run); skipped, and said so, where anomalib is not
  installed;
* ``torch fp32 brute force``: anomalib's distance (``||x||^2 - 2 x.y + ||y||^2``, clamp,
  sqrt) and ``topk`` for k = 9 per patch, a second search for N_b(m*), Eq. 7
  (scripts/bench_search.py's ``torch_patchcore``);
* ``patchsearch exact=...``: ``PatchIndex.search(patches, k, b=9)`` with fp32
  (``faiss.IndexFlatL2``), the default (``auto``: what this CPU gets) and the other
  reduced-precision kind; k = 1 (what anomalib computes) and k = 9 (the library default);
* ``faiss IndexFlatL2Panorama`` (where the installed faiss has it): k = 9 search only, on
  the bank as is and PCA-rotated (orthogonal: the same distances), against IndexFlatL2.

Columns: seconds for all frames (best of ``--repeat`` interleaved runs), patches/s,
speed-up against anomalib (k = 1 rows) and against torch fp32 brute force (k = 9 rows),
top-1 neighbour the same as anomalib's (%; where they differ, which is nearer in float64),
max relative image-score difference against anomalib, and the reduced-precision
searcher's widened / fp32-fallback queries. The machine (``lscpu`` model name, load
average, the CPU features the choice depends on, present or absent) is printed first.

The seconds are wall-clock; "CPU s" is the process's CPU time over the same best run
(all threads), less sensitive to other load on a shared machine.

``--simulate`` stands in for another CPU kind on this one: oneDNN (torch's bf16/int8
GEMMs) capped with ``ONEDNN_MAX_CPU_ISA``, faiss with ``FAISS_OPT_LEVEL``, MKL with
``MKL_ENABLE_INSTRUCTIONS``, and ``exact="auto"`` seeing that kind's CPU flags; it is
printed as such (the memory system stays this machine's).

    python scripts/bench_search_eq7.py                 # both cases, a few minutes
    python scripts/bench_search_eq7.py --cases bottle --repeat 5
    python scripts/bench_search_eq7.py --simulate avx2  # an AVX2-only CPU (no VNNI, no AVX-512)
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SIMULATE = {  # kind: (env, CPU flags that exact="auto" sees)
    "avx512_bf16": ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
                    {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}),
    "avx512_vnni": ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, {"avx2", "avx512f", "avx512_vnni"}),
    "avx2_vnni": ({"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI", "FAISS_OPT_LEVEL": "avx2", "OPENBLAS_CORETYPE": "Haswell",
                   "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, {"avx2", "avx_vnni"}),
    "avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2", "FAISS_OPT_LEVEL": "avx2", "OPENBLAS_CORETYPE": "Haswell",
              "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, {"avx2"}),
}
if "--simulate" in sys.argv and "PATCHSEARCH_BENCH_SIMULATED" not in os.environ:  # before torch/faiss load
    kind = sys.argv[sys.argv.index("--simulate") + 1]
    if kind in SIMULATE:
        os.environ.update(SIMULATE[kind][0], PATCHSEARCH_BENCH_SIMULATED=kind)
        os.execv(sys.executable, [sys.executable] + sys.argv)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import benchdata  # noqa: E402
from bench_search import torch_patchcore  # noqa: E402
from patchsearch import PatchIndex, lowp  # noqa: E402
from patchsearch.searchers import faiss  # noqa: E402

REAL_FEATURES = lowp.cpu_features()
if os.environ.get("PATCHSEARCH_BENCH_SIMULATED") in SIMULATE:
    lowp.cpu_features = lambda: frozenset(SIMULATE[os.environ["PATCHSEARCH_BENCH_SIMULATED"]][1])

FEATURES = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
BATCH = 16
PANORAMA_PATCHES = 8192  # Panorama is measured on this many of the patches (search only)


def machine() -> str:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), model)
    except (OSError, subprocess.SubprocessError):
        pass
    have = [f for f in FEATURES if f in REAL_FEATURES]
    lack = [f for f in FEATURES if f not in REAL_FEATURES]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    sim = os.environ.get("PATCHSEARCH_BENCH_SIMULATED")
    sim = (f"SIMULATED CPU kind: {sim} ({' '.join(f'{k}={v}' for k, v in SIMULATE[sim][0].items())}; "
           f"exact='auto' sees the flags {', '.join(sorted(SIMULATE[sim][1]))})\n") if sim in SIMULATE else ""
    return (f"CPU: {model}; {os.cpu_count()} logical CPUs; load average {load}\n"
            f"CPU features present: {', '.join(have) or 'none'}; absent (not faked): {', '.join(lack) or 'none'}\n"
            f"{sim}"
            f"torch {torch.__version__} ({torch.get_num_threads()} threads, capability "
            f"{torch.backends.cpu.get_cpu_capability()}), faiss {faiss().__version__}, "
            f"anomalib {anomalib_version() or 'not installed'}")


def anomalib_version() -> str | None:
    try:
        import anomalib
    except ImportError:
        return None
    return anomalib.__version__


def test_embeddings(index: PatchIndex) -> np.ndarray:
    """(83, P, d) embeddings of bottle's test frames with ``index``'s backbone (cached)."""
    from patchsearch.data import iter_batches
    from patchsearch.query import embedder_for, geometry_of

    name = (index.manifest.backbone or {}).get("name", "x")
    path = benchdata.CACHE / f"bottle_test_{name}_{index.size}x{index.dim}.npy"
    if path.is_file():
        return np.load(path)
    paths = sorted((benchdata.data_root() / "bottle" / "test").glob("*/*.png"))
    emb, out = embedder_for(index), []
    for batch in iter_batches(paths, geometry_of(index), BATCH):
        out.append(emb(batch.tensor).numpy())
    x = np.concatenate(out).reshape(len(paths), -1, index.dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, x)
    return x


def anomalib_model(bank: np.ndarray):
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False, num_neighbors=9)
    model.memory_bank = torch.from_numpy(np.ascontiguousarray(bank))
    return model.eval()


def run_anomalib(model, patches: np.ndarray):
    """anomalib's own inference path after the backbone: top-1 rows (N, P), image scores (N,)."""
    rows, scores = [], []
    with torch.no_grad():
        for s in range(0, len(patches), BATCH):
            emb = torch.from_numpy(patches[s:s + BATCH].reshape(-1, patches.shape[-1]))
            ps, loc = model.nearest_neighbors(emb, n_neighbors=1)
            n = min(BATCH, len(patches) - s)
            ps, loc = ps.reshape(n, -1), loc.reshape(n, -1)
            scores.append(model.compute_anomaly_score(ps, loc, emb).numpy())
            rows.append(loc.numpy())
    return np.concatenate(rows), np.concatenate(scores)


def run_torch(bank_t: torch.Tensor, patches: np.ndarray):
    rows, scores = [], []
    with torch.no_grad():
        for s in range(0, len(patches), BATCH):
            _, loc, sc = torch_patchcore(bank_t, torch.from_numpy(patches[s:s + BATCH]))
            rows.append(loc[..., 0].numpy())
            scores.append(sc.numpy())
    return np.concatenate(rows), np.concatenate(scores)


def run_index(index: PatchIndex, patches: np.ndarray, k: int):
    rows, scores = [], []
    for s in range(0, len(patches), BATCH):
        r = index.search(patches[s:s + BATCH], k=k, b=9)
        rows.append(r.locations[..., 0])
        scores.append(r.image_scores)
    return np.concatenate(rows), np.concatenate(scores)


def nearer(bank: np.ndarray, q: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[int, int, int]:
    """Where top-1 rows a and b differ: how often a is nearer, b is nearer, or both are at
    the same float64 distance."""
    diff = np.nonzero(a != b)[0]
    if not diff.size:
        return 0, 0, 0
    da = ((q[diff].astype(np.float64) - bank[a[diff]]) ** 2).sum(1)
    db = ((q[diff].astype(np.float64) - bank[b[diff]]) ** 2).sum(1)
    return int((da < db).sum()), int((db < da).sum()), int((da == db).sum())


def panorama_rows(bank: np.ndarray, q: np.ndarray, repeat: int) -> list[tuple[str, float]]:
    f = faiss()
    if not hasattr(f, "IndexFlatL2Panorama"):
        return [("faiss IndexFlatL2Panorama: not in this faiss", float("nan"))]
    d = bank.shape[1]
    flat = f.IndexFlatL2(d)
    flat.add(bank)
    pca = f.PCAMatrix(d, d)
    pca.train(bank)
    rotated_bank, rotated_q = pca.apply(bank), pca.apply(q)
    out = []
    for levels in (8, 16):
        for name, x, y in (("as is", bank, q), ("PCA-rotated", rotated_bank, rotated_q)):
            pano = f.IndexFlatL2Panorama(d, levels)
            pano.add(x)
            best = min(_timed(lambda: pano.search(y, 9))[0] for _ in range(repeat))
            out.append((f"faiss IndexFlatL2Panorama, {levels} levels, bank {name} (k=9 search only, "
                        f"{len(q):,} patches)", best))
    out.append((f"faiss IndexFlatL2 (k=9 search only, {len(q):,} patches)",
                min(_timed(lambda: flat.search(q, 9))[0] for _ in range(repeat))))
    return out


def _timed(fn, cpu: list | None = None):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return time.perf_counter() - t, out


def bench_case(label: str, bank: np.ndarray, patches: np.ndarray, repeat: int, index: PatchIndex | None = None):
    """Rows of the table for one bank and its query frames."""
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    patches = np.ascontiguousarray(patches, dtype=np.float32)
    q = patches.reshape(-1, patches.shape[-1])
    n_patch = len(q)
    methods = {}
    if anomalib_version():
        model = anomalib_model(bank)
        methods["anomalib 2.7 nearest_neighbors(k=1) + compute_anomaly_score"] = (1, lambda: run_anomalib(model, patches))
    bank_t = torch.from_numpy(bank)
    methods["torch fp32 brute force (k=9) + Eq. 7"] = (9, lambda: run_torch(bank_t, patches))
    auto = lowp.choose("auto", len(bank), bank.shape[1])
    kinds = ["fp32", auto] + [x for x in ("bf16", "int8") if x != auto and (x != "int8" or lowp.int8_gemm_available())]
    indexes = {}
    for kind in dict.fromkeys(kinds):
        built = PatchIndex.from_embeddings(bank, exact=kind, support_sets=False) if index is None else \
            PatchIndex(index.memory_bank, index.shards, index.manifest, exact=kind)
        t0 = time.perf_counter()
        built.knn(q[:8], 1)  # builds the reduced-precision codes (done once, on the first search)
        indexes[kind] = (built, time.perf_counter() - t0)
        tag = "fp32, faiss.IndexFlatL2" if kind == "fp32" else kind
        default = " = the default (auto)" if kind == auto else ""
        for k in (1, 9):
            methods[f"patchsearch exact={tag}{default}, k={k}"] = (k, lambda b=built, k=k: run_index(b, patches, k))
    best, cpu, results = {}, {}, {}
    for _ in range(repeat):  # interleaved: every method once per round
        for name, (_, fn) in methods.items():
            c = []
            t, out = _timed(fn, c)
            if t < best.get(name, float("inf")):
                best[name], cpu[name] = t, c[0]
            results[name] = out
    ref_name = next((m for m in methods if m.startswith("anomalib")), None)
    torch_name = "torch fp32 brute force (k=9) + Eq. 7"
    rows = []
    for name, (k, _) in methods.items():
        top1, scores = results[name]
        t = best[name]
        vs_anomalib = f"{best[ref_name] / t:.2f}x" if ref_name and k == 1 else "-"
        vs_torch = f"{best[torch_name] / t:.2f}x" if k == 9 else "-"
        if ref_name:
            ref_rows, ref_scores = results[ref_name]
            same = float((top1 == ref_rows).mean())
            a, b, tie = nearer(bank, q, top1.reshape(-1), ref_rows.reshape(-1))
            agree = f"{100 * same:.4f}% ({a} nearer, {b} farther, {tie} tied in float64)"
            rel = f"{float(np.max(np.abs(scores - ref_scores) / np.abs(ref_scores))):.1e}"
        else:
            agree = rel = "- (anomalib not installed)"
        stats = ""
        for kind, (built, prep) in indexes.items():
            if name.startswith(f"patchsearch exact={kind}") and isinstance(built.searcher, lowp.LowpSearcher):
                st = built.searcher.stats
                stats = f"{st['widened']} / {st['fallbacks']} of {st['queries']} (codes {prep:.2f} s)"
        rows.append(f"| {label} | {name} | {t:.3f} | {cpu[name]:.2f} | {n_patch / t:,.0f} | {vs_anomalib} | "
                    f"{vs_torch} | {agree} | {rel} | {stats or '-'} |")
    sub = q[:PANORAMA_PATCHES]
    for name, t in panorama_rows(bank, sub, repeat):
        rows.append(f"| {label} | {name} | {t:.3f} | - | {len(sub) / t:,.0f} | - | - | - | - | - |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="bottle,1536", help="bottle, 1536 or both")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds; the best time of each method counts")
    ap.add_argument("--frames-1536", type=int, default=16, help="test frames searched in the 16k x 1536 case")
    ap.add_argument("--simulate", choices=sorted(SIMULATE), help="stand in for another CPU kind (see above)")
    ap.add_argument("--index", type=Path, default=benchdata.REPO / "indexes" / "bottle",
                    help="the default bottle build (patchsearch build --category bottle)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(machine(), flush=True)
    index = PatchIndex.load(args.index)
    test = test_embeddings(index)
    rows = []
    if "bottle" in args.cases:
        print(f"\nbottle: bank {index.size:,} x {index.dim}, {len(test)} frames x {test.shape[1]} patches", flush=True)
        rows += bench_case(f"bottle {index.size:,} x {index.dim}", index.bank, test, args.repeat, index)
    if "1536" in args.cases:
        base = benchdata.train_patches(args.index)
        pick = np.sort(np.random.default_rng(1).choice(len(base), 16384, replace=False))
        bank = benchdata.lift(np.asarray(base[pick]), 1536)
        patches = benchdata.lift(test[:args.frames_1536], 1536)
        print(f"\n16k x 1536: bank {bank.shape}, {len(patches)} frames x {patches.shape[1]} patches", flush=True)
        rows += bench_case("16,384 x 1536", bank, patches, args.repeat)
    print(f"\n{machine()}\n")
    print("| bank | method | s (all frames) | CPU s | patches/s | vs anomalib (k=1) | vs torch fp32 (k=9) | "
          "top-1 = anomalib's | max rel. image-score diff vs anomalib | widened / fp32 fallbacks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
