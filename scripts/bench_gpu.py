#!/usr/bin/env python
"""GPU benchmark: matmul floors, search + Eq. 7 per bank size and method, end to end images/s.

One table (markdown on stdout, and ``--json FILE``):

* floors: measured fp32 (TF32 off), tf32, bf16 and fp16 matmul rates on the device
  (square products, best of 10 after 3 warm-ups): the rates the search rows are held to.
* search + Eq. 7 for N images x 784 patches (28 x 28, a 224 crop) over banks of clustered
  random data (M / 64 Gaussian centres, N(0, 0.5^2) jitter; queries are bank rows with
  N(0, 0.3^2) jitter), for each ``--sizes`` entry:
  - ``faiss-gpu flat fp32`` with 1 and 4 shards: ``PatchIndex.from_embeddings(gpu=True)``
    and ``PatchIndex.search`` (the library's path: numpy in and out, Eq. 7 on the CPU);
  - ``faiss-gpu flat fp16``: the same shards stored as float16 (``gpu_plan(float16=True)``);
  - ``faiss-gpu IVF-PQ``: trained on the GPU with the library's parameters
    (``ivf.auto_params(layout="pq")``), the smallest power-of-two nprobe reaching recall@9
    >= 0.95 on 2,000 other queries, ``rerank`` x 9 candidates re-ranked exactly;
  - ``PatchIndex(device=cuda)``: the library on the device (faiss-gpu shards where installed,
    else its torch search, :mod:`patchsearch.torch_search`), numpy queries, and ``, tensors``:
    queries already on the device (k-NN and Eq. 7 there, only results copied back);
  - ``torch fp32 / tf32 / bf16``: brute force on the device (``||b||^2 - 2 q.b`` by matmul,
    then top-k; tf32 / bf16: 64 candidates re-ranked with exact fp32 differences) and Eq. 7
    in torch, only scores and k = 9 results copied back.
  "of mm" is 2 n M d / time over the floor of the precision the method multiplies in;
  recall@9 is against the torch fp32 row.
* end to end, images/s: 224 x 224 tensors on the device -> ``PatchEmbedder`` -> torch fp32
  search -> Eq. 7 -> anomaly maps (bilinear + Gaussian blur on the device) -> scores and maps
  copied back; efficientnet_lite0 over a 16k x 152 bank (lite0 on bottle) and
  wide_resnet50_2 (random weights: timing only) over 16k x 1536; and lite0 from PNG files
  (256 x 256, decoded by ``patchsearch.data.iter_batches`` with ``--workers``).
* peak GPU memory per row: torch's peak allocation, and device memory in use at the end
  of the row (FAISS allocates outside torch).

Rows that cannot run (no GPU, no faiss-gpu, time budget spent) print the reason.

    python scripts/bench_gpu.py --device cuda --json out.json        # the device run
    python scripts/bench_gpu.py --device cpu --quick --check         # smoke test, seconds
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch  # before faiss: faiss-gpu-cuvs finds the CUDA libraries torch loaded

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402

K, B, P = 9, 9, 784
SIZES = "16k:152,16k:1536,160k:1536,1.6m:1536"
QUICK_SIZES = "2k:32"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"16k:152,1.6m:1536"`` -> [(16000, 152), (1600000, 1536)]."""
    out = []
    for item in text.split(","):
        rows, d = item.strip().lower().split(":")
        scale = {"k": 1e3, "m": 1e6}.get(rows[-1], 1)
        out.append((int(float(rows.rstrip("km")) * scale), int(d)))
    return out


