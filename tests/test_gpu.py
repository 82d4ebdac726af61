"""GPU results equal CPU results (``pytest -m gpu``; each test skips, saying why, where no GPU is).

FAISS tests run where faiss sees a GPU (faiss-gpu installed, ``faiss.get_num_gpus() > 0``);
torch-path tests where ``torch.cuda.is_available()``. Every result is compared with the
CPU index: distances within 1e-3 relative, the same bank rows except at exact ties (a
differing row must lie at the same exact distance from the query as the CPU's row).

The benchmark's CPU smoke test (``scripts/bench_gpu.py --device cpu --quick``) is here too,
unmarked: it runs everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch  # before faiss: faiss-gpu-cuvs finds the CUDA libraries torch loaded

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from patchsearch import PatchIndex, searchers  # noqa: E402
from patchsearch.errors import InputError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-3


def _faiss_gpus() -> tuple[int, str]:
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return 0, f"faiss {faiss.__version__} has no GPU support (faiss-cpu installed, not faiss-gpu)"
    n = faiss.get_num_gpus()
    return n, "" if n else f"faiss {faiss.__version__} sees no GPU"


@pytest.fixture
def faiss_gpu():
    n, why = _faiss_gpus()
    if not n:
        pytest.skip(why)
    return n


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} sees no CUDA device")
    return torch.device("cuda")


def _data(rows=20000, d=64, n=3000, seed=0):
    """Clustered bank and jittered queries (float32); rows are distinct."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(rows // 64, d))
    bank = (centres[rng.integers(0, len(centres), rows)] + 0.5 * rng.normal(size=(rows, d))).astype(np.float32)
    q = (bank[rng.integers(0, rows, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    return bank, q


def assert_same_neighbours(q, bank, d_ref, r_ref, d_got, r_got):
    """Distances (L2 or squared) within RTOL; rows equal except where both rows lie at the
    same exact (float64) distance from the query: a tie."""
    d_ref, d_got = np.asarray(d_ref, np.float64), np.asarray(d_got, np.float64)
    np.testing.assert_allclose(d_got, d_ref, rtol=RTOL, atol=1e-4)
    r_ref, r_got = np.asarray(r_ref), np.asarray(r_got)
    differ = np.argwhere(r_ref != r_got)
    for i, j in differ:
        a = np.linalg.norm(bank[r_ref[i, j]].astype(np.float64) - q[i])
        b = np.linalg.norm(bank[r_got[i, j]].astype(np.float64) - q[i])
        assert abs(a - b) <= 1e-5 * max(a, 1e-12), (f"query {i} rank {j}: CPU row {r_ref[i, j]} at {a:.7g}, "
                                                    f"GPU row {r_got[i, j]} at {b:.7g}: not a tie")


# ---------------------------------------------------------------- faiss-gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shards", [1, 4])
def test_flat_gpu_equals_cpu(faiss_gpu, shards):
    bank, q = _data()
    cpu = PatchIndex.from_embeddings(bank, shards=shards, gpu=False)
    gpu = PatchIndex.from_embeddings(bank, shards=shards, gpu=True)
    assert gpu._sharded.on_gpu and len(gpu._sharded._resources) == shards  # one resources object per shard
    d0, r0 = cpu.knn(q, 9)
    d1, r1 = gpu.knn(q, 9)
    assert_same_neighbours(q, bank, d0, r0, d1, r1)
    patches = q[:2352].reshape(3, 784, -1)
    a, b = cpu.search(patches), gpu.search(patches)
    np.testing.assert_allclose(b.image_scores, a.image_scores, rtol=RTOL)
    assert_same_neighbours(patches.reshape(-1, bank.shape[1]), bank, a.distances.reshape(-1, 9),
                           a.locations.reshape(-1, 9), b.distances.reshape(-1, 9), b.locations.reshape(-1, 9))


@pytest.mark.gpu
def test_flat_gpu_shards_searched_from_many_threads(faiss_gpu):
    bank, q = _data(8000, 32, 800)
    cpu = searchers.ShardedSearcher(searchers.build_flat_shards(bank, 4), gpu=False)
    gpu = searchers.ShardedSearcher(searchers.build_flat_shards(bank, 4), gpu=True)
    want = cpu.search(q, 9)
    got, errors = [None] * 6, []

    def one(i):
        try:
            got[i] = gpu.search(q, 9)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for d, r in got:
        assert_same_neighbours(q, bank, want[0], want[1], d, r)


@pytest.mark.gpu
def test_ivf_pq_gpu_equals_cpu(faiss_gpu):
    bank, q = _data(20000, 64)
    kw = dict(index="ivf", layout="pq", nlist=64, pq_m=16, nprobe=8, shards=2)
    cpu = PatchIndex.from_embeddings(bank, gpu=False, **kw)
    gpu = PatchIndex.from_embeddings(bank, gpu=True, **kw)
    assert gpu._sharded.on_gpu and gpu.params["nprobe"] == cpu.params["nprobe"] == 8
    d0, r0 = cpu.knn(q, 9)
    d1, r1 = gpu.knn(q, 9)
    # exact re-ranking of rerank x 9 PQ candidates: rows differ only where a true neighbour
    # sits at the edge of the candidate list, which CPU and GPU PQ tables may order differently
    same = (r0 == r1).all(1)
    assert same.mean() >= 0.99
    assert_same_neighbours(q[same], bank, d0[same], r0[same], d1[same], r1[same])


@pytest.mark.gpu
def test_gpu_limits_are_one_line_errors_before_faiss(faiss_gpu):
    bank, q = _data(6000, 32, 10)
    gpu = PatchIndex.from_embeddings(bank, gpu=True)
    with pytest.raises(InputError, match=r"^k = 2049 exceeds the FAISS GPU limit of 2048"):
        gpu.knn(q, 2049)
    assert gpu.knn(q, 2048)[1].shape == (10, 2048)
    kw = dict(index="ivf", layout="pq", nlist=32, pq_m=8, nprobe=4)
    with pytest.raises(InputError, match=r"^rerank \* k = 3000 exceeds the FAISS GPU limit of 2048: use rerank <= 204"):
        PatchIndex.from_embeddings(bank, gpu=True, rerank=300, **kw)  # recall@9 at build: 10 neighbours, self excluded
    ivf = PatchIndex.from_embeddings(bank, gpu=True, **kw)
    ivf.searcher.params["rerank"] = 300
    with pytest.raises(InputError, match=r"^rerank \* k = 2700 exceeds"):
        ivf.knn(q, 9)


# ---------------------------------------------------------------- torch on the device
def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "scripts" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_torch_device_search_and_eq7_equal_cpu(cuda, precision):
    import faiss

    from patchsearch.bank import support_from_neighbours
    from patchsearch.score import reweighted_scores

    bench = _bench()
    bank, q = _data(20000, 152, 784 * 4)
    bt, qt = torch.from_numpy(bank).to(cuda), torch.from_numpy(q).to(cuda)
    sq = (bt * bt).sum(1)
    low = bt.to(torch.bfloat16) if precision == "bf16" else None
    d2, r = bench.torch_knn(qt, bt, sq, 9, precision, low)
    d0, r0 = faiss.knn(q, bank, 9)
    assert_same_neighbours(q, bank, d0, r0, d2.cpu().numpy(), r.cpu().numpy())
    dist = d2.clamp_min(0).sqrt().view(4, 784, 9)
    scores, top = bench.eq7_torch(qt.view(4, 784, -1), dist, r.view(4, 784, 9), bt, sq)
    dn, ln = np.sqrt(np.maximum(d0, 0)).reshape(4, 784, 9), r0.reshape(4, 784, 9)
    tn = dn[..., 0].argmax(1)
    ar = np.arange(4)
    assert (top.cpu().numpy() == tn).all()
    _, nn = faiss.knn(bank[ln[ar, tn, 0]], bank, 10)
    want = reweighted_scores(q.reshape(4, 784, -1)[ar, tn], dn[ar, tn, 0], support_from_neighbours(ln[ar, tn, 0], nn, 9),
                             bank)
    np.testing.assert_allclose(scores.cpu().numpy(), want, rtol=RTOL)


@pytest.mark.gpu
def test_patch_embedder_on_the_device_equals_cpu(cuda):
    from patchsearch.errors import WeightsUnavailableError
    from patchsearch.features import PatchEmbedder

    try:
        cpu = PatchEmbedder("efficientnet_lite0")
    except WeightsUnavailableError as exc:
        pytest.skip(str(exc))
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    want = cpu(x)
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = PatchEmbedder("efficientnet_lite0").to(cuda)(x.to(cuda)).cpu()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=RTOL, atol=1e-3 * float(want.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("exact,precision", [("auto", "fp32"), ("torch", "fp32"), ("torch", "tf32"),
                                             ("torch", "bf16")])
def test_patch_index_device_equals_cpu(cuda, exact, precision):
    """PatchIndex(device="cuda"): faiss-gpu shards (exact="auto" where faiss-gpu is installed)
    or the torch search on the device; numpy input, and tensors that stay on the device."""
    from patchsearch import device_search

    bank, q = _data(20000, 152, 784 * 3)
    cpu = PatchIndex.from_embeddings(bank, device="cpu")
    dev = PatchIndex.from_embeddings(bank, device="cuda", exact=exact, precision=precision)
    assert device_search.resident(dev) in ("torch", "faiss")
    patches = q.reshape(3, 784, -1)
    a = cpu.search(patches)
    for b in (dev.search(patches), dev.search(torch.from_numpy(patches).to(cuda))):
        np.testing.assert_allclose(b.image_scores, a.image_scores, rtol=RTOL)
        assert (b.top_patches == a.top_patches).all()
        assert_same_neighbours(q, bank, a.distances.reshape(-1, 9), a.locations.reshape(-1, 9),
                               b.distances.reshape(-1, 9), b.locations.reshape(-1, 9))


# ---------------------------------------------------------------- everywhere
def test_bench_gpu_smoke_on_cpu(tmp_path):
    """scripts/bench_gpu.py --device cpu --quick --check: every row prints numbers or a reason."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--device", "cpu", "--quick",
                           "--check", "--json", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} >= {"torch fp32", "faiss-gpu flat fp32, 4 shards", "e2e lite0, PNG files"}
    for r in rows:
        assert "time_s" in r or r["note"].startswith(("not run:", "skipped:")), r
    assert next(r for r in rows if r["method"] == "torch fp32")["check"].startswith("ok")
    assert "| torch fp32 |" in done.stdout
