"""Every index type on every path answers the same.

One parametrised test: each index type (flat, int8 exact search, IVF in every code layout,
the older type name ``ivfpq``, re-ranking of 1 candidate per neighbour, an exhaustive IVF, an
IVF whose patches get fewer than k candidates), with the bank's precomputed kNN graph or
with support sets searched at query time, on each path (one local shard, two local shards,
two Ray shard actors on a real two-node cluster on loopback), against the answer of the
local flat index:

* exact indexes: the same neighbours, distances equal to float tolerance, the same image
  scores (Eq. 7);
* IVF: the distances reported are the exact L2 of the rows returned, never nearer than
  the true neighbours; patches with fewer than k candidates answered exactly; Eq. 7 from
  the exact support sets; and the Ray shards answer what the local index answers from the
  same shard files.

The Ray cluster starts once for the module, and only when a Ray case runs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from patchsearch import PatchIndex
from patchsearch.score import reweighted_scores

K = 9
TOL = dict(rtol=1e-5, atol=1e-5)


def _data(m=1200, d=32, n=6, p=40, seed=0):
    """A clustered bank (M, d) and N images of P query patches a little off the clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d)) * 3
    bank = centres[rng.integers(0, 40, m)] + rng.standard_normal((m, d))
    queries = centres[rng.integers(0, 40, n * p)] + 1.2 * rng.standard_normal((n * p, d))
    return bank.astype(np.float32), queries.reshape(n, p, d).astype(np.float32)


BANK, QUERIES = _data()


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: dict  # PatchIndex.from_embeddings keywords
    exact: bool = False  # answers equal the flat index's
    load: dict = dataclasses.field(default_factory=dict)  # PatchIndex.load keywords (local paths)
    remote: bool = True  # served by Ray shard actors too
    fewer_than_k: bool = False  # some patches must get fewer than k IVF candidates


def _ivf(layout, **kw):
    return {"index": "ivf", "layout": layout, "nlist": 16, "nprobe": 2, "rerank": 4, "support_sets": False, **kw}