class Bench:
    def __init__(self, device: str, budget_s: float, quick: bool):
        self.device, self.quick, self.t0, self.budget = torch.device(device), quick, time.time(), budget_s
        self.cuda = self.device.type == "cuda"
        self.rows, self.floors = [], {}

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn, repeat: int = 3):
        """(best seconds, last result) of ``repeat`` calls (1 with --quick) after one warm-up."""
        repeat = 1 if self.quick else repeat
        out = fn()
        self.sync()
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            out = fn()
            self.sync()
            best = min(best, time.perf_counter() - t)
        return best, out

    def row(self, name: str, size: str, fn) -> None:
        """Run one row; its dict (or the reason it could not run) goes into the table."""
        if time.time() - self.t0 > self.budget:
            self.rows.append({"method": name, "size": size, "note": f"skipped: --budget-s {self.budget:g} spent"})
            return
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            free0 = torch.cuda.mem_get_info(self.device)[0]
        try:
            out = fn()
        except Unavailable as exc:
            out = {"note": f"not run: {exc}"}
        except Exception as exc:  # a row that breaks must not hide the others
            out = {"note": f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:160]}"}
        if self.cuda and "time_s" in out:
            out["peak_torch_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            out["device_used_gib"] = max(0, free0 - out.pop("_free_end", free0)) / 2 ** 30
        out.pop("_free_end", None)
        self.rows.append({"method": name, "size": size, **out})
        shown = out.get("note") if "time_s" not in out else "%.4f s" % out["time_s"]
        print(f"  {name:<34} {size:<12} {shown}", file=sys.stderr, flush=True)

    def free_now(self):
        return torch.cuda.mem_get_info(self.device)[0] if self.cuda else 0


class Unavailable(Exception):
    """The row cannot run here (the message says why)."""


# ---------------------------------------------------------------- floors
def matmul_floors(bench: Bench) -> dict:
    n = 256 if bench.quick else 8192
    out = {}
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False), ("fp16", torch.float16, False)):
        if not bench.cuda and name in ("tf32", "fp16"):
            out[name] = None  # no TF32 on CPUs; fp16 matmul on CPU is not what any row uses
            continue
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device=bench.device).to(dtype)
        b = torch.randn(n, n, device=bench.device).to(dtype)
        for _ in range(3):
            a @ b
        t, _ = bench.timed(lambda a=a, b=b: a @ b, repeat=10)
        out[name] = 2 * n ** 3 / t
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


