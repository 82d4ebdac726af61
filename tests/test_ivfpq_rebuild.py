"""IVF-PQ, precomputed support sets and rebuild from the Arrow store."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from patchsearch import PatchIndex
from patchsearch.cli import main
from patchsearch.errors import InputError
from patchsearch.ivf import IVFPQSearcher, auto_params, build_shards, gpu_layout_ok


def _clustered(m=6000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((60, d)) * 4
    return (centres[rng.integers(0, 60, m)] + rng.standard_normal((m, d))).astype(np.float32)


def test_auto_params():
    assert auto_params(1_600_000, 1536, layout="pq") == {"layout": "pq", "nlist": 4096, "pq_m": 96, "pq_bits": 8,
                                                         "nprobe": 256, "rerank": 8}
    # 152 = 8 x 19: no GPU layout; 38 sub-quantizers of 4 dims; nlist capped at 39 points a list
    assert auto_params(16385, 152, layout="pq") == {"layout": "pq", "nlist": 420, "pq_m": 38, "pq_bits": 8,
                                                    "nprobe": 26, "rerank": 8}
    assert auto_params(100_000, 128, layout="pq")["pq_m"] == 32  # 4 dims each, a GPU layout
    assert auto_params(100, 152, layout="pq")["pq_bits"] == 6  # fewer rows than 2**8 centroids
    assert auto_params(1000, 64, nlist=7, pq_m=16, layout="pq")["nlist"] == 7
    # the default layout: RaBitQ fast scan, no PQ parameters
    assert auto_params(163_840, 152) == {"layout": "rabitqfs", "nlist": 2048, "nprobe": 128, "rerank": 8}
    assert auto_params(163_840, 152, layout="pqfs")["pq_m"] == 76  # 2 dims per 4-bit sub-quantizer
    with pytest.raises(InputError, match="4-bit codes only"):
        auto_params(1000, 152, layout="pqfs", pq_bits=8)
    with pytest.raises(InputError, match="apply to the PQ layouts"):
        auto_params(1000, 152, pq_m=38, layout="rabitqfs")
    # PQ options without a layout: the IVF-PQ layout they belong to (commands from before layouts)
    assert auto_params(1000, 152, pq_m=38)["layout"] == "pq" and auto_params(1000, 152, pq_bits=6)["pq_bits"] == 6
    with pytest.raises(InputError, match="--ivf-layout"):
        auto_params(1000, 152, layout="lsh")
    with pytest.raises(InputError, match="must divide"):
        auto_params(1000, 152, pq_m=12, layout="pq")
    with pytest.raises(InputError, match="nprobe 99"):
        auto_params(1000, 64, nlist=8, nprobe=99)


def test_gpu_layout_check():
    bank = _clustered(3000, 152)
    odd = build_shards(bank, 1, auto_params(3000, 152, nlist=8, layout="pq"))[0]  # 38 x 4 dims: not a FAISS GPU layout
    assert not gpu_layout_ok(odd)
    even = build_shards(_clustered(3000, 128), 1, auto_params(3000, 128, nlist=8, layout="pq"))[0]  # 32 x 4
    assert gpu_layout_ok(even)
    assert not gpu_layout_ok(build_shards(_clustered(3000, 128), 1, auto_params(3000, 128, nlist=8))[0])  # RaBitQ


def test_ivfpq_recall_and_exact_reranked_distances():
    bank = _clustered()
    index = PatchIndex.from_embeddings(bank, index="ivfpq", seed=1)
    p = index.params
    assert p["recall_at_9"] >= 0.95 and p["recall_queries_kind"] == "bank rows held aside"
    # new patches of the bank's clusters (nprobe is tuned for those, from 1 up)
    q = bank[:300] + np.random.default_rng(5).standard_normal((300, 32)).astype(np.float32)
    dist, rows = index.knn(q, 9)
    exact = PatchIndex.from_embeddings(bank).knn(q, 9)
    recall = np.mean([len(np.intersect1d(a, b)) / 9 for a, b in zip(rows, exact[1])])
    assert recall >= 0.95
    # re-ranked distances are exact L2 to the returned rows
    direct = np.sqrt(((bank[rows] - q[:, None, :]) ** 2).sum(-1))
    np.testing.assert_allclose(dist, direct, rtol=1e-4, atol=1e-4)


def test_nprobe_tuning_searches_the_bank_exactly_once(monkeypatch):
    """Tuning tries several nprobe values against one exact search of the held-aside
    patches (it was one per value tried: minutes at 10M rows)."""
    from patchsearch import ivf

    calls = []
    exact = ivf.KnnSearcher.search
    monkeypatch.setattr(ivf.KnnSearcher, "search", lambda self, q, k: calls.append(len(q)) or exact(self, q, k))
    bank = _clustered()
    held = _clustered(m=300, seed=1)
    tuned = PatchIndex.from_embeddings(bank, index="ivf", nlist=64, rerank=0, target_recall=0.99,
                                       support_sets=False, layout="pq", recall_queries=held)
    assert tuned.params["nprobe"] > 2 and calls == [300]  # several values tried, one exact search


def test_nprobe_tuning_and_override():
    bank = _clustered()
    low = PatchIndex.from_embeddings(bank, index="ivfpq", nlist=64, nprobe=1, rerank=0, support_sets=False,
                                     layout="pq")
    tuned = PatchIndex.from_embeddings(bank, index="ivfpq", nlist=64, rerank=0, target_recall=0.99,
                                       support_sets=False, layout="pq")
    assert low.params["nprobe"] == 1  # given: kept, not tuned
    nprobe = tuned.params["nprobe"]
    assert 1 < nprobe <= 64
    # tuning stops at the first nprobe that reaches the target on the held-aside bank rows
    from patchsearch import ivf

    measure, _ = ivf.held_aside_recall(tuned.searcher, bank, ivf.held_aside(len(bank), 0))
    assert tuned.params["recall_at_9"] == pytest.approx(measure(), abs=1e-5)
    assert tuned.params["recall_at_9"] >= 0.99 or nprobe == 64
    tuned.set_nprobe(nprobe - 1)  # the smallest nprobe that reaches the target
    assert measure() < 0.99
    tuned.set_nprobe(64)
    assert tuned.params["nprobe"] == 64
    with pytest.raises(InputError, match="between 1 and nlist 64"):
        tuned.set_nprobe(65)
    with pytest.raises(InputError, match="IVF indexes only"):
        PatchIndex.from_embeddings(bank).set_nprobe(3)


def test_sharded_ivfpq_ids_are_bank_rows(tmp_path):
    bank = _clustered(3000)
    one = PatchIndex.from_embeddings(bank, index="ivfpq", nlist=32, nprobe=8, seed=2)
    three = PatchIndex.from_embeddings(bank, index="ivfpq", nlist=32, nprobe=8, seed=2, shards=3)
    # every shard holds its own rows, with their bank-row ids
    import faiss
    for shard, (start, stop) in zip(three.shards, [(0, 1000), (1000, 2000), (2000, 3000)]):
        ivf = faiss.extract_index_ivf(shard)
        ids = np.concatenate([faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy()
                              for i in range(ivf.nlist)])
        assert sorted(ids.tolist()) == list(range(start, stop))
    rows = np.array([0, 999, 1000, 2999])
    assert three.knn(bank[rows], 1)[1][:, 0].tolist() == rows.tolist()
    q = _clustered(200, seed=3).reshape(20, 10, 32)
    a, b = one.search(q), three.search(q)
    np.testing.assert_array_equal(a.locations, b.locations)
    np.testing.assert_allclose(a.image_scores, b.image_scores, rtol=1e-5)
    three.save(tmp_path / "ivf")
    loaded = PatchIndex.load(tmp_path / "ivf", nprobe=4)
    assert loaded.index_type == "ivfpq" and loaded.params["nprobe"] == 4 and len(loaded.shards) == 3
    manifest = json.loads((tmp_path / "ivf/v000001/manifest.json").read_text())
    assert manifest["index"]["params"]["recall_at_9"] == three.params["recall_at_9"]
    assert manifest["index"]["bytes_per_vector"] < 32 * 4


def test_precomputed_support_sets_equal_two_search_path():
    bank = _clustered(2000, 16)
    index = PatchIndex.from_embeddings(bank, shards=2)
    assert index.support.shape == (2000, 9) and (index.support[:, 0] == np.arange(2000)).all()
    d = ((bank[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1)
    np.fill_diagonal(d, -1)
    np.testing.assert_array_equal(index.support, np.argsort(d, 1, kind="stable")[:, :9])
    two_search = PatchIndex.from_embeddings(bank, shards=2, support_sets=False)
    assert two_search.support is None
    q = _clustered(40 * 20, 16, seed=8).reshape(40, 20, 16) * 1.2
    a, b = index.search(q), two_search.search(q)
    np.testing.assert_array_equal(a.image_scores, b.image_scores)
    np.testing.assert_array_equal(a.locations, b.locations)


def test_rebuild_from_arrow_store(tmp_path, mvtec_root):
    idx = tmp_path / "indexes"
    small = ["--resize", "64", "--crop", "64"]

    def run(*args):
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout.strip().splitlines()[-1])

    run("build", "--category", "widget", "--data-root", mvtec_root, "--index-dir", idx, "--coreset-ratio", "0.3",
        "--seed", "4", *small)
    before = PatchIndex.load(idx / "widget")
    bank_before = np.array(before.bank)
    q = np.random.default_rng(0).standard_normal((3, 64, 152)).astype(np.float32) + bank_before.mean(0)
    res_before = before.search(q)
    store_before = (idx / "widget/v000001/patches-00000.arrow").read_bytes()
    del before

    out = run("rebuild", "--category", "widget", "--index-dir", idx)
    assert out["type"] == "flat" and out["memory_bank"] == len(bank_before)
    after = PatchIndex.load(idx / "widget")
    np.testing.assert_array_equal(after.bank, bank_before)
    res_after = after.search(q)
    np.testing.assert_array_equal(res_after.locations, res_before.locations)
    np.testing.assert_array_equal(res_after.distances, res_before.distances)
    np.testing.assert_array_equal(res_after.image_scores, res_before.image_scores)
    assert (idx / "widget/v000002/patches-00000.arrow").read_bytes() == store_before
    assert after.manifest.backbone["name"] == "efficientnet_lite1"  # carried over
    del after

    out = run("rebuild", "--category", "widget", "--index-dir", idx, "--index", "ivfpq", "--shards", "2",
              "--coreset-ratio", "0.5")
    assert out["type"] == "ivfpq" and out["shards"] == 2 and out["memory_bank"] == int(3 * 64 * 0.5)
    assert out["ivfpq"]["recall_queries_kind"] == "held-aside" and out["ivfpq"]["recall_queries"] == 3 * 64 - 96  # store rows not in the bank
    assert out["ivfpq"]["recall_at_9"] >= 0.95 or out["ivfpq"]["nprobe"] == out["ivfpq"]["nlist"]
    r = CliRunner().invoke(main, ["query", str(mvtec_root / "widget/test/blob/000.png"), "--category", "widget",
                                  "--index-dir", str(idx), "--nprobe", "1"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)["distances"]) == 9
    assert sorted(p.name for p in idx.iterdir()) == ["widget"]
    assert sorted(p.name for p in (idx / "widget").iterdir()) == ["CURRENT", "LOCK", "leases", "v000003"]
