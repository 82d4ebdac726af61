#!/usr/bin/env python
"""Latency and throughput of ``patchsearch serve`` at concurrency 1, 4 and 16, with and
without dynamic batching, next to the in-process library time for the same frames.

With ``--index-dir DIR --category C --frames DIR`` it serves that index (e.g. bottle:
``--frames $PATCHSEARCH_DATA_ROOT/bottle/test/broken_large``). Without, it builds a
small synthetic index (10 textured 896 x 896 training frames, the default backbone,
whole frame at 256) in a temporary folder and uses synthetic 896 x 896 PNG frames.
The server runs in a subprocess on 127.0.0.1; clients are threads with httpx.

    python scripts/bench_serve.py [--requests 24] [--concurrency 1,4,16]

With ``--burst N`` it measures instead how long ``GET /healthz`` takes (a fresh
connection each time, every 50 ms) while N inspect requests are in flight at once
(``--max-queue`` raised so that all N are admitted), next to the idle service's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this tree's patchsearch, as the served subprocess uses


def synthetic(root: Path, n_train: int = 10, n_test: int = 8, size: int = 896) -> tuple[Path, list[Path]]:
    rng = np.random.default_rng(0)

    def frame(defect):
        img = np.kron(rng.normal(128, 10, (size // 8, size // 8, 3)), np.ones((8, 8, 1))) + rng.normal(0, 3, (size, size, 3))
        if defect:
            img[size // 3:size // 2, size // 3:size // 2] = [250, 20, 20]
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))

    (root / "synth/train/good").mkdir(parents=True)
    (root / "test").mkdir()
    for i in range(n_train):
        frame(False).save(root / f"synth/train/good/{i:03d}.png")
    for i in range(n_test):
        frame(i % 2 == 1).save(root / f"test/{i:03d}.png")
    return root, sorted((root / "test").glob("*.png"))


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def run_level(base: str, category: str, frames: list[bytes], concurrency: int, requests: int) -> dict:
    with httpx.Client(base_url=base, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        def one(i):
            t0 = time.perf_counter()
            r = client.post(f"/v1/categories/{category}/inspect", content=frames[i % len(frames)],
                            headers={"content-type": "image/png"})
            return time.perf_counter() - t0, r.status_code

        one(0)  # warm
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - t0
    lat = [t for t, _ in results]
    return {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99),
            "ips": requests / wall, "failed": sum(s != 200 for _, s in results)}


def health_under_burst(base: str, category: str, frames: list[bytes], n: int) -> dict:
    """/healthz latency (ms: p50, p95, max) while ``n`` inspect requests are in flight, and idle."""
    def probe_once() -> float:
        t0 = time.perf_counter()
        httpx.get(base + "/healthz", timeout=30).raise_for_status()
        return time.perf_counter() - t0

    idle = [probe_once() for _ in range(30)]
    inflight, probes, done = [0], [], threading.Event()

    async def burst():
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=n + 8)) as c:
            async def one(i):
                inflight[0] += 1
                try:
                    r = await c.post(f"/v1/categories/{category}/inspect", content=frames[i % len(frames)],
                                     headers={"content-type": "image/png"})
                    return r.status_code
                finally:
                    inflight[0] -= 1
            return await asyncio.gather(*(one(i) for i in range(n)))

    def prober():
        while not done.is_set():
            busy = inflight[0]
            t = probe_once()
            if busy >= n // 2:
                probes.append(t)
            time.sleep(0.05)

    thread = threading.Thread(target=prober, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    codes = asyncio.run(burst())
    wall = time.perf_counter() - t0
    done.set()
    thread.join(30)
    ms = lambda v, q: float(np.percentile(np.asarray(v) * 1000.0, q))  # noqa: E731
    return {"n": len(probes), "p50": ms(probes, 50), "p95": ms(probes, 95), "max": max(probes) * 1000.0,
            "idle_p50": ms(idle, 50), "idle_p95": ms(idle, 95), "idle_max": max(idle) * 1000.0, "burst_s": wall,
            "answered": sum(c == 200 for c in codes), "refused": sum(c == 503 for c in codes),
            "other": sum(c not in (200, 503) for c in codes)}


def serve(index_dir: Path, data_root: Path, max_batch: int, *extra: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "from patchsearch.cli import main; main()", "serve",
                             "--index-dir", str(index_dir), "--data-root", str(data_root), "--port", str(port),
                             "--max-batch", str(max_batch), "--log-level", "warning", *extra],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the service did not become ready")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index-dir", type=Path)
    ap.add_argument("--category")
    ap.add_argument("--frames", type=Path, help="folder of test frames (PNG)")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--burst", type=int, default=0, help="measure /healthz while this many inspects are in flight")
    args = ap.parse_args()
    from patchsearch import PatchIndex
    from patchsearch.query import query

    tmp = tempfile.TemporaryDirectory()
    if args.index_dir is None:
        from patchsearch.data import train_images
        from patchsearch.pipeline import build

        root, paths = synthetic(Path(tmp.name) / "data")
        args.index_dir, args.category, data_root = Path(tmp.name) / "idx", "synth", root
        build(train_images(root, "synth"), args.index_dir / "synth", category="synth", data_root=root / "synth")
    else:
        paths = sorted(args.frames.glob("*.png"))
        data_root = args.data_root or args.index_dir
    frames = [p.read_bytes() for p in paths]
    index = PatchIndex.load(args.index_dir / args.category)
    query(index, paths[:1], batch_size=1)  # warm
    lib = []
    for p in paths:
        t0 = time.perf_counter()
        query(index, [p], batch_size=1)
        lib.append(time.perf_counter() - t0)
    size = Image.open(paths[0]).size
    print(f"{args.category}: {index.size} x {index.dim} {index.index_type} bank, frames {size[0]} x {size[1]} PNG; "
          f"library in process (query of one frame, batch 1): median {statistics.median(lib) * 1000:.0f} ms "
          f"({len(lib)} frames)")
    index.close()
    print(f"load average before serving: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if args.burst:
        proc, base = serve(args.index_dir, data_root, args.max_batch, "--max-queue", str(args.burst + 16),
                           "--queue-timeout", "600", "--body-timeout", "600")
        try:
            r = health_under_burst(base, args.category, frames, args.burst)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        print(f"\n/healthz while {args.burst} inspect requests are in flight ({r['burst_s']:.1f} s; {r['answered']} "
              f"answered, {r['refused']} refused, {r['other']} other): n={r['n']}, p50 {r['p50']:.0f} ms, p95 "
              f"{r['p95']:.0f} ms, max {r['max']:.0f} ms; idle service: p50 {r['idle_p50']:.0f} ms, p95 "
              f"{r['idle_p95']:.0f} ms, max {r['idle_max']:.0f} ms; load average now "
              f"{os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'):.2f}")
        tmp.cleanup()
        return
    print("\n| service | concurrency | p50 ms | p95 ms | p99 ms | images/s | p50 / library | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for label, max_batch in ((f"batched (max batch {args.max_batch})", args.max_batch), ("batch size 1", 1)):
        proc, base = serve(args.index_dir, data_root, max_batch)
        try:
            for c in (int(x) for x in args.concurrency.split(",")):
                r = run_level(base, args.category, frames, c, args.requests)
                print(f"| {label} | {c} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | {r['ips']:.2f} | "
                      f"{r['p50'] / 1000 / statistics.median(lib):.2f}x | {r['failed']} |", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    tmp.cleanup()


if __name__ == "__main__":
    main()