# ---------------------------------------------------------------- data
def clustered(rows: int, d: int, seed: int, device) -> torch.Tensor:
    """float32 (rows, d): Gaussian centres (rows / 64 of them) plus N(0, 0.5^2) jitter."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(max(1, rows // 64), d, generator=g, device=device)
    out = torch.empty(rows, d, device=device)
    for s in range(0, rows, 131072):
        e = min(rows, s + 131072)
        pick = torch.randint(0, len(centres), (e - s,), generator=g, device=device)
        out[s:e] = centres[pick] + 0.5 * torch.randn(e - s, d, generator=g, device=device)
    return out


def jittered_queries(bank: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device=bank.device).manual_seed(seed)
    pick = torch.randint(0, len(bank), (n,), generator=g, device=bank.device)
    return bank[pick] + 0.3 * torch.randn(n, bank.shape[1], generator=g, device=bank.device)


# ---------------------------------------------------------------- torch search and Eq. 7
def torch_knn(q: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, k: int, precision: str = "fp32",
              low: torch.Tensor | None = None, cand: int = 64, budget: int = 1 << 28):
    """Exact-result k-NN on the device: (squared L2 float32 (n, k), rows int64 (n, k)).

    fp32: ``||b||^2 - 2 q.b`` in fp32 (TF32 off), top-k. tf32 / bf16: that score in the
    lower precision (``low``: the bank in bf16) gives ``cand`` candidates, re-ranked by
    exact fp32 differences. Queries are chunked so that a (chunk, M) score matrix holds at
    most ``budget`` elements.
    """
    n, d = q.shape
    m = len(bank)
    k = min(k, m)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    chunk = max(1, min(n, budget // m))
    dist = torch.empty(n, k, device=q.device)
    rows = torch.empty(n, k, dtype=torch.int64, device=q.device)
    for s in range(0, n, chunk):
        qc = q[s:s + chunk]
        dots = (qc.to(torch.bfloat16) @ low.T).float() if precision == "bf16" else qc @ bank.T
        score = dots.mul_(-2).add_(bank_sq)
        del dots
        if precision == "fp32":
            v, i = score.topk(k, dim=1, largest=False)
            dist[s:s + len(qc)] = (v + (qc * qc).sum(1, keepdim=True)).clamp_min_(0)
            rows[s:s + len(qc)] = i
            continue
        c = score.topk(min(m, max(cand, k)), dim=1, largest=False, sorted=False).indices
        del score
        for r in range(0, len(qc), 1024):  # exact re-rank, bounded (1024, c, d) temporaries
            diff = bank[c[r:r + 1024]] - qc[r:r + 1024, None, :]
            v, j = (diff * diff).sum(-1).topk(k, dim=1, largest=False)
            dist[s + r:s + r + len(v)] = v
            rows[s + r:s + r + len(v)] = c[r:r + 1024].gather(1, j)
    torch.backends.cuda.matmul.allow_tf32 = False
    return dist, rows


def eq7_torch(patches: torch.Tensor, dist: torch.Tensor, loc: torch.Tensor, bank: torch.Tensor,
              bank_sq: torch.Tensor, b: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    """PatchCore Eq. 7 on the device, as :func:`patchsearch.score.reweighted_scores` with
    support sets as :func:`patchsearch.bank.support_from_neighbours`.

    Args: patches float32 (N, P, d); dist L2 (N, P, k); loc int64 (N, P, k).
    Returns: (image scores float32 (N,), top patch index int64 (N,)).
    """
    n = len(patches)
    ar = torch.arange(n, device=patches.device)
    top = dist[..., 0].argmax(1)
    m_star, s_star = loc[ar, top, 0], dist[ar, top, 0]
    b = min(b, len(bank))
    _, nb = torch_knn(bank[m_star], bank, bank_sq, min(b + 1, len(bank)))
    order = torch.argsort((nb == m_star[:, None]).to(torch.int8), dim=1, stable=True)  # others first, in order
    support = torch.cat([m_star[:, None], nb.gather(1, order)[:, :b - 1]], 1)
    if b == 1:
        return s_star, top
    diff = bank[support] - patches[ar, top][:, None, :]
    dd = (diff * diff).sum(-1).sqrt()
    z = torch.exp(dd - dd.max(1, keepdim=True).values)
    return (1 - z[:, 0] / z.sum(1)) * s_star, top


def maps_torch(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """Anomaly maps on the device, as :func:`patchsearch.score.anomaly_maps`."""
    from torchvision.transforms.functional import gaussian_blur

    t = F.interpolate(patch_scores[:, None], size=size, mode="bilinear", align_corners=False)
    k = 2 * int(4.0 * sigma + 0.5) + 1
    return gaussian_blur(t, kernel_size=[k, k], sigma=[sigma, sigma])[:, 0]


def recall(rows: torch.Tensor, truth: torch.Tensor) -> float:
    k = truth.shape[1]
    return float((rows[:, :k, None] == truth[:, None, :]).any(2).float().mean())


# ---------------------------------------------------------------- search rows
def faiss_gpu_ok(bench: Bench):
    """Raises Unavailable unless faiss can place indexes on this device's GPU."""
    import faiss

    if not bench.cuda:
        raise Unavailable("--device cpu")
    if not hasattr(faiss, "StandardGpuResources"):
        raise Unavailable(f"faiss {faiss.__version__} has no GPU support (faiss-cpu; carry faiss-gpu-cuvs)")
    if faiss.get_num_gpus() < 1:
        raise Unavailable("faiss sees no GPU")
    return faiss


