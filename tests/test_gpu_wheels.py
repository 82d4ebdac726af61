"""scripts/gpu_wheels.py: split / join / verify of carried wheels, and requirement resolution (CPU, fast)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_wheels", REPO / "scripts" / "gpu_wheels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gw = _load()


def _files(tmp_path, sizes):
    src = tmp_path / "wheels"
    src.mkdir()
    out = []
    for i, n in enumerate(sizes):
        p = src / f"pkg{i}-1.0-py3-none-any.whl"
        p.write_bytes(bytes((i * 7 + j) % 251 for j in range(n)))
        out.append(p)
    return out


@pytest.mark.parametrize("sizes", [[2500, 10, 1000, 0, 3], [1000, 1000], [1]])
def test_split_join_round_trip(tmp_path, sizes):
    wheels = _files(tmp_path, sizes)
    m = gw.split(wheels, tmp_path / "parts", part_bytes=1000)
    total = sum(sizes)
    assert m["total_bytes"] == total
    assert len(m["parts"]) == gw.parts_needed(total, 1000)
    for p in m["parts"]:
        data = (tmp_path / "parts" / p["name"]).read_bytes()
        assert 0 < len(data) <= 1000 and p["size"] == len(data)
        assert p["sha256"] == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == sorted(
        [p["name"] for p in m["parts"]] + [gw.MANIFEST])
    for w, e in zip(wheels, m["wheels"]):
        assert e["sha256"] == hashlib.sha256(w.read_bytes()).hexdigest() and e["size"] == w.stat().st_size
    assert gw.check_parts(tmp_path / "parts") == ([p["name"] for p in m["parts"]], [])
    joined = gw.join(tmp_path / "parts", tmp_path / "out")
    assert [p.read_bytes() for p in joined] == [w.read_bytes() for w in wheels]
    assert gw.verify_wheels(tmp_path / "out", gw.read_manifest(tmp_path / "out")) == joined


def test_split_of_real_sizes_fits_the_device_limit(tmp_path):
    """Parts stay under 60 MiB for a set whose sizes straddle part boundaries (sparse files)."""
    src = tmp_path / "w"
    src.mkdir()
    for name, size in [("a.whl", 61 * gw.MIB + 5), ("b.whl", 59 * gw.MIB), ("c.whl", 3)]:
        with open(src / name, "wb") as f:
            f.truncate(size)
    m = gw.split(sorted(src.glob("*.whl")), tmp_path / "p")
    assert [p["size"] for p in m["parts"]] == [60 * gw.MIB, 60 * gw.MIB, 8]
    assert all(p["size"] < 64 * gw.MIB for p in m["parts"])


def _split(tmp_path):
    wheels = _files(tmp_path, [2500, 700])
    gw.split(wheels, tmp_path / "parts", part_bytes=1000)
    return tmp_path / "parts"


def test_join_refuses_a_corrupted_part_naming_it(tmp_path):
    parts = _split(tmp_path)
    p = parts / "part-001"
    data = bytearray(p.read_bytes())
    data[10] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(gw.CarryError, match=r"part-001: SHA-256 .* does not match"):
        gw.join(parts, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # parts are checked before anything is written
    good, bad = gw.check_parts(parts)
    assert "part-001" not in good and len(bad) == 1 and "part-001" in bad[0]


def test_join_refuses_truncated_and_missing_parts(tmp_path):
    parts = _split(tmp_path)
    (parts / "part-002").write_bytes((parts / "part-002").read_bytes()[:-1])
    with pytest.raises(gw.CarryError, match=r"part-002: \d+ bytes, the manifest says"):
        gw.join(parts, tmp_path / "out")
    (parts / "part-002").unlink()
    with pytest.raises(gw.CarryError, match="part-002: missing"):
        gw.join(parts, tmp_path / "out")


def test_join_refuses_a_wheel_whose_hash_differs_and_removes_it(tmp_path):
    parts = _split(tmp_path)
    m = json.loads((parts / gw.MANIFEST).read_text())
    m["wheels"][1]["sha256"] = "0" * 64
    (parts / gw.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(gw.CarryError, match=r"pkg1-1\.0-py3-none-any\.whl: SHA-256"):
        gw.join(parts, tmp_path / "out")
    assert (tmp_path / "out" / "pkg0-1.0-py3-none-any.whl").is_file()
    assert not (tmp_path / "out" / "pkg1-1.0-py3-none-any.whl").exists()


def test_manifest_names_cannot_leave_the_folder(tmp_path):
    parts = _split(tmp_path)
    m = json.loads((parts / gw.MANIFEST).read_text())
    m["wheels"][0]["name"] = "../evil.whl"
    (parts / gw.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(gw.CarryError, match="not a plain file name"):
        gw.join(parts, tmp_path / "out")
    assert not (tmp_path / "evil.whl").exists()


def test_cli_join_fails_with_one_line_naming_the_file(tmp_path, capsys):
    parts = _split(tmp_path)
    (parts / "part-000").write_bytes(b"x" * 1000)
    assert gw.main(["join", "--parts", str(parts), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "part-000" in err and err.startswith("gpu_wheels join:")


def _wheel(dest: Path, name: str, requires: list[str]) -> Path:
    """A minimal valid wheel of package ``name`` (a module of the same name)."""
    mod = name.replace("-", "_")
    path = dest / f"{mod}-1.0-py3-none-any.whl"
    dist = f"{mod}-1.0.dist-info"
    meta = "Metadata-Version: 2.1\nName: " + name + "\nVersion: 1.0\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires) + "\nlong description\nRequires-Dist: not-a-header\n"
    files = {f"{mod}/__init__.py": "VALUE = 42\n", f"{dist}/METADATA": meta,
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
        z.writestr(f"{dist}/RECORD", record)
    return path


def test_install_verifies_then_installs_and_names_the_pythonpath(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _wheel(src, "carried-pkg", [])
    gw.split(sorted(src.glob("*.whl")), tmp_path / "parts", part_bytes=300)
    gw.join(tmp_path / "parts", tmp_path / "joined")
    assert gw.main(["install", "--wheels", str(tmp_path / "joined"), "--target", str(tmp_path / "site")]) == 0
    out = capsys.readouterr().out
    assert f"export PYTHONPATH={tmp_path / 'site'}" in out
    done = subprocess.run([sys.executable, "-c", "import carried_pkg; print(carried_pkg.VALUE)"],
                          env={"PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True)
    assert done.stdout.strip() == "42"
    whl = next((tmp_path / "joined").glob("*.whl"))
    whl.write_bytes(whl.read_bytes() + b"!")
    assert gw.main(["install", "--wheels", str(tmp_path / "joined"), "--target", str(tmp_path / "site2")]) == 1
    assert "carried_pkg-1.0-py3-none-any.whl: " in capsys.readouterr().err
    assert not (tmp_path / "site2").exists()


def test_requirements_from_metadata_markers_extras_and_headers_only():
    env = gw.target_env("3.12")
    text = ("Name: x\nRequires-Dist: numpy>=1.25\nRequires-Dist: libcuvs-cu13==26.06.*\n"
            "Requires-Dist: cuda-toolkit[cublas,curand]==13.*\n"
            "Requires-Dist: pytest; extra == \"test\"\nRequires-Dist: pywin32; sys_platform == \"win32\"\n"
            "Requires-Dist: tomli; python_version < \"3.11\"\n\nRequires-Dist: body-text\n")
    assert gw.requirements_from_metadata(text, env) == [
        ("numpy", "numpy>=1.25"), ("libcuvs-cu13", "libcuvs-cu13==26.6.*"),
        ("cuda-toolkit", "cuda-toolkit[cublas,curand]==13.*")]
    assert gw.normalize_spec("==26.06.*") == "==26.6.*"
    assert gw.normalize_spec(">=10.3.7,<11") == ">=10.3.7,<11"
    assert gw.normalize_spec("==2.0") == "==2.0" and gw.normalize_spec("==1.10.0") == "==1.10.0"
    assert gw.normalize_name("Faiss_GPU.cuvs") == "faiss-gpu-cuvs"


def test_download_follows_requires_dist_until_nothing_is_missing(tmp_path, monkeypatch):
    """faiss-gpu-cuvs -> libcuvs -> libraft/librmm -> rapids-logger; present packages skipped."""
    graph = {"faiss-gpu-cuvs": ["numpy>=1.25", "nvidia-cublas<14,>=13.2", "libcuvs-cu13==26.06.*",
                                "librmm-cu13==26.06.*"],
             "libcuvs-cu13": ["libraft-cu13==26.6.*", "librmm-cu13==26.6.*", "cuda-toolkit[cublas]==13.*"],
             "libraft-cu13": ["rapids-logger==0.2.*"], "librmm-cu13": ["rapids-logger==0.2.*"],
             "rapids-logger": [], "ghost": ["not-on-any-index"]}
    calls = []

    def fake_pip(specs, dest, python, plats, pip):
        calls.append(list(specs))
        for s in specs:
            name = gw.normalize_name(s.split("=")[0].split("<")[0].split(">")[0].split("[")[0])
            _wheel(dest, name, graph.get(name, []))

    monkeypatch.setattr(gw, "pip_download", fake_pip)
    report = gw.download(["faiss-gpu-cuvs"], tmp_path / "d", "3.12", gw.platforms(28),
                         {"numpy", "nvidia-cublas", "cuda-toolkit"}, pip=[])
    status = {r["name"]: r["status"] for r in report}
    assert status == {"numpy": "present on target (version not checked)",
                      "nvidia-cublas": "present on target (version not checked)",
                      "libcuvs-cu13": "downloaded", "librmm-cu13": "downloaded", "libraft-cu13": "downloaded",
                      "cuda-toolkit": "present on target (version not checked)", "rapids-logger": "downloaded"}
    assert calls[0] == ["faiss-gpu-cuvs"] and ["libcuvs-cu13==26.6.*", "librmm-cu13==26.6.*"] in calls
    assert sum(c.count("rapids-logger==0.2.*") for c in calls) == 1
    assert len(list((tmp_path / "d").glob("*.whl"))) == 5


def test_whole_wheels_manifest_and_install_skip(tmp_path, capsys):
    src = tmp_path / "w"
    src.mkdir()
    _wheel(src, "keep-me", [])
    _wheel(src, "faiss-cpu", [])
    assert gw.main(["manifest", "--wheels", str(src)]) == 0
    assert gw.main(["install", "--wheels", str(src), "--target", str(tmp_path / "site"), "--skip", "faiss_cpu"]) == 0
    assert (tmp_path / "site" / "keep_me").is_dir() and not (tmp_path / "site" / "faiss_cpu").exists()
    (src / "keep_me-1.0-py3-none-any.whl").write_bytes(b"not a wheel")
    assert gw.main(["install", "--wheels", str(src), "--target", str(tmp_path / "s2")]) == 1
    assert "keep_me-1.0-py3-none-any.whl: " in capsys.readouterr().err
