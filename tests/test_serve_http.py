"""patchsearch serve at the HTTP layer: a real ``python -m patchsearch serve`` on 127.0.0.1
with short deadlines, driven by raw sockets (slow, idle, broken and foreign clients)."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from serve_support import (PNG, REPO, copy_index, install_copy, make_site, port_of, raw, read_all, read_response,
                           served)

HEADER_S, BODY_S, MAX_CONN, MAX_QUEUE = 2, 6, 12, 3


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("http")
    root, idx = make_site(base)
    served_idx = base / "served"
    copy_index(idx / "widget", served_idx / "widget")
    return root, served_idx, base


@pytest.fixture(scope="module")
def server(site):
    root, idx, base = site
    with served(idx, root, "--poll", "0.2", "--header-timeout", str(HEADER_S), "--body-timeout", str(BODY_S),
                "--max-connections", str(MAX_CONN), "--max-queue", str(MAX_QUEUE), "--log-level", "info",
                log=base / "server.log") as s:
        yield s


def _frame(site, name="good/000.png") -> bytes:
    return (site[0] / "widget/test" / name).read_bytes()


def _post_head(length: int, path="/v1/categories/widget/inspect", ctype="image/png") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_slow_headers_are_cut_off_with_408(server):
    base, *_ = server
    s = raw(port_of(base), b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the blank line never comes
    stop = threading.Event()

    def trickle():  # a byte of header now and then, as slowloris does
        for _ in range(40):
            if stop.wait(0.2):
                return
            try:
                s.sendall(b"X")
            except OSError:
                return

    t0 = time.monotonic()
    threading.Thread(target=trickle, daemon=True).start()
    out = read_all(s, HEADER_S + 4)
    elapsed = time.monotonic() - t0
    stop.set()
    s.close()
    assert out.startswith(b"HTTP/1.1 408"), out
    assert elapsed < HEADER_S + 2


def test_slow_body_is_answered_408_and_closed(server, site):
    base, *_ = server
    data = _frame(site)
    s = raw(port_of(base), _post_head(len(data)) + data[:100])
    t0 = time.monotonic()
    out = read_all(s, BODY_S + 5)
    s.close()
    assert out.startswith(b"HTTP/1.1 408") and b"body_timeout" in out and b"--body-timeout" in out, out
    assert BODY_S - 0.5 < time.monotonic() - t0 < BODY_S + 3


def test_connection_cap_closes_the_longest_idle_connections_first(server):
    base, *_ = server
    idle = [raw(port_of(base)) for _ in range(2 * MAX_CONN)]  # connected, never send a byte
    try:
        time.sleep(0.2)
        r = httpx.get(base + "/healthz", timeout=5)
        assert r.status_code == 200
        closed = 0
        for s in idle:
            s.settimeout(0.2)
            try:
                closed += s.recv(100) == b""  # closed without an answer: evicted
            except (socket.timeout, ConnectionResetError):
                pass
        assert closed >= len(idle) + 1 - MAX_CONN, closed  # the server kept at most MAX_CONN open
    finally:
        for s in idle:
            s.close()


def test_a_full_queue_is_refused_before_the_body_is_read(server, site):
    base, *_ = server
    data = _frame(site)
    slow = [raw(port_of(base), _post_head(len(data)) + data[:50]) for _ in range(MAX_QUEUE)]  # admitted, reading
    try:
        time.sleep(0.5)
        s = raw(port_of(base), _post_head(len(data)))  # headers only: not one byte of body is sent
        t0 = time.monotonic()
        head = read_response(s, 3)
        assert time.monotonic() - t0 < 2
        s.close()
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower() and b"queue_full" in head, head
    finally:
        for s in slow:
            s.close()
    time.sleep(0.3)
    assert httpx.post(base + "/v1/categories/widget/inspect", content=data, headers=PNG, timeout=30).status_code == 200


def test_a_version_is_leased_only_once_the_body_has_arrived(server, site):
    from patchsearch.versions import current_version, list_versions, tidy

    base, *_ = server
    idx = site[1] / "widget"
    data = _frame(site, "blob/000.png")
    old = current_version(idx)
    s = raw(port_of(base), _post_head(len(data)) + data[: len(data) // 2])  # an upload in progress
    try:
        new = install_copy(idx)
        deadline = time.time() + BODY_S - 1.5
        while httpx.get(base + "/readyz").json()["categories"]["widget"] != new and time.time() < deadline:
            time.sleep(0.05)
        tidy(idx)  # the unfinished upload holds no lease: the old version can go
        assert list_versions(idx) == [new] and old != new
        s.sendall(data[len(data) // 2:])
        out = read_response(s, 30).split(b"\r\n\r\n", 1)
    finally:
        s.close()
    assert out[0].startswith(b"HTTP/1.1 200"), out[0]
    assert f'"version":"{new}"'.encode() in out[1] and b'"decision":"NG"' in out[1]


def test_foreign_host_and_origin_are_refused(server, site):
    base, *_ = server
    data = _frame(site)
    evil = httpx.get(base + "/healthz", headers={"Host": "evil.example"})
    assert evil.status_code == 421 and evil.json()["error"] == "host_not_allowed"
    rebound = httpx.post(base + "/v1/categories/widget/inspect", content=data,
                         headers={**PNG, "Host": f"attacker.example:{port_of(base)}"})
    assert rebound.status_code == 421
    cross = httpx.post(base + "/v1/categories/widget/inspect", content=data,
                       headers={**PNG, "Origin": "http://evil.example"})
    assert cross.status_code == 403 and cross.json()["error"] == "cross_origin"
    assert httpx.post(base + "/v1/categories/widget/inspect", content=data,
                      headers={**PNG, "Origin": "null"}).status_code == 403
    same = httpx.post(base + "/v1/categories/widget/inspect", content=data, headers={**PNG, "Origin": base})
    assert same.status_code == 200
    assert httpx.get(base + "/healthz", headers={"Host": f"localhost:{port_of(base)}"}).status_code == 200


def test_a_client_leaving_mid_upload_logs_one_line(server, site):
    base, _, log = server
    before = log.read_text()
    s = raw(port_of(base), _post_head(100_000) + b"\x89PNG" + b"\0" * 1000)
    time.sleep(0.2)
    s.close()
    deadline = time.time() + 10
    while "closed the connection" not in log.read_text()[len(before):] and time.time() < deadline:
        time.sleep(0.1)
    new = log.read_text()[len(before):]
    assert new.count("closed the connection after") == 1 and "Traceback" not in new, new
    assert len([line for line in new.splitlines() if "inspect" in line and "closed" in line]) == 1


def test_head_probes_no_cdn_docs_and_bounded_method_labels(server):
    base, *_ = server
    assert httpx.head(base + "/healthz").status_code == 200
    assert httpx.head(base + "/readyz").status_code == 200
    assert httpx.get(base + "/docs").status_code == 404 and httpx.get(base + "/redoc").status_code == 404
    assert "cdn" not in httpx.get(base + "/").text.lower()
    size = len(httpx.get(base + "/metrics").text)
    rng = random.Random(0)
    methods = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(12)) for _ in range(300)]
    with httpx.Client(base_url=base) as c:
        for m in methods:
            assert c.request(m, f"/x{rng.random()}").status_code in (404, 405)
    text = httpx.get(base + "/metrics").text
    assert not any(m in text for m in methods) and 'method="other"' in text
    assert "/x0." not in text and len(text) < size + 4000


def test_python_dash_m_runs_the_command_line():
    for module in ("patchsearch", "patchsearch.cli"):
        out = subprocess.run([sys.executable, "-m", module, "serve", "--help"], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "--max-pixels" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "-m", "patchsearch", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("Usage: patchsearch ")