def search_rows(bench: Bench, rows: int, d: int, n_img: int, floors: dict, check: bool) -> None:
    from patchsearch import PatchIndex

    size = f"{rows // 1000}k x {d}" if rows < 10 ** 6 else f"{rows / 1e6:g}M x {d}"
    dev = bench.device
    bank = clustered(rows, d, seed=rows + d, device=dev)
    bank_sq = (bank * bank).sum(1)
    q = jittered_queries(bank, n_img * P, seed=1)
    flops = 2.0 * len(q) * rows * d
    truth = {}

    def rate(t, precision, extra):
        floor = floors.get(precision)
        note = f"{n_img} images" + (f"; {extra.pop('note')}" if "note" in extra else "")
        return {"time_s": t, "patches_per_s": len(q) / t, "images_per_s": n_img / t,
                "of_mm": flops / t / floor if floor else None, "precision": precision, "note": note, **extra,
                "_free_end": bench.free_now()}

    def torch_row(precision):
        def run():
            low = bank.to(torch.bfloat16) if precision == "bf16" else None

            def go():
                d2, r = torch_knn(q, bank, bank_sq, K, precision, low)
                dist = d2.clamp_min(0).sqrt()
                scores, top = eq7_torch(q.view(n_img, P, d), dist.view(n_img, P, K), r.view(n_img, P, K), bank,
                                        bank_sq)
                return scores.cpu(), dist.cpu(), r.cpu()  # only results come back
            t, (scores, dist, r) = bench.timed(go)
            if precision == "fp32":
                truth["rows"], truth["scores"] = r, scores
            extra = {"recall_at_9": recall(r, truth["rows"]) if "rows" in truth else None}
            if check and precision == "fp32":
                extra["check"] = check_against_cpu(q.cpu().numpy(), bank.cpu().numpy(), dist, r, scores, n_img)
            return rate(t, precision, extra)
        return run

    def library_row(shards, float16=False):
        def run():
            faiss = faiss_gpu_ok(bench)
            bank_np, q_np = bank.cpu().numpy(), q.view(n_img, P, d).cpu().numpy()
            index = PatchIndex.from_embeddings(bank_np, shards=shards, gpu=not float16)
            if float16:
                fp16_shards(index, faiss)
            t, res_ = bench.timed(lambda: index.search(q_np))
            got = torch.from_numpy(res_.locations.reshape(-1, K))
            out = rate(t, "fp16" if float16 else "fp32",
                       {"recall_at_9": recall(got, truth["rows"]) if "rows" in truth else None})
            return out  # the index (and its GPU memory) goes with this frame
        return run

    def ivf_row():
        faiss = faiss_gpu_ok(bench)
        from patchsearch import gpu_placement, ivf

        params = ivf.auto_params(rows, d, layout="pq")
        if params["pq_m"] not in ivf.GPU_PQ_M or d // params["pq_m"] not in ivf.GPU_PQ_DSUB:
            raise Unavailable(f"PQ{params['pq_m']} ({d} = {params['pq_m']} x {d // params['pq_m']}) "
                              f"is not a FAISS GPU IVF-PQ layout")
        cpu = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, params["nlist"], params["pq_m"], params["pq_bits"])
        plan = gpu_placement.gpu_plan(1, 1, pq_m=params["pq_m"])
        (gpu,), res = gpu_placement.place_on_gpus([cpu], plan, faiss)
        import faiss.contrib.torch_utils  # noqa: F401  (GPU indexes take torch tensors)

        n_train = min(rows, 64 * max(params["nlist"], 256))
        t_build = time.perf_counter()
        gpu.train(bank[torch.randperm(rows, device=dev)[:n_train]])
        for s in range(0, rows, 262144):
            gpu.add(bank[s:s + 262144])
        bench.sync()
        t_build = time.perf_counter() - t_build
        c = min(rows, K * params["rerank"], gpu_placement.GPU_MAX_K)
        held = jittered_queries(bank, 2000, seed=2)
        held_truth = torch_knn(held, bank, bank_sq, K)[1]
        nprobe = 1
        while True:
            gpu.nprobe = nprobe
            if recall(rerank_torch(held, bank, gpu.search(held, c)[1], K)[1], held_truth) >= 0.95 or \
                    nprobe >= min(params["nlist"], gpu_placement.GPU_MAX_NPROBE):
                break
            nprobe *= 2

        def go():
            _, cand = gpu.search(q, c)
            d2, r = rerank_torch(q, bank, cand, K)
            dist = d2.clamp_min(0).sqrt()
            scores, _ = eq7_torch(q.view(n_img, P, d), dist.view(n_img, P, K), r.view(n_img, P, K), bank, bank_sq)
            return scores.cpu(), r.cpu()
        t, (_, r) = bench.timed(go)
        return rate(t, "ivf", {"recall_at_9": recall(r, truth["rows"]) if "rows" in truth else None,
                               "note": f"nlist {params['nlist']}, PQ{params['pq_m']}x8, nprobe {nprobe}, "
                                       f"{c} candidates, build {t_build:.1f} s"})

    for precision in ("fp32", "tf32", "bf16"):
        if precision == "tf32" and not bench.cuda:
            bench.rows.append({"method": "torch tf32 + fp32 re-rank", "size": size, "note": "not run: --device cpu"})
            continue
        bench.row(f"torch {precision}" + ("" if precision == "fp32" else " + fp32 re-rank"), size,
                  torch_row(precision))
    bench.row("faiss-gpu flat fp32, 1 shard", size, library_row(1))
    bench.row("faiss-gpu flat fp32, 4 shards", size, library_row(4))
    bench.row("faiss-gpu flat fp16 storage", size, library_row(1, float16=True))
    bench.row("faiss-gpu IVF-PQ + exact re-rank", size, ivf_row)
    if "device" in inspect.signature(PatchIndex.from_embeddings).parameters:
        def lib_device(tensors: bool):
            def run():
                index = PatchIndex.from_embeddings(bank.cpu().numpy(), device=str(dev))
                q_in = q.view(n_img, P, d) if tensors else q.view(n_img, P, d).cpu().numpy()
                t, res_ = bench.timed(lambda: index.search(q_in))
                return rate(t, "fp32", {"recall_at_9": recall(torch.from_numpy(res_.locations.reshape(-1, K)),
                                                              truth["rows"]) if "rows" in truth else None})
            return run
        bench.row(f"PatchIndex(device={dev.type})", size, lib_device(False))
        bench.row(f"PatchIndex(device={dev.type}), tensors", size, lib_device(True))
    if not bench.cuda:
        def cpu_ref():
            index = PatchIndex.from_embeddings(bank.numpy(), gpu=False)
            t, res_ = bench.timed(lambda: index.search(q.view(n_img, P, d).numpy()))
            return rate(t, "fp32", {"recall_at_9": recall(torch.from_numpy(res_.locations.reshape(-1, K)),
                                                          truth["rows"]) if "rows" in truth else None})
        bench.row("faiss CPU flat (reference)", size, cpu_ref)


