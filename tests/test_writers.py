"""Writers meeting writers: build, rebuild, calibrate, add and remove interleaved at the install
point; calibration frames found again by later writers; rebuild carrying the calibration forward."""

import itertools
import json
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from patchsearch import PatchIndex
from patchsearch.calibrate import fit_calibration
from patchsearch.cli import main
from patchsearch.refit import calibration_frames
from patchsearch.store import PatchStore

SMALL = ["--resize", "64", "--crop", "64", "--batch-size", "4"]
WRITERS = ["build", "rebuild", "calibrate", "add", "remove"]
CONFLICT = re.compile(r"^error: .*another writer installed (v\d{6}) .*run it again$")

# Runs writers (one CLI command per stdin line) in its own process. The first time a command
# goes for the index's writer LOCK (the install point of patchsearch.versions.new_version) it
# writes the "paused" marker and waits for the "go" marker; backbones are loaded once.
WORKER = r"""
import json, sys, time
from pathlib import Path
import torch
from click.testing import CliRunner
import patchsearch.features as features
import patchsearch.versions as versions
from patchsearch.cli import main

torch.set_num_threads(1)  # tiny frames: one thread, no spinning against the test process
real_embedder, loaded = features.PatchEmbedder, {}


def embedder(*args, **kwargs):
    key = repr((args, sorted(kwargs.items())))
    if key not in loaded:
        loaded[key] = real_embedder(*args, **kwargs)
    return loaded[key]


features.PatchEmbedder = embedder
pause = {}


class PausingLock(versions.FileLock):
    def __init__(self, path, *args, **kwargs):
        if Path(path).name == versions.LOCK and pause:
            at, go = pause.pop("at"), pause.pop("go")
            at.write_text("paused")
            deadline = time.monotonic() + 120
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        super().__init__(path, *args, **kwargs)


versions.FileLock = PausingLock
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pause.update(at=Path(job["paused"]), go=Path(job["go"]))
    r = CliRunner().invoke(main, job["args"])
    pause.clear()
    print(json.dumps({"exit_code": r.exit_code, "stderr": r.stderr, "stdout": r.stdout,
                      "exception": None if r.exception is None or isinstance(r.exception, SystemExit)
                      else repr(r.exception)}), flush=True)
"""


