"""GPU placement decisions, checked on CPU with a fake GPU count and a fake faiss module:
one resources object per shard, FAISS GPU limits as one-line errors, cloner options
restricted to the fields FAISS defines."""

from __future__ import annotations

import threading
import time

import torch  # noqa: F401  (before faiss: faiss-gpu-cuvs then finds torch's CUDA libraries)

import faiss as real_faiss  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from patchsearch import gpu_placement, ivf, searchers  # noqa: E402
from patchsearch.errors import InputError  # noqa: E402
from patchsearch.gpu_placement import GPU_MAX_K, GPU_MAX_NPROBE, gpu_plan  # noqa: E402

# The fields of FAISS's cloner options, from faiss/gpu/GpuClonerOptions.h of
# facebookresearch/faiss (FAISS 1.15.0, commit 02dbb4e42f49aa2ce57cd78977b0e47a11f7cb91;
# the header last changed in aba91940d); the SWIG objects of faiss-gpu-cuvs 1.15.1 have
# exactly these attributes.
FAISS_VERSION = "1.15.0"
GPU_CLONER_OPTIONS = ("indicesOptions", "useFloat16CoarseQuantizer", "useFloat16", "usePrecomputed",
                      "reserveVecs", "storeTransposed", "verbose", "use_cuvs", "allowCpuCoarseQuantizer")
GPU_MULTIPLE_CLONER_OPTIONS = GPU_CLONER_OPTIONS + ("shard", "shard_type", "common_ivf_quantizer")


class FakeClonerOptions:
    """Takes only the fields FAISS's GpuClonerOptions has (AttributeError otherwise, as SWIG)."""

    __slots__ = GPU_CLONER_OPTIONS


class FakeGpuFaiss:
    """The real faiss module, plus a pretend GPU: 'GPU' indexes are CPU clones, and every
    resources object and copy is recorded."""

    def __init__(self, ngpu: int):
        self.ngpu = ngpu
        self.resources, self.copies = [], []

    def __getattr__(self, name):
        return getattr(real_faiss, name)

    def get_num_gpus(self):
        return self.ngpu

    def StandardGpuResources(self):  # noqa: N802 (the faiss name)
        res = object()
        self.resources.append(res)
        return res

    GpuClonerOptions = FakeClonerOptions

    def index_cpu_to_gpu(self, res, device, index, co):
        assert 0 <= device < self.ngpu
        self.copies.append({"res": res, "device": device,
                            "options": {n: getattr(co, n) for n in GPU_CLONER_OPTIONS if hasattr(co, n)}})
        return real_faiss.clone_index(index)


@pytest.fixture
def fake_gpus(monkeypatch):
    def install(ngpu):
        fake = FakeGpuFaiss(ngpu)
        monkeypatch.setattr(searchers, "faiss", lambda: fake)
        return fake
    return install