def fp16_shards(index, faiss) -> None:
    """Put a CPU-placed flat PatchIndex's shards on the GPU stored as float16."""
    import threading

    from patchsearch import gpu_placement

    s = index._sharded
    plan = gpu_placement.gpu_plan(len(s.cpu_shards), faiss.get_num_gpus(), float16=True)
    s.placed, s._resources = gpu_placement.place_on_gpus(s.cpu_shards, plan, faiss)
    s.on_gpu, s._gpu_lock = True, threading.Lock()
    s.index = s.placed[0] if len(s.placed) == 1 else faiss.IndexShards(index.dim, True, True)
    if len(s.placed) > 1:
        for p in s.placed:
            s.index.add_shard(p)


def rerank_torch(q, bank, cand, k):
    """Exact squared L2 of the best k of candidate rows (-1 = none) on the device."""
    cand = cand.to(torch.int64)
    valid = cand >= 0
    diff = bank[cand.clamp_min(0)] - q[:, None, :]
    d2 = (diff * diff).sum(-1).masked_fill_(~valid, float("inf"))
    v, j = d2.topk(k, dim=1, largest=False)
    return v, cand.gather(1, j)


def check_against_cpu(q, bank, dist, rows, scores, n_img) -> str:
    """torch fp32 search + Eq. 7 against faiss.knn and reweighted_scores (CPU); raises on mismatch."""
    import faiss

    from patchsearch.bank import support_from_neighbours
    from patchsearch.score import reweighted_scores

    d2, r = faiss.knn(q, bank, K)
    ok = (r == rows.numpy()) | np.isclose(d2, dist.numpy() ** 2, rtol=1e-3, atol=1e-4)
    assert ok.all(), f"torch fp32 rows differ from faiss.knn beyond ties at {(~ok).sum()} places"
    np.testing.assert_allclose(dist.numpy() ** 2, d2, rtol=1e-3, atol=1e-3)
    dist_np, loc = np.sqrt(np.maximum(d2, 0)).reshape(n_img, P, K), r.reshape(n_img, P, K)
    top = dist_np[..., 0].argmax(1)
    ar = np.arange(n_img)
    _, nn = faiss.knn(bank[loc[ar, top, 0]], bank, B + 1)
    support = support_from_neighbours(loc[ar, top, 0], nn, B)
    want = reweighted_scores(q.reshape(n_img, P, -1)[ar, top], dist_np[ar, top, 0], support, bank)
    np.testing.assert_allclose(scores.numpy(), want, rtol=1e-4, atol=1e-5)
    return "ok: equals faiss.knn and reweighted_scores"