class Worker:
    """The writer process: :meth:`start` a command, :meth:`result` waits for its outcome."""

    def __init__(self, cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=cwd)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.result(timeout=120) == {"ready": True}

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def start(self, args, paused: Path, go: Path):
        self.proc.stdin.write(json.dumps({"args": [str(a) for a in args], "paused": str(paused), "go": str(go)}) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float):
        try:
            out = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("the writer process did not answer in time") from None
        assert out is not None, f"the writer process died: {self.proc.stderr.read()}"
        return out

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _texture(rng, size=64):
    base = rng.normal(128, 10, (size // 8, size // 8, 3))
    img = np.kron(base, np.ones((8, 8, 1))) + rng.normal(0, 3, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A generated category (8 train frames: 4 in the store, 4 held aside), a good line frame to
    add, and its index (v000001), built once and copied by each test."""
    from conftest import make_mvtec

    root = make_mvtec(tmp_path_factory.mktemp("data") / "mvtec", n_train=8)
    (root / "widget/line").mkdir()
    _texture(np.random.default_rng(11)).save(root / "widget/line/add_0.png")
    idx = tmp_path_factory.mktemp("idx")
    r = CliRunner().invoke(main, ["build", "--category", "widget", "--data-root", str(root), "--index-dir", str(idx),
                                  "--coreset-ratio", "0.25", *SMALL])
    assert r.exit_code == 0, r.output
    return root, idx / "widget"


@pytest.fixture(scope="module")
def embedders():
    """Backbones loaded once for the writers run in this process (one torch thread: tiny frames)."""
    import torch

    import patchsearch.features as features

    real, loaded = features.PatchEmbedder, {}

    def embedder(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = real(*args, **kwargs)
        return loaded[key]

    mp, threads = pytest.MonkeyPatch(), torch.get_num_threads()
    mp.setattr(features, "PatchEmbedder", embedder)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _current(path: Path) -> str:
    return (path / "CURRENT").read_text().strip()


def _store_images(index: PatchIndex) -> list[str]:
    return PatchStore(index.directory, partitions=index.manifest.store["partitions"]).image_paths()


def _store_frame(path: Path, i: int) -> str:
    index = PatchIndex.load(path)
    try:
        return _store_images(index)[i]
    finally:
        index.close()


def _assert_thresholds_fit_the_bank(index: PatchIndex, data_root: Path):
    """The recorded thresholds are those of re-scoring the recorded frames with this memory bank."""
    cal = index.manifest.calibration
    assert cal, "an index without thresholds"
    frames, missing = calibration_frames(cal, data_root)
    assert frames and not missing, (cal.get("images"), missing)
    fresh = fit_calibration(index, frames, data_root, "check", cal["image"]["target_fpr"], cal["image"]["margin"])
    for kind in ("image", "pixel"):
        assert cal[kind]["threshold"] == pytest.approx(fresh[kind]["threshold"], rel=1e-5), kind


def test_every_pair_of_writers_interleaved_at_the_install_point(base, embedders, tmp_path):
    """Writer A prepares its version from v000001 and is held at the install point (in another
    process) while writer B runs to completion; then A goes on. Every change that reported
    success is in the final version, or A refused in one line naming B's version."""
    root, src = base
    data = root / "widget"
    removed = _store_frame(src, 1)  # a frame of the store (not held aside)
    good = sorted(str(p.relative_to(data)) for p in (data / "test/good").glob("*.png"))

    def args(writer: str, idx: Path) -> list:
        common = ["--category", "widget", "--index-dir", idx]
        return {"build": ["build", *common, "--data-root", root, "--coreset-ratio", "0.25", "--seed", "3", *SMALL],
                "rebuild": ["rebuild", *common, "--data-root", root, "--coreset-ratio", "0.5"],
                "calibrate": ["calibrate", *common, "--data-root", root, "--good", data / "test/good"],
                "add": ["add", data / "line/add_0.png", *common, "--data-root", root],
                "remove": ["remove", *common, "--data-root", root, "--image", removed]}[writer]

    def holds(writer: str, index: PatchIndex) -> bool:
        man, images = index.manifest, _store_images(index)
        return {"build": man.coreset["seed"] == 3,
                "rebuild": man.coreset["ratio"] == 0.5,
                "calibrate": (man.calibration or {}).get("source", "").startswith("patchsearch calibrate")
                and sorted(man.calibration["images"]) == good,
                "add": "line/add_0.png" in images,
                "remove": removed not in images}[writer]

    worker = Worker(tmp_path)
    outcomes = {}
    t_start = time.monotonic()
    try:
        for a, b in itertools.product(WRITERS, WRITERS):
            idx = tmp_path / f"{a}-{b}"
            shutil.copytree(src, idx / "widget")
            paused, go = idx / "paused", idx / "go"
            worker.start(args(a, idx), paused, go)
            deadline = time.monotonic() + 120
            while not paused.exists():
                assert worker.lines.empty(), f"{a} ended before its install point: {worker.result(1)}"
                assert time.monotonic() < deadline, f"{a} never reached its install point"
                time.sleep(0.01)
            rb = _cli(*args(b, idx))  # B runs to completion while A waits at the install point
            assert rb.exit_code == 0, (a, b, rb.output)
            b_version = _current(idx / "widget")
            go.write_text("go")
            ra = worker.result(timeout=120)
            assert ra["exception"] is None, (a, b, ra)
            final = PatchIndex.load(idx / "widget")
            try:
                succeeded = [b] + ([a] if ra["exit_code"] == 0 else [])
                for writer in succeeded:
                    assert holds(writer, final), f"A={a}, B={b}: the change of {writer} (reported done) is missing"
                if ra["exit_code"] != 0:
                    errors = [line for line in ra["stderr"].splitlines() if line.startswith("error:")]
                    assert len(errors) == 1 and errors[0] == ra["stderr"].splitlines()[-1], (a, b, ra["stderr"])
                    m = CONFLICT.match(errors[0])
                    assert m and m.group(1) == b_version, (a, b, errors[0])
                    assert final.version == b_version  # nothing installed by the refused writer
                _assert_thresholds_fit_the_bank(final, data)
            finally:
                final.close()
            outcomes[a, b] = "both" if ra["exit_code"] == 0 else "A refused"
            shutil.rmtree(idx)
    finally:
        worker.close()
    assert len(outcomes) == 25
    print(f"25 pairs in {time.monotonic() - t_start:.1f} s: {sorted(set(outcomes.values()))}")


def test_calibrate_frames_are_found_again_by_add(base, embedders, tmp_path):
    """Frames recorded by calibrate (with and without a data root) are re-scored by a later add."""
    root, src = base
    data = root / "widget"
    for with_root in (True, False):
        idx = tmp_path / str(with_root)
        shutil.copytree(src, idx / "widget")
        if with_root:
            r = _cli("calibrate", "--category", "widget", "--index-dir", idx, "--data-root", root,
                     "--good", data / "test/good")
            assert r.exit_code == 0, r.output
            assert PatchIndex.load(idx / "widget").manifest.calibration["images"][0] == "test/good/000.png"
        else:
            from patchsearch.calibrate import calibrate

            calibrate(idx / "widget", sorted((data / "test/good").glob("*.png"))).close()
        # relative to the data root where recorded so, else found where they were recorded
        r = _cli("add", data / "line/add_0.png", "--category", "widget", "--index-dir", idx,
                 "--data-root", root if with_root else tmp_path / "elsewhere")
        assert r.exit_code == 0, r.output
        index = PatchIndex.load(idx / "widget")
        note = index.manifest.extra["history"][-1]["calibration"]
        assert note.startswith("re-fitted on 3 held-aside good frames"), note
        assert index.manifest.calibration["source"].startswith("patchsearch calibrate (3 good frames) | re-fitted")
        _assert_thresholds_fit_the_bank(index, data)
        index.close()


def test_manifest_without_images_root_still_resolves_under_the_data_root(base, embedders, tmp_path):
    """A calibration record written before images_root was recorded: found under --data-root."""
    root, src = base
    shutil.copytree(src, tmp_path / "widget")
    man_path = tmp_path / "widget" / _current(tmp_path / "widget") / "manifest.json"
    raw = json.loads(man_path.read_text())
    del raw["calibration"]["images_root"]
    man_path.write_text(json.dumps(raw))
    r = _cli("remove", "--category", "widget", "--index-dir", tmp_path, "--data-root", root,
             "--image", _store_frame(src, 0))
    assert r.exit_code == 0, r.output
    index = PatchIndex.load(tmp_path / "widget")
    assert index.manifest.extra["history"][-1]["calibration"].startswith("re-fitted on 4 held-aside good frames")
    _assert_thresholds_fit_the_bank(index, root / "widget")
    index.close()


def test_rebuild_carries_the_calibration_forward(base, embedders, tmp_path):
    root, src = base
    data = root / "widget"
    shutil.copytree(src, tmp_path / "widget")
    path = tmp_path / "widget"
    old = PatchIndex.load(path)
    old_cal = old.manifest.calibration
    old.close()
    # the bank changes: the thresholds are re-fitted on the recorded held-aside frames
    r = _cli("rebuild", "--category", "widget", "--index-dir", tmp_path, "--data-root", root, "--coreset-ratio", "0.5")
    assert r.exit_code == 0, r.output
    assert "thresholds re-fitted on 4 held-aside good frames" in r.stderr
    index = PatchIndex.load(path)
    cal = index.manifest.calibration
    assert cal["images"] == old_cal["images"] and cal["source"].endswith("| re-fitted after patchsearch rebuild")
    assert cal["image"]["threshold"] != old_cal["image"]["threshold"]
    _assert_thresholds_fit_the_bank(index, data)
    index.close()
    r = _cli("query", data / "test/good", data / "test/blob", "--category", "widget", "--index-dir", tmp_path)
    decisions = {Path(json.loads(x)["path"]).parent.name + "/" + Path(json.loads(x)["path"]).name:
                 json.loads(x)["decision"] for x in r.stdout.splitlines()}
    assert set(decisions.values()) <= {"OK", "NG"} and len(decisions) == 6, r.output
    assert all(v == "NG" for k, v in decisions.items() if k.startswith("blob/")), decisions
    # the same options, same bank: the thresholds are kept as they are, without the backbone
    r = _cli("rebuild", "--category", "widget", "--index-dir", tmp_path, "--data-root", tmp_path / "nowhere")
    assert r.exit_code == 0, r.output
    again = PatchIndex.load(path)
    assert again.manifest.calibration == cal
    again.close()
    # an add grew the bank; a rebuild with the same options makes another one: re-fitted
    r = _cli("add", data / "line/add_0.png", "--category", "widget", "--index-dir", tmp_path, "--data-root", root)
    assert r.exit_code == 0, r.output
    r = _cli("rebuild", "--category", "widget", "--index-dir", tmp_path, "--data-root", root)
    assert r.exit_code == 0 and "thresholds re-fitted" in r.stderr, r.output
    index = PatchIndex.load(path)
    _assert_thresholds_fit_the_bank(index, data)
    index.close()


def test_rebuild_installs_nothing_when_the_frames_are_gone(base, embedders, tmp_path):
    root, src = base
    shutil.copytree(src, tmp_path / "widget")
    path = tmp_path / "widget"
    man_path = path / _current(path) / "manifest.json"
    raw = json.loads(man_path.read_text())
    raw["calibration"]["images_root"] = (tmp_path / "moved").as_posix()
    man_path.write_text(json.dumps(raw))
    before = sorted(p.name for p in path.iterdir())
    r = _cli("rebuild", "--category", "widget", "--index-dir", tmp_path, "--data-root", tmp_path / "elsewhere",
             "--coreset-ratio", "0.5")
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the coreset changes (ratio 0.25 -> 0.5"), r.stderr
    assert "4 of the 4 recorded held-aside good frames are not found" in lines[0] and "--data-root" in lines[0]
    assert _current(path) == "v000001" and sorted(p.name for p in path.iterdir()) == before
