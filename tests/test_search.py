import json

import numpy as np
import pytest

import patchsearch
from patchsearch import PatchIndex
from patchsearch.errors import IndexFormatError, InputError
from patchsearch.score import reweighted_scores


def _bank(m=2000, d=16, seed=0):
    return np.random.default_rng(seed).standard_normal((m, d)).astype(np.float32)


def _brute(bank, q, k):
    d = np.sqrt(((q[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


def test_knn_is_exact_l2_with_bank_rows():
    bank = _bank()
    index = PatchIndex.from_embeddings(bank)
    q = _bank(50, seed=1)
    dist, rows = index.knn(q, 9)
    bd, bi = _brute(bank, q, 9)
    np.testing.assert_array_equal(rows, bi)
    np.testing.assert_allclose(dist, bd, rtol=1e-4, atol=1e-4)  # L2, not squared
    # a bank row finds itself at distance 0
    d0, r0 = index.knn(bank[[5, 1999]], 1)
    assert r0[:, 0].tolist() == [5, 1999] and np.allclose(d0, 0, atol=1e-3)


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_sharded_equals_unsharded(shards):
    bank = _bank(3001)
    q = _bank(40 * 30, seed=2).reshape(40, 30, 16)
    one = PatchIndex.from_embeddings(bank, shards=1).search(q)
    many_index = PatchIndex.from_embeddings(bank, shards=shards)
    assert len(many_index.shards) == shards
    assert sum(s.ntotal for s in many_index.shards) == 3001
    many = many_index.search(q)
    np.testing.assert_array_equal(many.locations, one.locations)
    np.testing.assert_allclose(many.distances, one.distances, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(many.image_scores, one.image_scores, rtol=1e-5)


def test_eq7_against_direct_computation():
    rng = np.random.default_rng(4)
    bank = _bank(500, 8, seed=5)
    patches = rng.standard_normal((6, 20, 8)).astype(np.float32) * 1.3
    res = PatchIndex.from_embeddings(bank, shards=2).search(patches, k=9, b=9)
    bank64 = bank.astype(np.float64)
    for n in range(6):
        d = np.sqrt(((patches[n, :, None, :] - bank64[None]) ** 2).sum(-1))  # (P, M)
        nn = d.min(1)
        p_star = int(nn.argmax())
        m_star = int(d[p_star].argmin())
        s_star = nn[p_star]
        d_bank = np.sqrt(((bank64 - bank64[m_star]) ** 2).sum(-1))
        support = np.argsort(d_bank, kind="stable")[:9]  # m* itself (distance 0) first
        assert support[0] == m_star
        dist = np.sqrt(((bank64[support] - patches[n, p_star]) ** 2).sum(-1))
        expect = (1 - np.exp(dist[0]) / np.exp(dist).sum()) * s_star
        assert res.top_patches[n] == p_star
        assert res.locations[n, p_star, 0] == m_star
        assert res.image_scores[n] == pytest.approx(expect, rel=1e-5)
        np.testing.assert_allclose(res.patch_scores[n], nn, rtol=1e-4)


def test_eq7_weight_properties():
    bank = np.array([[0.0, 0], [1, 0], [0, 1]], np.float32)
    test = np.array([[0.0, 0.5]], np.float32)
    support = np.array([[0, 1, 2]])
    # m* = row 0 at 0.5; the others at sqrt(1.25) and 0.5: weight = 1 - e^.5/(2e^.5 + e^1.118)
    d = np.array([0.5, np.sqrt(1.25), 0.5])
    w = 1 - np.exp(0.5) / np.exp(d).sum()
    assert reweighted_scores(test, [0.5], support, bank)[0] == pytest.approx(w * 0.5, rel=1e-6)
    assert reweighted_scores(test, [0.5], support[:, :1], bank)[0] == pytest.approx(0.5)  # b = 1: s*


def test_support_sets_start_with_m_star_even_with_duplicates():
    bank = np.repeat(_bank(50, 4), 2, axis=0)  # every vector twice
    index = PatchIndex.from_embeddings(bank)
    sup = index.support_sets(np.array([0, 1, 99]), 9)
    assert sup[:, 0].tolist() == [0, 1, 99]
    assert [len(set(r)) for r in sup.tolist()] == [9, 9, 9]
    assert sup[0, 1] == 1 and sup[1, 1] == 0  # the duplicate is the nearest other row


def test_save_load_round_trip(tmp_path):
    bank = _bank(300, 8)
    index = PatchIndex.from_embeddings(bank, shards=3, manifest={"category": "x"})
    q = _bank(10 * 5, 8, seed=9).reshape(10, 5, 8)
    before = index.search(q)
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx/v000001/manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["embedding_dim"] == 8
    assert manifest["memory_bank"]["size"] == 300 and manifest["category"] == "x"
    assert [s["stop"] - s["start"] for s in manifest["index"]["shards"]] == [100, 100, 100]
    assert manifest["index"]["metric"] == "L2" and manifest["versions"]["faiss-cpu"]
    assert set(manifest["files"]) == {"memory_bank.arrow", "shard_000.faiss", "shard_001.faiss", "shard_002.faiss"}
    loaded = PatchIndex.load(tmp_path / "idx")
    np.testing.assert_array_equal(loaded.bank, bank)
    after = loaded.search(q)
    np.testing.assert_array_equal(after.locations, before.locations)
    np.testing.assert_array_equal(after.image_scores, before.image_scores)
    # Saving again replaces the index, leaving no temporary directory behind.
    PatchIndex.from_embeddings(bank[:50]).save(tmp_path / "idx")
    assert PatchIndex.load(tmp_path / "idx").size == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_load_errors(tmp_path):
    with pytest.raises(IndexFormatError, match="run 'patchsearch build'"):
        PatchIndex.load(tmp_path / "none")
    PatchIndex.from_embeddings(_bank(20, 4)).save(tmp_path / "idx")
    man = tmp_path / "idx/v000001/manifest.json"
    body = json.loads(man.read_text())
    man.write_text(json.dumps({**body, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="version 99 is not supported"):
        PatchIndex.load(tmp_path / "idx")
    man.write_text(json.dumps(body))
    shard = tmp_path / "idx/v000001/shard_000.faiss"
    data = shard.read_bytes()
    shard.write_bytes(b"\0" * len(data))  # same size, garbage: FAISS cannot read it
    with pytest.raises(IndexFormatError, match=f"^{tmp_path / 'idx/v000001/shard_000.faiss'}: corrupted FAISS index"):
        PatchIndex.load(tmp_path / "idx")
    shard.write_bytes(data[:100])  # truncated: caught by the size check
    with pytest.raises(IndexFormatError, match="shard_000.faiss: damaged index file .100 bytes"):
        PatchIndex.load(tmp_path / "idx")


def test_bad_input():
    index = PatchIndex.from_embeddings(_bank(20, 4))
    with pytest.raises(InputError, match="k=21"):
        index.search(np.zeros((1, 3, 4), np.float32), k=21)
    with pytest.raises(InputError, match=r"\(N, P, 4\)"):
        index.search(np.zeros((3, 5), np.float32))
    bad = np.zeros((1, 3, 4), np.float32)
    bad[0, 1, 2] = np.inf
    with pytest.raises(InputError, match="NaN or infinite"):
        index.search(bad)
    nan_bank = _bank(10, 4)
    nan_bank[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        PatchIndex.from_embeddings(nan_bank)
    with pytest.raises(InputError, match="more than the 20"):
        PatchIndex.from_embeddings(_bank(20, 4), shards=21)
    with pytest.raises(IndexFormatError, match="records no backbone"):
        patchsearch.query(index, ["x.png"])


def test_import_and_search_without_torch():
    """``import patchsearch`` and searching embeddings load neither torch nor torchvision."""
    import subprocess
    import sys

    code = ("import sys, numpy as np, patchsearch\n"
            "index = patchsearch.PatchIndex.from_embeddings(np.random.rand(500, 16).astype('f4'), shards=2)\n"
            "res = index.search(np.random.rand(2, 10, 16).astype('f4'))\n"
            "assert np.isfinite(res.image_scores).all()\n"
            "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules, 'torch imported'\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("built,says", [("ivf", "flat"), ("flat", "ivf"), ("flat", "hnsw")])
def test_manifest_type_must_match_the_shard_files(tmp_path, built, says):
    """The manifest's index type decides re-ranking (local and Ray alike): one that the shard
    files contradict is refused, never searched as the other kind."""
    bank = _bank(1000, 8)
    PatchIndex.from_embeddings(bank, shards=2, index=built, **({"nlist": 8} if built == "ivf" else {})).save(
        tmp_path / "idx")
    man = tmp_path / "idx/v000001/manifest.json"
    body = json.loads(man.read_text())
    body["index"]["type"] = says
    man.write_text(json.dumps(body))
    with pytest.raises(IndexFormatError, match=f"index type '{says}'"):
        PatchIndex.load(tmp_path / "idx")