# ---------------------------------------------------------------- end to end
@functools.lru_cache(maxsize=None)
def embedder(name: str, quick: bool):
    """(PatchEmbedder, note): packaged lite0 weights where installed; else random weights."""
    from patchsearch.errors import WeightsUnavailableError
    from patchsearch.features import PatchEmbedder

    if name == "efficientnet_lite0":
        try:
            return PatchEmbedder(name), "ImageNet weights"
        except WeightsUnavailableError as exc:
            raise Unavailable(str(exc).split(":")[0]) from None
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    path = Path(tempfile.mkdtemp()) / f"{name}_random.pt"
    torch.save(model.state_dict(), path)
    return PatchEmbedder(name, weights=path), "random weights (timing only)"


def e2e_rows(bench: Bench, n_images: int, png_images: int, batch: int, workers: int) -> None:
    side = 64 if bench.quick else 224
    wrn = "resnet18" if bench.quick else "wide_resnet50_2"
    bank_rows = 2000 if bench.quick else 16000

    def run(name, from_png: bool):
        def go_row():
            emb, note = embedder(name, bench.quick)
            emb = emb.to(bench.device).eval()
            bank = clustered(bank_rows, emb.dim, seed=5, device=bench.device)
            bank_sq = (bank * bank).sum(1)
            if from_png:
                paths = write_pngs(png_images, 256 if not bench.quick else 80)
                from patchsearch.data import iter_batches
                from patchsearch.geometry import crop_geometry

                geometry = crop_geometry(256, 224) if not bench.quick else crop_geometry(72, 64)
                source = lambda: (b_.tensor for b_ in iter_batches(paths, geometry, batch, workers=workers))  # noqa
            else:
                x = torch.randn(n_images, 3, side, side, device=bench.device)
                source = lambda: (x[s:s + batch] for s in range(0, n_images, batch))  # noqa: E731

            def go():
                out = []
                for xb in source():
                    xb = xb.to(bench.device, non_blocking=True)
                    e = emb(xb)
                    nb, h, w, d = e.shape
                    patches = e.reshape(nb, h * w, d)
                    d2, r = torch_knn(patches.reshape(-1, d), bank, bank_sq, K)
                    dist = d2.clamp_min(0).sqrt().view(nb, h * w, K)
                    scores, _ = eq7_torch(patches, dist, r.view(nb, h * w, K), bank, bank_sq)
                    amaps = maps_torch(dist[..., 0].reshape(nb, h, w), (side, side))
                    out.append((scores.cpu(), amaps.cpu(), r.view(nb, h * w, K).cpu()))
                return len(out)
            count = len(paths) if from_png else n_images
            t, _ = bench.timed(go, repeat=2)
            return {"time_s": t, "images_per_s": count / t, "precision": "fp32",
                    "note": f"bank {bank_rows // 1000}k x {emb.dim}; {count} images of {side}x{side}, batch {batch}"
                            + (f", {workers} decode workers" if from_png else "") + f"; {note}",
                    "_free_end": bench.free_now()}
        return go_row

    bench.row("e2e lite0, tensors", "see note", run("efficientnet_lite0", False))
    bench.row(f"e2e {wrn} shape, tensors", "see note", run(wrn, False))
    bench.row("e2e lite0, PNG files", "see note", run("efficientnet_lite0", True))