def _bank(n=2000, d=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize("n_shards,ngpu", [(1, 1), (4, 1), (4, 2), (3, 4), (8, 3)])
def test_plan_gives_every_shard_its_own_resources(n_shards, ngpu):
    plan = gpu_plan(n_shards, ngpu)
    assert [p["shard"] for p in plan] == list(range(n_shards))
    assert [p["device"] for p in plan] == [i % ngpu for i in range(n_shards)]
    assert sorted(p["resources"] for p in plan) == list(range(n_shards))  # never shared


def test_sharded_searcher_on_one_gpu_makes_one_resources_object_per_shard(fake_gpus):
    fake = fake_gpus(1)
    bank = _bank()
    s = searchers.ShardedSearcher(searchers.build_flat_shards(bank, 4))
    assert s.on_gpu and len(fake.copies) == 4
    assert len({id(c["res"]) for c in fake.copies}) == 4 == len(fake.resources)  # one per shard, not per GPU
    assert {c["device"] for c in fake.copies} == {0}
    q = _bank(50, seed=1)
    d, r = s.search(q, 9)
    d0, r0 = real_faiss.knn(q, bank, 9)
    np.testing.assert_array_equal(r, r0)
    np.testing.assert_allclose(d, d0, rtol=1e-5)


def test_gpu_search_takes_one_calling_thread_at_a_time(fake_gpus):
    fake_gpus(1)
    s = searchers.ShardedSearcher(searchers.build_flat_shards(_bank(), 1))
    inside, most = [0], [0]
    lock = threading.Lock()

    class Probe:
        def search(self, q, k):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= 1
            return np.zeros((len(q), k), np.float32), np.zeros((len(q), k), np.int64)

    s.index = Probe()
    threads = [threading.Thread(target=s.search, args=(np.zeros((2, 16), np.float32), 9)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert most[0] == 1


def test_k_above_the_gpu_limit_is_a_one_line_error_naming_k(fake_gpus):
    fake_gpus(1)
    s = searchers.ShardedSearcher(searchers.build_flat_shards(_bank(3000), 2))
    with pytest.raises(InputError, match=r"^k = 2049 exceeds the FAISS GPU limit of 2048") as e:
        s.search(_bank(3, seed=1), GPU_MAX_K + 1)
    assert "\n" not in str(e.value)
    assert s.search(_bank(3, seed=1), GPU_MAX_K)[1].shape == (3, GPU_MAX_K)
    cpu = searchers.ShardedSearcher(searchers.build_flat_shards(_bank(3000), 2), gpu=False)
    assert cpu.search(_bank(3, seed=1), GPU_MAX_K + 1)[1].shape == (3, GPU_MAX_K + 1)  # CPU: no such limit


def _gpu_ivf(fake_gpus, rerank=8, nlist=8):
    """An IVF-PQ index in a layout FAISS GPU holds (16 dims, 4 sub-quantizers of 8 bits)."""
    fake = fake_gpus(1)
    bank = _bank(3000)
    params = ivf.auto_params(len(bank), 16, nlist=nlist, layout="pq", pq_m=4, nprobe=2, rerank=rerank)
    sharded = ivf.sharded_searcher(ivf.build_shards(bank, 2, params))
    assert sharded.on_gpu and len(fake.resources) == 2
    return ivf.IVFPQSearcher(sharded, bank, params), bank


def test_rerank_candidates_above_the_gpu_limit_name_rerank(fake_gpus):
    s, _ = _gpu_ivf(fake_gpus, rerank=300)
    with pytest.raises(InputError, match=r"^rerank \* k = 2700 exceeds the FAISS GPU limit of 2048: "
                                         r"use rerank <= 227 for k = 9") as e:
        s.search(_bank(3, seed=1), 9)
    assert "\n" not in str(e.value)
    assert s.search(_bank(3, seed=1), 6)[1].shape == (3, 6)  # 1800 candidates: fine


def test_nprobe_above_the_gpu_limit_names_nprobe(fake_gpus):
    s, _ = _gpu_ivf(fake_gpus)
    s.params["nlist"] = 4096  # the check is on the parameter; this index's own nlist is small
    with pytest.raises(InputError, match=r"^nprobe = 2049 exceeds the FAISS GPU limit of 2048"):
        s.set_nprobe(GPU_MAX_NPROBE + 1)
    s.set_nprobe(GPU_MAX_NPROBE)
    assert s.max_nprobe == GPU_MAX_NPROBE


def test_tuning_on_a_gpu_stops_at_the_nprobe_limit(fake_gpus):
    s, bank = _gpu_ivf(fake_gpus)
    s.params["nlist"] = 4096
    out = ivf.tune_nprobe(s, _bank(40, seed=2), target=1.01, tune=True)  # unreachable: climbs to the top
    assert out["nprobe"] == GPU_MAX_NPROBE


def test_plan_options_are_cloner_option_fields():
    for kw in ({}, {"pq_m": 8}, {"pq_m": 64}, {"float16": True}):
        for p in gpu_plan(3, 2, **kw):
            assert set(p["options"]) <= set(gpu_placement.GPU_OPTION_FIELDS) <= set(GPU_CLONER_OPTIONS)
    assert gpu_plan(1, 1, pq_m=64)[0]["options"] == {"useFloat16": True}  # > 48 bytes: float16 tables
    assert gpu_plan(1, 1, pq_m=48)[0]["options"] == {}
    assert gpu_plan(1, 1, float16=True)[0]["options"] == {"useFloat16": True}  # flat: float16 storage


def test_placement_sets_only_fields_faiss_defines(fake_gpus):
    """place_on_gpus through cloner options that refuse any field FAISS does not have."""
    fake = fake_gpus(2)
    shards = searchers.build_flat_shards(_bank(), 2)
    for kw in ({}, {"float16": True}, {"pq_m": 96}):
        placed, res = gpu_placement.place_on_gpus(shards, gpu_plan(2, 2, **kw), fake)
        assert len(placed) == 2 and len(res) == 2
    assert fake.copies[2]["options"] == {"useFloat16": True}
    s, _ = _gpu_ivf(fake_gpus, nlist=8)  # the searcher's own IVF placement, too
    assert s.sharded.on_gpu


def test_recorded_field_list_matches_the_installed_faiss_gpu():
    if not hasattr(real_faiss, "GpuClonerOptions"):
        pytest.skip(f"faiss {real_faiss.__version__} here has no GPU support (faiss-cpu): the fields recorded "
                    f"from FAISS {FAISS_VERSION}'s GpuClonerOptions.h are checked against faiss-gpu where installed")
    public = {a for a in dir(real_faiss.GpuClonerOptions()) if not a.startswith("_") and a not in ("this", "thisown")}
    assert public == set(GPU_CLONER_OPTIONS)
    multi = {a for a in dir(real_faiss.GpuMultipleClonerOptions()) if not a.startswith("_")
             and a not in ("this", "thisown")}
    assert multi == set(GPU_MULTIPLE_CLONER_OPTIONS)


def test_plan_refuses_no_gpus_or_shards():
    with pytest.raises(InputError, match="at least 1 shard and 1 GPU"):
        gpu_plan(2, 0)
    with pytest.raises(InputError, match="at least 1 shard and 1 GPU"):
        gpu_plan(0, 1)
