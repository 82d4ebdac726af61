"""--device / device=: a runtime choice (never part of an index), parsed and resolved with
one-line errors; the device search path (torch k-NN, Eq. 7 and maps on the device) run on
the CPU and compared with today's FAISS results; GPU placement checked with a pretend GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import torch  # noqa: F401  (before faiss, as elsewhere in the tests)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from patchsearch import PatchIndex, device, device_search, searchers, torch_search  # noqa: E402
from patchsearch.cli import main  # noqa: E402
from patchsearch.errors import InputError  # noqa: E402
from test_gpu import assert_same_neighbours  # noqa: E402
from test_gpu_plan import FakeGpuFaiss  # noqa: E402

SMALL = ["--resize", "64", "--batch-size", "4", "--coreset-ratio", "0.25"]


def _data(rows=3000, d=48, n=1500, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, rows // 64), d))
    bank = (centres[rng.integers(0, len(centres), rows)] + 0.5 * rng.normal(size=(rows, d))).astype(np.float32)
    q = (bank[rng.integers(0, rows, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    return bank, q


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(device, "torch_cuda_count", lambda: 0)
    monkeypatch.setattr(device, "faiss_gpu_count", lambda: 0)


@pytest.fixture
def fake_gpus(monkeypatch):
    """faiss 'sees' ngpu GPUs (CPU clones, every copy recorded); torch sees none."""
    def install(ngpu):
        fake = FakeGpuFaiss(ngpu)
        monkeypatch.setattr(searchers, "faiss", lambda: fake)
        monkeypatch.setattr(device, "torch_cuda_count", lambda: 0)
        return fake
    return install


# ------------------------------------------------------------------ parsing and resolving
@pytest.mark.parametrize("value,want", [("cpu", "cpu"), (" CUDA ", "cuda"), ("cuda:0", "cuda:0"), ("cuda:03", "cuda:3"),
                                        ("auto", "auto")])
def test_parse_device_forms(value, want):
    assert device.parse_device(value) == want


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:-1", "cpu:0", "auto:1", "", None, "cuda:x", "mps"])
def test_parse_device_refuses_other_values_naming_the_parameter(value):
    with pytest.raises(InputError, match=r"^device must be cpu, cuda, cuda:N or auto, got ") as e:
        device.parse_device(value)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"^--device must be"):
        device.parse_device(value, "--device")


def test_resolve_auto_and_missing_gpus(no_gpu, monkeypatch):
    assert device.resolve_device("auto") == "cpu" and device.resolve_device("cpu") == "cpu"
    with pytest.raises(InputError, match=r"^device='cuda': no CUDA device here \(.*\): use device='cpu' or 'auto'$"):
        device.resolve_device("cuda")
    with pytest.raises(InputError, match=r"^--device cuda:1: no CUDA device here .*: use --device cpu or auto$"):
        device.resolve_device("cuda:1", "--device")
    monkeypatch.setattr(device, "faiss_gpu_count", lambda: 2)  # GPUs seen by faiss-gpu alone count too
    assert device.resolve_device("auto") == "cuda" and device.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(InputError, match=r"^device='cuda:2': only 2 CUDA device\(s\) here \(0\.\.1\)"):
        device.resolve_device("cuda:2")


def test_index_device_refuses_bad_values_and_absent_gpus_in_one_line(no_gpu):
    bank, _ = _data(500, 8, 1)
    with pytest.raises(InputError, match=r"^device must be cpu, cuda, cuda:N or auto, got 'gpu'$"):
        PatchIndex.from_embeddings(bank, device="gpu")
    for kw in ({"device": "cuda"}, {"gpu": True}):  # gpu=True is device="cuda": no silent CPU
        with pytest.raises(InputError, match=r"^device='cuda': no CUDA device here"):
            PatchIndex.from_embeddings(bank, **kw)
    with pytest.raises(InputError, match=r"^gpu=False contradicts device='cuda'"):
        PatchIndex.from_embeddings(bank, device="cuda", gpu=False)
    with pytest.raises(InputError, match=r"^exact must be one of auto, fp32, faiss, bf16, int8, torch, got 'fast'$"):
        PatchIndex.from_embeddings(bank, exact="fast")
    with pytest.raises(InputError, match=r"^precision must be one of fp32, tf32, bf16, fp16, got 'fp8'$"):
        PatchIndex.from_embeddings(bank, device="cpu", exact="torch", precision="fp8")
    assert PatchIndex.from_embeddings(bank, device="auto").device == "cpu"
    assert PatchIndex.from_embeddings(bank).device == "cpu"
    assert PatchIndex.from_embeddings(bank, gpu=False).device == "cpu"


def test_searcher_choice(monkeypatch):
    monkeypatch.setattr(searchers, "num_gpus", lambda: 0)
    assert device_search.choose("cuda", "auto", False) == device_search.Plan("cuda", False, True, None)
    assert device_search.choose("cuda:1", "auto", True) == device_search.Plan("cuda:1", False, False, [1])  # IVF: CPU
    assert device_search.choose("cpu", "torch", False).torch and not device_search.choose("cpu", "auto", False).torch
    with pytest.raises(InputError, match=r"^exact='int8' is a CPU search"):
        device_search.choose("cuda", "int8", False)
    monkeypatch.setattr(searchers, "num_gpus", lambda: 2)
    assert device_search.choose("cuda", "auto", False) == device_search.Plan("cuda", True, False, None)
    assert device_search.choose("cuda", "torch", False).torch  # torch asked for: even with faiss-gpu


# ------------------------------------------------------------------ the device path on the CPU
@pytest.mark.parametrize("precision,budget", [("fp32", None), ("tf32", None), ("bf16", None), ("fp16", None),
                                              ("fp32", 30000), ("bf16", 30000)])  # 30000: bank blocks of 29 rows
def test_torch_knn_equals_faiss(precision, budget):
    bank, q = _data()
    d0, r0 = faiss.knn(q, bank, 9)
    d1, r1 = torch_search.knn(q, bank, 9, "cpu", precision, budget=budget)
    assert d1.dtype == torch.float32 and r1.dtype == torch.int64
    assert_same_neighbours(q, bank, d0, r0, d1.numpy(), r1.numpy())
    assert (np.diff(d1.numpy(), axis=1) >= 0).all()


def test_reduced_precision_candidates_are_checked():
    """Few bf16 candidates over rows nearly equidistant from the query: the check sends the
    queries whose true neighbours may lie outside them to an exact search, so results stay exact."""
    rng = np.random.default_rng(3)
    d = 64
    q = rng.normal(size=(40, d)).astype(np.float32)
    shell = rng.normal(size=(40, 200, d))
    shell /= np.linalg.norm(shell, axis=2, keepdims=True)
    radius = 5.0 * (1 + 1e-3 * rng.random((40, 200, 1)))
    bank = (q[:, None, :] + radius * shell).reshape(-1, d).astype(np.float32)
    stats = {}
    d1, r1 = torch_search.knn(q, bank, 9, "cpu", "bf16", candidates=12, stats=stats)
    d0, r0 = faiss.knn(q, bank, 9)
    assert stats.get("rechecked", 0) > 0
    assert_same_neighbours(q, bank, d0, r0, d1.numpy(), r1.numpy())


def test_patch_index_torch_path_on_cpu_equals_faiss():
    bank, q = _data(4000, 48, 3 * 400)
    ref = PatchIndex.from_embeddings(bank, device="cpu")
    dev = PatchIndex.from_embeddings(bank, device="cpu", exact="torch")
    assert type(dev.searcher).__name__ == "TorchSearcher" and type(ref.searcher).__name__ == "ShardedSearcher"
    np.testing.assert_array_equal(dev.support, ref.support)  # the support-set graph from the torch search
    patches = q.reshape(3, 400, -1)
    a = ref.search(patches)
    for got in (dev.search(patches), dev.search(torch.from_numpy(patches))):  # numpy, and the tensor path
        np.testing.assert_array_equal(got.top_patches, a.top_patches)
        np.testing.assert_allclose(got.image_scores, a.image_scores, rtol=1e-5)
        assert_same_neighbours(q, bank, a.distances.reshape(-1, 9), a.locations.reshape(-1, 9),
                               got.distances.reshape(-1, 9), got.locations.reshape(-1, 9))
        assert got.distances.dtype == np.float32 and got.locations.dtype == np.int64
    sup_free = PatchIndex.from_embeddings(bank, device="cpu", exact="torch", support_sets=False)
    np.testing.assert_allclose(sup_free.search(torch.from_numpy(patches)).image_scores, a.image_scores, rtol=1e-5)


def test_tensor_search_checks_its_input():
    bank, q = _data(500, 8, 20)
    index = PatchIndex.from_embeddings(bank, device="cpu", exact="torch")
    bad = torch.from_numpy(q.reshape(2, 10, 8).copy())
    bad[1, 3, 2] = float("nan")
    with pytest.raises(InputError, match=r"NaN or infinite values \(image 1\)"):
        index.search(bad)
    with pytest.raises(InputError, match=r"patches must be \(N, P, 8\)"):
        index.search(torch.zeros(2, 3, 7))
    with pytest.raises(InputError, match=r"k=501 must be between 1"):
        index.search(torch.from_numpy(q.reshape(2, 10, 8)), k=501)


def test_eq7_on_the_device_equals_numpy():
    from patchsearch.score import reweighted_scores

    rng = np.random.default_rng(1)
    bank = rng.normal(size=(300, 16)).astype(np.float32)
    sup = rng.integers(0, 300, (5, 9))
    m = rng.normal(size=(5, 16)).astype(np.float32)
    s = rng.random(5).astype(np.float32) * 4
    want = reweighted_scores(m, s, sup, bank)
    got = torch_search.reweighted_scores(torch.from_numpy(m), torch.from_numpy(s), torch.from_numpy(bank[sup]))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    np.testing.assert_array_equal(torch_search.reweighted_scores(torch.from_numpy(m), torch.from_numpy(s),
                                                                 torch.from_numpy(bank[sup[:, :1]])).numpy(), s)


def test_faiss_shards_take_torch_tensors_and_merge():
    bank, q = _data(3000, 32, 200)
    shards = searchers.build_flat_shards(bank, 3)
    starts = [a for a, _ in searchers.shard_bounds(len(bank), 3)]
    d1, r1 = torch_search.faiss_knn(shards, starts, torch.from_numpy(q), 9)
    d0, r0 = faiss.knn(q, bank, 9)
    assert_same_neighbours(q, bank, d0, r0, d1.numpy(), r1.numpy())


# ------------------------------------------------------------------ pretend GPUs (faiss-gpu placement)
def test_support_graph_uses_the_placed_shards_not_a_second_copy(fake_gpus):
    fake = fake_gpus(1)
    bank, q = _data(2000, 16, 30)
    index = PatchIndex.from_embeddings(bank, shards=2, device="cuda")
    assert index._sharded.on_gpu and len(fake.copies) == 2  # one per shard; none for the support-set graph
    ref = PatchIndex.from_embeddings(bank, shards=2, device="cpu")
    np.testing.assert_array_equal(index.support, ref.support)
    index.device = "cpu"  # the pretend GPU indexes are CPU clones: feed them CPU tensors
    got, want = index.search(torch.from_numpy(q.reshape(3, 10, 16))), ref.search(q.reshape(3, 10, 16))
    assert device_search.resident(index) == "faiss"
    np.testing.assert_allclose(got.image_scores, want.image_scores, rtol=1e-5)
    assert_same_neighbours(q, bank, want.distances.reshape(-1, 9), want.locations.reshape(-1, 9),
                           got.distances.reshape(-1, 9), got.locations.reshape(-1, 9))


def test_cuda_n_pins_every_shard_to_gpu_n(fake_gpus):
    fake = fake_gpus(3)
    bank, _ = _data(2000, 16, 1)
    PatchIndex.from_embeddings(bank, shards=4, device="cuda:2", support_sets=False)
    assert [c["device"] for c in fake.copies] == [2, 2, 2, 2]
    fake.copies.clear()
    PatchIndex.from_embeddings(bank, shards=4, device="cuda", support_sets=False)
    assert [c["device"] for c in fake.copies] == [0, 1, 2, 0]  # every GPU, round robin
    with pytest.raises(InputError, match=r"^device='cuda:3': only 3 CUDA device\(s\)"):
        PatchIndex.from_embeddings(bank, device="cuda:3")


# ------------------------------------------------------------------ built on one device, queried on another
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from conftest import make_mvtec

    root = make_mvtec(tmp_path_factory.mktemp("mvtec"))
    idx = tmp_path_factory.mktemp("indexes")
    r = CliRunner().invoke(main, ["build", "--category", "widget", "--data-root", str(root), "--index-dir", str(idx),
                                  "--device", "cpu", *SMALL], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return root, idx


def test_index_built_on_cpu_is_queried_on_any_device_with_equal_results(built):
    from patchsearch.query import query

    root, idx = built
    path = idx / "widget"
    manifest = path / "v000001" / "manifest.json"
    before = manifest.read_bytes()
    assert b"device" not in before and b"cuda" not in before
    frames = sorted((root / "widget" / "test").rglob("*.png"))
    ref = PatchIndex.load(path, device="cpu")
    want = query(ref, frames)
    assert want.threshold is not None
    for kw in ({"device": "auto"}, {"device": "cpu", "exact": "torch"}, {"device": "auto", "exact": "torch"}):
        index = PatchIndex.load(path, **kw)
        try:
            got = query(index, frames)
        finally:
            index.close()
        assert list(got.decisions) == list(want.decisions)
        np.testing.assert_allclose(got.image_scores, want.image_scores, rtol=1e-5)
        np.testing.assert_array_equal(got.top_patches, want.top_patches)
        np.testing.assert_allclose(got.distances, want.distances, rtol=1e-5, atol=1e-5)
        differ = got.locations != want.locations  # rows may differ only at ties: equal distances there
        assert np.allclose(got.distances[differ], want.distances[differ], rtol=1e-6, atol=1e-6)
        for a, b in zip(got.anomaly_maps, want.anomaly_maps):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, float(np.abs(b).max())))
    ref.close()
    assert manifest.read_bytes() == before  # loading and querying on other devices wrote nothing


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_every_command_takes_device_and_names_the_flag_in_one_line_errors(built, no_gpu, tmp_path):
    root, idx = built
    frame = root / "widget" / "test" / "good" / "000.png"
    commands = {
        "build": ["--category", "widget", "--data-root", root, "--index-dir", tmp_path / "x"],
        "rebuild": ["--category", "widget", "--index-dir", idx],
        "query": [frame, "--category", "widget", "--index-dir", idx],
        "evaluate": ["--category", "widget", "--data-root", root, "--index-dir", idx],
        "calibrate": ["--category", "widget", "--index-dir", idx, "--good", frame],
        "add": [frame, "--category", "widget", "--data-root", root, "--index-dir", idx],
        "remove": ["--category", "widget", "--image", "train/good/000.png", "--index-dir", idx],
        "serve": ["--index-dir", idx],
    }
    current = (idx / "widget" / "CURRENT").read_bytes()
    for name, args in commands.items():
        assert "--device" in _cli(name, "--help").output, name
        r = _cli(name, *args, "--device", "gpu")
        assert r.exit_code == 1 and r.output == "error: --device must be cpu, cuda, cuda:N or auto, got 'gpu'\n", \
            (name, r.output)
        r = _cli(name, *args, "--device", "cuda:1")
        assert r.exit_code == 1 and r.output.startswith("error: --device cuda:1: no CUDA device here (") and \
            r.output.endswith(": use --device cpu or auto\n") and r.output.count("\n") == 1, (name, r.output)
    assert (idx / "widget" / "CURRENT").read_bytes() == current  # nothing was written


def test_query_output_is_the_same_on_every_device(built):
    root, idx = built
    frames = sorted((root / "widget" / "test").rglob("*.png"))
    outs = []
    for dev in ("cpu", "auto"):
        r = _cli("query", *frames, "--category", "widget", "--index-dir", idx, "--device", dev)
        assert r.exit_code == 0, r.output
        outs.append([json.loads(line) for line in r.stdout.strip().splitlines()])
    assert outs[0] == outs[1]


def test_writers_return_indexes_without_placing_them_on_gpus(built, fake_gpus, tmp_path):
    """calibrate, add, remove, verify and info with --device cpu copy nothing to the (pretend)
    GPUs that faiss sees: their last load, for the summary, stays on the CPU."""
    import shutil

    root, idx = built
    idx2 = tmp_path / "indexes"
    shutil.copytree(idx, idx2)
    fake = fake_gpus(1)
    good = root / "widget" / "test" / "good"
    frame = good / "000.png"
    for args in (["calibrate", "--category", "widget", "--index-dir", idx2, "--good", frame, "--good", good / "001.png",
                  "--good", good / "002.png"],
                 ["add", frame, "--category", "widget", "--data-root", root, "--index-dir", idx2],
                 ["remove", "--category", "widget", "--image", "test/good/000.png", "--data-root", root,
                  "--index-dir", idx2],
                 ["rebuild", "--category", "widget", "--index-dir", idx2],
                 ["verify", "--category", "widget", "--index-dir", idx2],
                 ["info", "--category", "widget", "--index-dir", idx2]):
        extra = [] if args[0] in ("verify", "info") else ["--device", "cpu"]
        r = _cli(*args, *extra)
        assert r.exit_code == 0, (args[0], r.output)
        assert fake.copies == [], args[0]


def test_import_and_numpy_search_import_no_torch_with_device_none():
    code = ("import sys, numpy as np, patchsearch\n"
            "index = patchsearch.PatchIndex.from_embeddings(np.random.rand(500, 16).astype('f4'), device='cpu')\n"
            "res = index.search(np.random.rand(2, 10, 16).astype('f4'))\n"
            "assert index.device == 'cpu' and np.isfinite(res.image_scores).all()\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
