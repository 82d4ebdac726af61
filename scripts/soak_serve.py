#!/usr/bin/env python
"""Soak ``patchsearch serve`` on loopback: good clients beside hostile ones, bounded in time
and count, then check that nothing went wrong.

Good clients post real frames and compare every answer with the library's (``query`` in
this process: decision and image score). Beside them, for ``--duration`` seconds: 95 KB
PNG bombs of 9900 x 9900 pixels, EPS bodies, slowloris headers, bodies that trickle,
idle sockets, random HTTP methods and paths, foreign ``Host`` and ``Origin`` headers,
clients that leave mid-upload, bursts of posts beyond ``--max-queue``, and a liveness
probe of ``/healthz`` every 0.2 s. It passes when there are zero wrong answers (a 200
whose decision or score differs from the library's), zero 5xx other than 503, zero
failed probes, no traceback in the server log, and the server's RSS at the end within
10% of its RSS after warm-up (Linux: /proc; elsewhere not measured).

Without ``--index-dir`` a small synthetic index is built in a temporary folder.

    python scripts/soak_serve.py [--duration 60] [--index-dir DIR --category C --frames DIR]

Prints one JSON summary; exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
LIMITS = {"header": 2.0, "body": 3.0, "connections": 64, "queue": 12}
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n"


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Soak:
    def __init__(self, base: str, category: str, frames: list[tuple[bytes, str, float]], seconds: float):
        self.base, self.port, self.category, self.frames = base, int(base.rsplit(":", 1)[1]), category, frames
        self.url = f"/v1/categories/{category}/inspect"
        self.end = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.wrong: list[str] = []
        self.health: list[float] = []

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def bad(self, what: str) -> None:
        with self.lock:
            self.wrong.append(what[:300])

    def status(self, case: str, r: httpx.Response, allowed: tuple) -> None:
        if r.status_code >= 500 and r.status_code != 503:
            self.bad(f"{case}: {r.status_code} {r.text[:200]}")
        elif r.status_code not in allowed:
            self.bad(f"{case}: unexpected {r.status_code} {r.text[:200]}")
        self.count(f"{case}:{r.status_code}")

    def running(self) -> bool:
        return time.monotonic() < self.end

    def loop(self, case, fn, pause: float, most: int = 100_000) -> None:
        rng = random.Random(hash(case) & 0xFFFF)
        for _ in range(most):
            if not self.running():
                return
            try:
                fn(rng)
            except (httpx.TransportError, OSError) as exc:
                self.count(f"{case}:transport_{type(exc).__name__}")
            time.sleep(pause * (0.5 + rng.random()))

    # cases -------------------------------------------------------------------------------
    def good(self, client: httpx.Client, rng) -> None:
        data, decision, score = self.frames[rng.randrange(len(self.frames))]
        r = client.post(self.url, content=data, headers={"content-type": "image/png"})
        self.status("good", r, (200, 503))
        if r.status_code == 200:
            body = r.json()
            if body.get("decision") != decision or abs(body.get("image_score", -1) - score) > 1e-4 * max(1, score):
                self.bad(f"good: answered {body.get('decision')} {body.get('image_score')}, library {decision} {score}")

    def post(self, case, body: bytes, ctype: str, allowed: tuple, headers=None) -> None:
        r = httpx.post(self.base + self.url, content=body, headers={"content-type": ctype, **(headers or {})},
                       timeout=30)
        self.status(case, r, allowed)

    def slow_headers(self, rng) -> None:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=0.3)
        t0 = time.monotonic()
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            while time.monotonic() - t0 < LIMITS["header"] + 3:
                try:
                    got = s.recv(4096)
                except socket.timeout:
                    s.sendall(b"X-Slow: 1\r\n")  # one more header line, never the blank line
                    continue
                if got and not got.startswith(b"HTTP/1.1 408"):
                    self.bad(f"slow_headers: answered {got[:60]!r}")
                self.count("slow_headers:cut")
                return
            self.bad("slow_headers: not cut off in time")
        except (BrokenPipeError, ConnectionResetError):
            self.count("slow_headers:cut")
        finally:
            s.close()

    def slow_body(self, rng) -> None:
        data = self.frames[0][0]
        s = socket.create_connection(("127.0.0.1", self.port), timeout=LIMITS["body"] + 5)
        head = (f"POST {self.url} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        try:
            s.sendall(head + data[:200])
            first = s.recv(200)
            code = first[9:12].decode(errors="replace")
            if code not in ("408", "503"):
                self.bad(f"slow_body: answered {first[:60]!r}")
            self.count(f"slow_body:{code}")
        except socket.timeout:
            self.bad("slow_body: not cut off in time")
        except ConnectionResetError:
            self.count("slow_body:reset")
        finally:
            s.close()

    def idle(self, rng) -> None:
        socks = [socket.create_connection(("127.0.0.1", self.port), timeout=2) for _ in range(40)]
        time.sleep(1.0)
        for s in socks:
            s.close()
        self.count("idle:40_sockets")

    def method(self, rng) -> None:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(3, 12)))
        r = httpx.request(name, self.base + f"/{rng.choice(['healthz', 'v1/categories', 'x', ''])}{rng.random()}")
        self.status("method", r, (400, 404, 405))

    def foreign(self, rng) -> None:
        data = self.frames[0][0]
        if rng.random() < 0.5:
            self.post("foreign_host", data, "image/png", (421,), {"Host": f"evil{rng.randrange(99)}.example"})
        else:
            self.post("foreign_origin", data, "image/png", (403,), {"Origin": "http://evil.example"})

    def disconnect(self, rng) -> None:
        data = self.frames[0][0]
        s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        s.sendall((f"POST {self.url} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n").encode() + data[: len(data) // 3])
        s.close()
        self.count("disconnect:left")

    def burst(self, rng) -> None:
        with httpx.Client(base_url=self.base, timeout=60, limits=httpx.Limits(max_connections=40)) as client, \
                ThreadPoolExecutor(LIMITS["queue"] * 3) as pool:
            list(pool.map(lambda _: self.good(client, random.Random()), range(LIMITS["queue"] * 3)))
        self.count("burst:done")

    def probe(self, rng) -> None:
        t0 = time.perf_counter()
        r = httpx.get(self.base + "/healthz", timeout=5)
        with self.lock:
            self.health.append(time.perf_counter() - t0)
        if r.status_code != 200:
            self.bad(f"healthz: {r.status_code}")

    def run(self, good_clients: int) -> None:
        bomb = __import__("serve_support").zeros_png(9900, 9900)
        cases = [("probe", self.probe, 0.2), ("bomb", lambda r: self.post("bomb", bomb, "image/png", (413, 503)), 1.0),
                 ("eps", lambda r: self.post("eps", EPS, "image/png", (415, 503)), 1.0),
                 ("slow_headers", self.slow_headers, 1.0), ("slow_body", self.slow_body, 1.0),
                 ("idle", self.idle, 3.0), ("method", self.method, 0.1), ("foreign", self.foreign, 0.3),
                 ("disconnect", self.disconnect, 0.5), ("burst", self.burst, 5.0)]
        clients = [httpx.Client(base_url=self.base, timeout=60) for _ in range(good_clients)]
        threads = [threading.Thread(target=self.loop, args=(f"good{i}", lambda r, c=c: self.good(c, r), 0.05))
                   for i, c in enumerate(clients)]
        threads += [threading.Thread(target=self.loop, args=case) for case in cases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in clients:
            c.close()


def expected_answers(index_dir: Path, category: str, paths: list[Path]) -> list[tuple[bytes, str, float]]:
    from patchsearch import PatchIndex
    from patchsearch.query import query

    index = PatchIndex.load(index_dir / category)
    try:
        res = query(index, paths)
        return [(p.read_bytes(), str(d), float(s)) for p, d, s in zip(paths, res.decisions, res.image_scores)]
    finally:
        index.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of mixed load (default 60)")
    ap.add_argument("--index-dir", type=Path)
    ap.add_argument("--category")
    ap.add_argument("--frames", type=Path, help="folder of PNG test frames (searched recursively)")
    ap.add_argument("--good-clients", type=int, default=3)
    ap.add_argument("--max-frames", type=int, default=12)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    if args.index_dir is None:
        from serve_support import make_site

        root, args.index_dir = make_site(Path(tmp.name))
        args.category, args.frames = "widget", root / "widget" / "test"
    found = sorted(args.frames.rglob("*.png"))
    paths = found[:: max(1, len(found) // args.max_frames)][: args.max_frames]
    frames = expected_answers(args.index_dir, args.category, paths)
    from serve_support import free_port, wait_ready

    port = free_port()
    log = Path(tmp.name) / "server.log"
    cmd = [sys.executable, "-m", "patchsearch", "serve", "--index-dir", str(args.index_dir), "--port", str(port),
           "--header-timeout", str(LIMITS["header"]), "--body-timeout", str(LIMITS["body"]),
           "--max-connections", str(LIMITS["connections"]), "--max-queue", str(LIMITS["queue"]),
           "--queue-timeout", "5", "--decode-memory-mb", "512", "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, 180, proc)
        warm = Soak(base, args.category, frames, 3.0)  # every path once, so its buffers exist
        warm.run(2)
        time.sleep(2.0)
        rss_start = rss_kib(proc.pid)
        soak = Soak(base, args.category, frames, args.duration)
        t0 = time.monotonic()
        soak.run(args.good_clients)
        elapsed = time.monotonic() - t0
        time.sleep(3.0)  # deadlines pass, sockets close
        rss_end, alive = rss_kib(proc.pid), proc.poll() is None
        metrics_bytes = len(httpx.get(base + "/metrics", timeout=10).content) if alive else None
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
    text = log.read_text(errors="replace")
    health = np.asarray(soak.health or [0.0])
    answered = sum(v for k, v in soak.counts.items() if k.startswith("good") and k.endswith(":200"))
    summary = {"seconds": round(elapsed, 1), "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
               "good_answers_checked": answered, "wrong": len(soak.wrong), "wrong_examples": soak.wrong[:5],
               "server_5xx_not_503": sum(v for k, v in soak.counts.items()
                                         if k.split(":")[-1].isdigit() and int(k.split(":")[-1]) >= 500
                                         and not k.endswith(":503")),
               "tracebacks": text.count("Traceback"), "alive": alive,
               "healthz_ms": {"n": int(len(soak.health)), "p50": round(float(np.percentile(health, 50)) * 1e3, 1),
                              "p95": round(float(np.percentile(health, 95)) * 1e3, 1),
                              "max": round(float(health.max()) * 1e3, 1)},
               "rss_kib": {"start": rss_start, "end": rss_end}, "metrics_bytes": metrics_bytes,
               "counts": dict(sorted(soak.counts.items()))}
    ok = (not soak.wrong and summary["server_5xx_not_503"] == 0 and not summary["tracebacks"] and alive
          and answered > 0 and (rss_start is None or rss_end <= 1.10 * rss_start))
    summary["passed"] = ok
    print(json.dumps(summary, indent=1))
    tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
