"""Exact search from reduced-precision (bf16 / int8) candidates: exactness against float64
brute force, the completeness check and its fallback, the automatic choice."""

import subprocess
import sys

import numpy as np
import pytest

from patchsearch import PatchIndex, lowp
from patchsearch.errors import InputError
from patchsearch.searchers import KnnSearcher

torch = pytest.importorskip("torch", reason="the reduced-precision candidate stage runs on torch")
KINDS = ["bf16", pytest.param("int8", marks=pytest.mark.skipif(
    not lowp.int8_gemm_available(), reason="this torch has no oneDNN quantized linear (onednn::qlinear_pointwise)"))]


def _clustered(m, d, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d)) * 3
    return (centres[rng.integers(0, 40, m)] + rng.standard_normal((m, d)) + shift).astype(np.float32)


def _exact(q, bank):
    """float64 brute force: (L2 (n, M) sorted, rows (n, M))."""
    d = np.sqrt(((q[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))
    rows = np.argsort(d, 1, kind="stable")
    return np.take_along_axis(d, rows, 1), rows


def _assert_exact(d2, rows, q, bank, k):
    """Same neighbours as float64 brute force except exact ties; distances to fp32 tolerance."""
    true_d, true_rows = _exact(q, bank)
    np.testing.assert_allclose(np.sqrt(d2), true_d[:, :k], rtol=2e-6, atol=1e-6)
    full = np.sqrt(((q[:, None, :].astype(np.float64) - bank[rows].astype(np.float64)) ** 2).sum(-1))
    np.testing.assert_allclose(full, true_d[:, :k], rtol=2e-6, atol=1e-6)  # the rows returned are at those distances
    tie_free = np.abs(true_d[:, k] - true_d[:, k - 1]) > 1e-5 * true_d[:, k]
    assert tie_free.mean() > 0.9
    np.testing.assert_array_equal(np.sort(rows[tie_free], 1), np.sort(true_rows[tie_free, :k], 1))


@pytest.mark.parametrize("kind", KINDS)
def test_reduced_precision_search_equals_float64_brute_force(kind):
    bank = _clustered(6000, 48, shift=5.0)  # off-centre, as post-ReLU features: centring matters
    q = _clustered(300, 48, seed=1, shift=5.0)
    s = lowp.LowpSearcher(bank, KnnSearcher(bank), kind)
    d2, rows = s.search(q, 9)
    _assert_exact(d2, rows, q, bank, 9)
    assert s.stats["queries"] == 300 and s.stats["fallbacks"] < 300
    d1, r1 = s.search(bank[:50], 1)  # bank rows find themselves at distance 0
    np.testing.assert_array_equal(r1[:, 0], np.arange(50))
    assert (d1 == 0).all()


def _near_ties():
    """Queries with 600 bank rows at almost the same distance (relative spread 1e-5, far
    below the reduced-precision error) and the true nearest row among them."""
    rng = np.random.default_rng(3)
    d, per = 32, 600
    centres = rng.standard_normal((6, d)).astype(np.float32) * 20
    blocks = []
    for c in centres:
        u = rng.standard_normal((per, d))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        radius = 5.0 * (1 + 1e-5 * rng.random((per, 1)))
        blocks.append(c + u * radius)
    bank = np.concatenate(blocks + [rng.standard_normal((1400, d)) * 20]).astype(np.float32)
    return bank, centres


@pytest.mark.parametrize("kind", KINDS)
def test_near_ties_fail_the_check_and_fall_back_to_exact_search(kind, monkeypatch):
    bank, q = _near_ties()
    s = lowp.LowpSearcher(bank, KnnSearcher(bank), kind, candidates=16)
    d2, rows = s.search(q, 4)
    true_d, _ = _exact(q, bank)
    np.testing.assert_allclose(np.sqrt(d2), true_d[:, :4], rtol=2e-6)
    assert s.stats["widened"] == len(q) and s.stats["fallbacks"] == len(q)  # no candidate set could be proven
    # without the check, the candidates alone miss true neighbours here
    real_try = lowp.LowpSearcher._try
    monkeypatch.setattr(lowp.LowpSearcher, "_try", lambda self, *a: real_try(self, *a)[:2] + (np.ones(len(a[0]), bool),))
    d_unchecked, _ = lowp.LowpSearcher(bank, None, kind, candidates=16).search(q, 4)
    assert (np.sqrt(d_unchecked) > true_d[:, :4] * (1 + 1e-6)).any()


def test_select_takes_exactly_the_smallest_keys_and_bounds_the_rest():
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.uint16):
        keys = (rng.integers(0x8000, 0xFF7F, (50, 1003)) if dtype == np.uint16 else
                rng.standard_normal((50, 1003)) * 100).astype(dtype)
        keys[:, 5:40] = keys[:, 4:5]  # many ties
        cand, thr, bad = lowp.select(keys, 24, 16)
        assert cand.shape == (50, 24 + 1003 - 62 * 16) and not bad.any()
        for row, c, t in zip(keys, cand, thr):
            assert len(set(c.tolist())) == len(c)
            np.testing.assert_array_equal(np.sort(row[c[:24]]), np.sort(row[:62 * 16])[:24])
            others = np.setdiff1d(np.arange(len(row)), c)
            assert (lowp._sortable(row[others]).astype(np.uint64) >= t).all()
            assert lowp._sortable(row[c[:24]]).astype(np.uint64).max() == t
    all_rows, none, _ = lowp.select(keys, 100, 16)
    assert none is None and all_rows.shape == (50, 1003)
    keys[7, 500] = 0x3F80  # bf16 +1.0: a positive score is flagged, wherever it is
    keys[9, 1001] = 0x0000
    assert np.nonzero(lowp.select(keys, 24, 16)[2])[0].tolist() == [7, 9]
    assert lowp.group_size(19251, 32) == 32 and lowp.group_size(16384, 32) == 16 and lowp.group_size(20, 32) == 1


def test_auto_choice_follows_cpu_features_bank_size_and_torch(monkeypatch):
    monkeypatch.setattr(lowp, "cpu_features", lambda: frozenset({"avx2", "fma"}))
    assert lowp.choose("auto", 100_000, 152) == lowp.choose("auto", 100_000, 1536) == "fp32"  # AVX2 only
    monkeypatch.setattr(lowp, "cpu_features", lambda: frozenset({"avx2", "avx512f", "avx512_vnni"}))
    assert lowp.choose("auto", 100_000, 152) == "fp32"  # int8 pays from INT8_MIN_DIM on
    assert lowp.choose("auto", 100_000, 1536) == ("int8" if lowp.int8_gemm_available() else "fp32")
    monkeypatch.setattr(lowp, "cpu_features", lambda: frozenset({"avx2", "avx512f", "amx_bf16", "avx512_bf16"}))
    assert lowp.choose("auto", 100_000, 152) == "bf16"
    assert lowp.choose("auto", lowp.MIN_ROWS - 1, 152) == "fp32"  # small banks
    assert lowp.choose("auto", 100_000, 152, on_gpu=True) == "fp32"
    assert lowp.choose("faiss", 100_000, 152) == lowp.choose("fp32", 100_000, 152) == "fp32"  # on request
    bank = _clustered(lowp.MIN_ROWS, 16)
    assert PatchIndex.from_embeddings(bank, support_sets=False).precision == "bf16"
    assert PatchIndex.from_embeddings(bank, support_sets=False, exact="fp32").precision == "fp32"
    assert PatchIndex.from_embeddings(bank, index="ivf", support_sets=False).precision == "fp32"
    monkeypatch.setattr(lowp, "cpu_features", frozenset)  # no /proc/cpuinfo: fp32
    assert lowp.choose("auto", 100_000, 152) == "fp32"
    monkeypatch.setattr(lowp, "torch_available", lambda: False)
    monkeypatch.setattr(lowp, "cpu_features", lambda: frozenset({"amx_bf16"}))
    assert lowp.choose("auto", 100_000, 152) == "fp32"
    with pytest.raises(InputError, match="exact='bf16' needs torch"):
        lowp.choose("bf16", 100_000, 152)
    with pytest.raises(InputError, match="exact must be one of"):
        lowp.choose("fp16", 100_000, 152)


def test_index_search_and_eq7_are_the_same_with_bf16_candidates():
    bank = _clustered(5000, 32, shift=2.0)
    patches = _clustered(6 * 40, 32, seed=5, shift=2.2).reshape(6, 40, 32)
    ref = PatchIndex.from_embeddings(bank, exact="fp32", support_sets=False)
    fast = PatchIndex.from_embeddings(bank, exact="bf16", support_sets=False)
    assert isinstance(fast.searcher, lowp.LowpSearcher) and fast.searcher._state is None  # built on first search
    a, b = ref.search(patches), fast.search(patches)
    assert fast.searcher._state is not None
    np.testing.assert_array_equal(a.locations[..., 0], b.locations[..., 0])
    np.testing.assert_allclose(a.distances, b.distances, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.image_scores, b.image_scores, rtol=1e-5)
    np.testing.assert_array_equal(fast.support_sets(b.locations[:, 0, 0]), ref.support_sets(a.locations[:, 0, 0]))


def test_a_gemm_that_fails_its_probe_is_not_used(monkeypatch):
    bank = _clustered(3000, 16)
    q = _clustered(40, 16, seed=2)
    monkeypatch.setattr(lowp, "_bf16_accumulates_in_fp32", lambda width: False)
    calls = []
    exact = KnnSearcher(bank)

    class Counting:
        def search(self, x, k):
            calls.append(len(x))
            return exact.search(x, k)

    s = lowp.LowpSearcher(bank, Counting(), "bf16")
    d2, rows = s.search(q, 5)
    assert calls == [40] and s._state["broken"]
    _assert_exact(d2, rows, q, bank, 5)


def test_probes_pass_on_this_torch():
    assert lowp._bf16_accumulates_in_fp32(160)
    if lowp.int8_gemm_available():
        assert lowp._int8_exact(127)


def test_searching_without_torch_uses_fp32():
    """Where torch cannot be imported, ``auto`` keeps fp32 and nothing imports torch."""
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('no torch here')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import numpy as np, patchsearch\n"
            "from patchsearch import lowp\n"
            "lowp.cpu_features = lambda: frozenset({'amx_bf16'})\n"
            "index = patchsearch.PatchIndex.from_embeddings(np.random.rand(5000, 16).astype('f4'))\n"
            "assert index.precision == 'fp32', index.precision\n"
            "res = index.search(np.random.rand(2, 10, 16).astype('f4'))\n"
            "assert np.isfinite(res.image_scores).all()\n"
            "assert 'torch' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_codes_are_built_on_first_search_not_on_load(tmp_path, kind):
    bank = _clustered(5000, 24)
    PatchIndex.from_embeddings(bank, exact="fp32").save(tmp_path / "i")
    index = PatchIndex.load(tmp_path / "i", exact=kind)
    assert index.precision == kind and index.searcher._state is None  # nothing built on load
    q = _clustered(100, 24, seed=4) + np.float32(0.2)
    d2, rows = index.searcher.search(q, 9)
    assert index.searcher._state is not None
    _assert_exact(d2, rows, q, bank, 9)
    index.close()
    with pytest.raises(InputError, match="exact must be one of"):
        PatchIndex.load(tmp_path / "i", exact="int4")
