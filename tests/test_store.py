import numpy as np
import pytest

from patchsearch.errors import IndexFormatError
from patchsearch.store import PatchStore, PatchStoreWriter, StoreArray, read_bank, write_bank


def _write(path, rng, dim=5):
    batches = [rng.standard_normal((2, 3, 4, dim)).astype(np.float32),
               rng.standard_normal((1, 3, 4, dim)).astype(np.float32)]
    with PatchStoreWriter(path, dim) as w:
        w.write(["a.png", "b.png"], batches[0])
        w.write(["c.png"], batches[1])
    return np.concatenate([b.reshape(-1, dim) for b in batches])


def test_arrow_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    expect = _write(tmp_path / "p.arrow", rng)
    store = PatchStore(tmp_path / "p.arrow")
    assert store.num_patches == 36 and store.dim == 5
    np.testing.assert_array_equal(store.embeddings(), expect)
    rows = np.array([35, 0, 13, 24, 23])
    np.testing.assert_array_equal(store.embeddings(rows), expect[rows])
    np.testing.assert_array_equal(StoreArray(store)[10:30], expect[10:30])
    loc = store.locations(rows)
    assert loc["image_id"].tolist() == [2, 0, 1, 2, 1]
    assert loc["row"].tolist() == [2, 0, 0, 0, 2] and loc["col"].tolist() == [3, 0, 1, 0, 3]
    assert store.image_paths() == ["a.png", "b.png", "c.png"]
    starts = [s for s, _ in store.iter_embeddings()]
    assert starts == [0, 24]


def test_store_views_are_memory_mapped(tmp_path):
    _write(tmp_path / "p.arrow", np.random.default_rng(1))
    _, view = next(PatchStore(tmp_path / "p.arrow").iter_embeddings())
    assert not view.flags.owndata and not view.flags.writeable


def test_corrupted_store(tmp_path):
    _write(tmp_path / "p.arrow", np.random.default_rng(2))
    data = (tmp_path / "p.arrow").read_bytes()
    (tmp_path / "p.arrow").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFormatError, match="p.arrow: corrupted"):
        PatchStore(tmp_path / "p.arrow")
    with pytest.raises(IndexFormatError, match="missing"):
        PatchStore(tmp_path / "none.arrow")


def test_bank_round_trip(tmp_path):
    bank = np.random.default_rng(3).standard_normal((7, 4)).astype(np.float32)
    src = {"store_row": np.arange(7) * 3, "image": [f"{i}.png" for i in range(7)],
           "row": np.arange(7), "col": np.arange(7)[::-1]}
    support = np.arange(21).reshape(7, 3)
    write_bank(tmp_path / "b.arrow", bank, src, support)
    got, got_src, got_support = read_bank(tmp_path / "b.arrow")
    np.testing.assert_array_equal(got_support, support)
    np.testing.assert_array_equal(got, bank)
    assert got_src["image"] == src["image"] and got_src["col"].tolist() == list(range(6, -1, -1))
    write_bank(tmp_path / "b2.arrow", bank)
    assert read_bank(tmp_path / "b2.arrow")[1:] == (None, None)
