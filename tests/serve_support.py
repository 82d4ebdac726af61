"""Helpers of the service tests: a tiny index, a served subprocess or in-process server on
127.0.0.1, raw sockets for slow and broken clients, new versions installed by hand."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from conftest import make_mvtec

REPO = Path(__file__).resolve().parents[1]
PNG = {"content-type": "image/png"}


def make_site(base: Path, size: int = 64) -> tuple[Path, Path]:
    """(data root with category 'widget', index directory holding 'widget')."""
    from patchsearch.data import train_images
    from patchsearch.pipeline import build

    root = make_mvtec(base / "mvtec", "widget", n_train=6, n_good=2, n_bad=2, size=size)
    build(train_images(root, "widget"), base / "idx" / "widget", category="widget", data_root=root / "widget",
          resize=64, coreset_ratio=0.25, batch_size=4)
    return root, base / "idx"


def copy_index(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("leases", "LOCK", ".tmp-*"))
    return dst


def install_copy(root: Path, calibrated: bool = True, calibration_of: str | None = None) -> str:
    """Install a copy of ``root``'s current version as a new version: without its
    calibration if not ``calibrated``, with the calibration of version ``calibration_of``
    if given; returns the new version's name."""
    from patchsearch.format import read_manifest, write_manifest
    from patchsearch.versions import current_version, new_version

    src = root / current_version(root)
    with new_version(root) as tmp:
        for item in src.iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        if not calibrated or calibration_of:
            man = read_manifest(tmp)
            man.calibration = read_manifest(root / calibration_of).calibration if calibration_of else None
            write_manifest(tmp, man)
    return current_version(root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, timeout: float = 90.0, proc=None, status: int = 200) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/readyz", timeout=5).status_code == status:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the service did not become ready")


@contextmanager
def served(index_dir: Path, data_root: Path | None, *args: str, log: Path, module: str = "patchsearch"):
    """``python -m <module> serve --index-dir ... <args>`` on a free loopback port; yields
    (base URL, process, log path). ``log`` collects its stdout and stderr."""
    port = free_port()
    cmd = [sys.executable, "-m", module, "serve", "--index-dir", str(index_dir), "--port", str(port), *args]
    if data_root is not None:
        cmd += ["--data-root", str(data_root)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out,
                                stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc=proc)
            yield base, proc, log
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextmanager
def in_process(settings, timeout: float = 90.0):
    """The service with ``settings`` under uvicorn (the guarded protocol) in a thread of this
    process, so a test can patch its internals; yields the base URL."""
    import uvicorn

    from patchsearch.service.run import uvicorn_config

    port = free_port()
    config = uvicorn_config(settings, "127.0.0.1", port, "warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout)
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


def raw(port: int, data: bytes = b"", timeout: float = 5.0) -> socket.socket:
    """A connected socket to the loopback port that has sent ``data``."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if data:
        s.sendall(data)
    return s


def read_all(s: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes (or ``timeout`` passes without data)."""
    s.settimeout(timeout)
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return out


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def zeros_png(width: int, height: int, mode: str = "L") -> bytes:
    """PNG bytes of a ``width`` x ``height`` frame of zeros (8-bit ``L`` or ``RGB``), written
    row by row: a 9900 x 9900 one is 95 KB and never takes its pixels' memory here."""
    import struct
    import zlib

    ctype, bands = {"L": (0, 1), "RGB": (2, 3)}[mode]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + width * bands)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, ctype, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def read_response(s: socket.socket, timeout: float = 5.0) -> bytes:
    """One HTTP response (headers and a Content-Length body) from ``s``, as far as it came
    within ``timeout`` seconds."""
    s.settimeout(timeout)
    end = time.monotonic() + timeout
    out = b""
    while time.monotonic() < end:
        head, sep, body = out.partition(b"\r\n\r\n")
        if sep:
            length = [int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
                      if k.strip().lower() == b"content-length"]
            if len(body) >= (length[0] if length else 0):
                break
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        out += chunk
    return out