def write_pngs(n: int, side: int) -> list[Path]:
    """n textured side x side RGB PNG files in a new temporary folder (written by 16 threads)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="bench_gpu_png_"))

    def one(i):
        rng = np.random.default_rng(i)
        img = np.kron(rng.normal(128, 20, (side // 8, side // 8, 3)), np.ones((8, 8, 1)))
        img += rng.normal(0, 4, img.shape)
        p = folder / f"{i:05d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
        return p

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(n)))


# ---------------------------------------------------------------- table
def table(bench: Bench, meta: dict) -> str:
    def f(v, spec):
        return "" if v is None else format(v, spec)

    lines = [f"device: {meta['device_name']}; torch {torch.__version__}; faiss {meta['faiss']}; "
             f"search rows: N images x {P} patches (N in the note), k = {K}, b = {B}", "",
             "| floor | TFLOP/s |", "| --- | ---: |"]
    lines += [f"| {k} matmul | {f(v / 1e12 if v else None, '.3g') or 'not measured (' + meta['device'] + ')'} |"
              for k, v in bench.floors.items()]
    lines += ["", "| method | bank | time s | patches/s | images/s | of mm | recall@9 | peak torch GiB | "
              "device used GiB | note |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in bench.rows:
        note = r.get("note", "") + (f"; {r['check']}" if r.get("check") else "")
        lines.append(f"| {r['method']} | {r['size']} | {f(r.get('time_s'), '.4f')} | {f(r.get('patches_per_s'), ',.0f')} "
                     f"| {f(r.get('images_per_s'), ',.1f')} | {f(r.get('of_mm'), '.0%')} | {f(r.get('recall_at_9'), '.4f')} "
                     f"| {f(r.get('peak_torch_gib'), '.2f')} | {f(r.get('device_used_gib'), '.2f')} | {note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help=f"tiny sizes ({QUICK_SIZES}, 2 images): a smoke test")
    ap.add_argument("--sizes", help=f"banks as ROWS:DIM,... [{SIZES}]")
    ap.add_argument("--images", type=int, help="query images per search row [64, 8 from 1M rows; quick 2]")
    ap.add_argument("--e2e-images", type=int, help="images per end-to-end tensor row [2048; quick 4]")
    ap.add_argument("--png-images", type=int, help="PNG files for the end-to-end PNG row [1024; quick 4]")
    ap.add_argument("--batch", type=int, default=128, help="end-to-end batch [128]")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="PNG decode workers")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no row after this many seconds [300]")
    ap.add_argument("--check", action="store_true", help="torch fp32 rows must equal faiss.knn / Eq. 7 on CPU")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {a.device}: torch sees no CUDA device", file=sys.stderr)
        return 2
    import faiss

    bench = Bench(a.device, a.budget_s, a.quick)
    meta = {"device": a.device, "faiss": faiss.__version__ + (
        " (GPU)" if hasattr(faiss, "StandardGpuResources") else " (CPU only)"),
            "device_name": torch.cuda.get_device_name(bench.device) if bench.cuda else "cpu"}
    with torch.no_grad():
        bench.floors = matmul_floors(bench)
        for rows, d in parse_sizes(a.sizes or (QUICK_SIZES if a.quick else SIZES)):
            search_rows(bench, rows, d, a.images or (2 if a.quick else 64 if rows < 10 ** 6 else 8), bench.floors,
                        a.check)
        e2e_rows(bench, a.e2e_images or (4 if a.quick else 2048), a.png_images or (4 if a.quick else 1024),
                 a.batch if not a.quick else 2, 0 if a.quick else a.workers)
    text = table(bench, meta)
    print(text)
    if a.json:
        a.json.write_text(json.dumps({"meta": meta, "floors": bench.floors, "rows": bench.rows}, indent=1) + "\n")
    failed = [r for r in bench.rows if str(r.get("note", "")).startswith("failed")]
    return 1 if a.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