CASES = [
    Case("flat/support-graph", {"index": "flat", "support_sets": "always"}, exact=True),
    Case("flat/query-time", {"index": "flat", "support_sets": False}, exact=True),
    Case("int8/query-time", {"index": "flat", "support_sets": False}, exact=True, load={"exact": "int8"},
         remote=False),
    Case("ivf-rabitqfs/query-time", _ivf("rabitqfs")),
    Case("ivf-rabitqfs/support-graph", _ivf("rabitqfs", support_sets="always")),
    Case("ivf-rabitq/query-time", _ivf("rabitq")),
    Case("ivf-pqfs/query-time", _ivf("pqfs")),
    Case("ivf-opq-pqfs/query-time", _ivf("opq-pqfs", pq_m=4)),
    Case("ivfpq-pq-rerank1/query-time", _ivf("pq", index="ivfpq", rerank=1)),
    Case("ivf-exhaustive/query-time", _ivf("rabitqfs", nprobe=16, rerank=len(BANK)), exact=True),
    Case("ivf-fewer-than-k/query-time", _ivf("rabitqfs", nlist=128, nprobe=1, rerank=2), fewer_than_k=True),
    Case("ivf-fewer-than-k/support-graph", _ivf("pq", nlist=128, nprobe=1, rerank=2, support_sets="always"),
         fewer_than_k=True),
]
PARAMS = [pytest.param(c, path, id=f"{c.name}-{path}") for c in CASES for path in ("local", "sharded", "remote")
          if path != "remote" or c.remote]


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """FAISS on one OpenMP thread (answers do not depend on it; OpenMP's spinning threads
    slow small searches badly on a loaded 2-core machine)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def cluster():
    """A Ray head node and a second node, one CPU and no GPU each, bound to 127.0.0.1 (as
    tests/test_ray.py; conftest sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    c.add_node(num_cpus=1, num_gpus=0)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}, "Ray nodes must bind loopback only"
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def flat():
    """The reference: the local flat index (one shard, the bank's kNN graph) and its answer,
    itself checked against a float64 brute force."""
    index = PatchIndex.from_embeddings(BANK, gpu=False, exact="faiss", support_sets="always")
    res = index.search(QUERIES, k=K)
    d = np.sqrt(((QUERIES[:, :, None, :].astype(np.float64) - BANK[None, None]) ** 2).sum(-1))  # (N, P, M)
    order = np.argsort(d, axis=-1, kind="stable")[..., :K]
    np.testing.assert_array_equal(res.locations, order)
    np.testing.assert_allclose(res.distances, np.take_along_axis(d, order, -1), **TOL)
    return index, res


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Index directories of a case, built once: {shards: path} for 1 and 2 shards."""
    made = {}

    def get(case: Case) -> dict:
        if case.name not in made:
            root = tmp_path_factory.mktemp("parity")
            made[case.name] = {}
            for shards in (1, 2):
                index = PatchIndex.from_embeddings(BANK, shards=shards, gpu=False, exact="faiss", **case.build)
                index.save(root / f"s{shards}")
                made[case.name][shards] = root / f"s{shards}"
        return made[case.name]

    return get


def _open(case: Case, path: str, dirs: dict, request):
    if path == "remote":
        from patchsearch.distributed.shards import RemotePatchIndex

        return RemotePatchIndex(dirs[2], address=request.getfixturevalue("cluster").address)
    return PatchIndex.load(dirs[1 if path == "local" else 2], gpu=False, **{"exact": "faiss", **case.load})


def _count_row_fetches(remote) -> list:
    """Record how many bank rows a RemotePatchIndex fetches from its shard actors."""
    fetched, inner = [], remote.searcher.embeddings

    def embeddings(rows):
        fetched.append(np.asarray(rows).size)
        return inner(rows)

    remote.searcher.embeddings = embeddings
    return fetched


def _answer(index):
    """(SearchResult of QUERIES, raw knn of their patches)."""
    return index.search(QUERIES, k=K), index.knn(QUERIES.reshape(-1, BANK.shape[1]), K)


@pytest.mark.parametrize("case,path", PARAMS)
def test_every_index_type_on_every_path_answers_as_local_flat(case, path, flat, built, request):
    flat_index, want = flat
    dirs = built(case)
    index = _open(case, path, dirs, request)
    try:
        graph = case.build.get("support_sets") == "always"
        assert (index.manifest.memory_bank.get("support_b") == K) == graph  # the support sets the case names
        fetched = _count_row_fetches(index) if path == "remote" else []
        res, (dist, rows) = _answer(index)
        n = len(QUERIES)
        assert sum(fetched) <= n * (K + 1)  # Ray: only Eq. 7's rows come to the caller, never the bank
        ar = np.arange(n)
        m_star = res.locations[ar, res.top_patches, 0]
        np.testing.assert_array_equal(index.support_sets(m_star), flat_index.support_sets(m_star))  # exact N_b
        if case.exact:
            np.testing.assert_array_equal(res.locations, want.locations)
            np.testing.assert_allclose(res.distances, want.distances, **TOL)
            np.testing.assert_array_equal(res.top_patches, want.top_patches)
            np.testing.assert_allclose(res.image_scores, want.image_scores, **TOL)
            return
        # IVF: the distances reported are the exact L2 of the rows returned ...
        assert (res.locations >= 0).all()
        direct = np.sqrt(((BANK[res.locations].astype(np.float64) - QUERIES[:, :, None, :]) ** 2).sum(-1))
        np.testing.assert_allclose(res.distances, direct, **TOL)
        found = rows >= 0  # raw knn: -1 where a patch got fewer than k candidates
        patches = QUERIES.reshape(-1, 1, BANK.shape[1]).astype(np.float64)
        raw = np.sqrt(((BANK[np.where(found, rows, 0)] - patches) ** 2).sum(-1))
        np.testing.assert_allclose(dist[found], raw[found], **TOL)
        assert np.isinf(dist[~found]).all()  # no neighbour, no distance
        # ... never nearer than the true neighbours, and mostly the true nearest one
        assert (res.distances >= want.distances - 1e-5).all()
        assert (res.locations[..., 0] == want.locations[..., 0]).mean() >= 0.5
        # patches with fewer than k candidates are searched exactly
        short = (~found).any(axis=1).reshape(n, -1)
        assert short.any() == case.fewer_than_k and not short.all()
        np.testing.assert_array_equal(res.locations[short], want.locations[short])
        np.testing.assert_allclose(res.distances[short], want.distances[short], **TOL)
        # Eq. 7 from the patch it reports and the exact support sets
        np.testing.assert_array_equal(res.top_patches, res.distances[..., 0].argmax(axis=1))
        s_star = res.distances[ar, res.top_patches, 0]
        expect = reweighted_scores(QUERIES[ar, res.top_patches], s_star, flat_index.support_sets(m_star), BANK)
        np.testing.assert_allclose(res.image_scores, expect, **TOL)
        agree = (res.top_patches == want.top_patches) & (m_star == want.locations[ar, want.top_patches, 0])
        np.testing.assert_allclose(res.image_scores[agree], want.image_scores[agree], **TOL)  # same m*: same score
        # Ray answers what the local index answers from the same shard files (which of the
        # rows tied in code distance at the candidate cut-off are kept depends on the shard
        # count, so one and two local shards are each held to the checks above)
        if path == "remote":
            same = PatchIndex.load(dirs[2], gpu=False, exact="faiss")
            try:
                base, (bd, br) = _answer(same)
            finally:
                same.close()
            np.testing.assert_array_equal(rows, br)
            np.testing.assert_allclose(dist, bd, **TOL)
            np.testing.assert_array_equal(res.locations, base.locations)
            np.testing.assert_allclose(res.distances, base.distances, **TOL)
            np.testing.assert_allclose(res.image_scores, base.image_scores, **TOL)
    finally:
        index.close()
