"""patchsearch serve under load: liveness stays prompt behind a burst of image work, and a
short bounded soak of good and hostile clients finds no wrong answer (loopback only)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_support import REPO, make_site, served

BURST = 200


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_site(tmp_path_factory.mktemp("load"))


def _frames(tmp_path, n=8, size=640) -> list[bytes]:
    """Smooth PNG frames of ``size`` pixels a side: small to send, costly to decode and map."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = tmp_path / f"f{i}.png"
        blocks = rng.integers(90, 170, (size // 32, size // 32, 3), dtype=np.uint8)
        Image.fromarray(np.kron(blocks, np.ones((32, 32, 1), np.uint8))).save(path)
        out.append(path.read_bytes())
    return out


def test_healthz_stays_prompt_while_200_inspect_requests_are_in_flight(site, tmp_path):
    root, idx = site
    frames = _frames(tmp_path)
    with served(idx, root, "--max-queue", str(BURST + 16), "--queue-timeout", "300", "--body-timeout", "300",
                "--log-level", "warning", log=tmp_path / "server.log") as (base, proc, log):
        idle = []
        for _ in range(30):  # what this machine's load alone costs a probe
            t0 = time.perf_counter()
            assert httpx.get(base + "/healthz", timeout=10).status_code == 200
            idle.append(time.perf_counter() - t0)
            time.sleep(0.03)
        inflight, probes, done = [0], [], threading.Event()

        async def burst():
            async with httpx.AsyncClient(base_url=base, timeout=600,
                                         limits=httpx.Limits(max_connections=BURST + 8)) as client:
                async def one(i):
                    inflight[0] += 1
                    try:
                        r = await client.post("/v1/categories/widget/inspect", content=frames[i % len(frames)],
                                              headers={"content-type": "image/png"})
                        return r.status_code, r.json().get("decision")
                    finally:
                        inflight[0] -= 1

                return await asyncio.gather(*(one(i) for i in range(BURST)))

        def probe():
            while not done.is_set():
                busy = inflight[0]
                t0 = time.perf_counter()
                status = httpx.get(base + "/healthz", timeout=10).status_code
                if busy >= BURST // 2:  # measured while most of the burst is in the service
                    probes.append((time.perf_counter() - t0, status))
                time.sleep(0.05)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        t0 = time.monotonic()
        answers = asyncio.run(burst())
        burst_s = time.monotonic() - t0
        done.set()
        prober.join(20)
    lat, idle = np.array([t for t, _ in probes]), np.array(idle)
    print(f"burst of {BURST} ({burst_s:.1f} s): /healthz n={len(lat)} p50 {np.percentile(lat, 50) * 1e3:.0f} ms, "
          f"p95 {np.percentile(lat, 95) * 1e3:.0f} ms, max {lat.max() * 1e3:.0f} ms; idle service: p95 "
          f"{np.percentile(idle, 95) * 1e3:.0f} ms, max {idle.max() * 1e3:.0f} ms; load average "
          f"{os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'):.1f} on {os.cpu_count()} CPUs")
    assert all(s == 200 and d in ("OK", "NG", "ERROR") for s, d in answers), answers
    assert len(lat) >= 10 and all(s == 200 for _, s in probes)
    # 250 ms / 1 s on a machine of its own; a machine shared with other work adds what an idle
    # service's probes already take there
    assert np.percentile(lat, 95) < 0.25 + 2 * np.percentile(idle, 95)
    assert lat.max() < 1.0 + 4 * idle.max()


def test_short_soak_finds_no_wrong_answer():
    out = subprocess.run([sys.executable, "scripts/soak_serve.py", "--duration", "15"], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert out.returncode == 0 and summary["passed"], out.stdout[-3000:] + out.stderr[-3000:]
    assert summary["wrong"] == 0 and summary["server_5xx_not_503"] == 0 and summary["good_answers_checked"] > 0
    counts = summary["counts"]
    for case in ("bomb:413", "eps:415", "foreign_host:421", "foreign_origin:403", "slow_headers:cut", "slow_body:408"):
        assert counts.get(case, 0) > 0, (case, counts)
