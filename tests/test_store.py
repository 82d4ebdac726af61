"""The Arrow patch store: partitions, tiles, version-1 stores, damaged files, pyarrow.dataset, memory mapping."""

import hashlib
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from PIL import Image

from patchsearch.errors import IndexFormatError, InputError
from patchsearch.store import ImageRecord, PatchStore, PatchStoreWriter, StoreArray, image_schema, read_image_paths

DIM = 5
SIZES = [(16, 20), (17, 21), (18, 22), (19, 23)]  # (height, width) of the test frames


def _images(root, sizes):
    """Noisy PNGs of the given (height, width) under ``root/train``, and their ImageRecords."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    rng, records = np.random.default_rng(len(sizes)), []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "train" / f"{i:03d}.png")
        records.append(ImageRecord.from_file(root / "train" / f"{i:03d}.png", root))
    return records


def _two_partitions(tmp_path, seed=0):
    """Partition 0: batches of 2 and 1 frames; partition 1: one frame. Returns (store dir, (48, DIM) rows)."""
    records, store = _images(tmp_path / "data", SIZES), tmp_path / "store"
    store.mkdir()
    batches = [np.random.default_rng(seed).standard_normal((n, 3, 4, DIM)).astype(np.float32) for n in (2, 1, 1)]
    writer = PatchStoreWriter(store, DIM)
    writer.write(records[:2], batches[0])
    writer.write(records[2:3], batches[1])
    assert writer.close() == ("images-00000.arrow", "patches-00000.arrow")
    assert (writer.num_images, writer.num_patches, writer.next_image_id) == (3, 36, 3)
    with PatchStoreWriter(store, DIM, partition=1, first_image_id=writer.next_image_id) as second:
        second.write(records[3:], batches[2])
    return store, np.concatenate([b.reshape(-1, DIM) for b in batches])


def test_round_trip_over_two_partitions(tmp_path):
    directory, expect = _two_partitions(tmp_path)
    store = PatchStore(directory)
    assert (store.dim, store.num_patches, store.num_images, store.first_image_id) == (DIM, 48, 4, 0)
    assert store.files == ["images-00000.arrow", "patches-00000.arrow", "images-00001.arrow", "patches-00001.arrow"]
    np.testing.assert_array_equal(store.embeddings(), expect)
    rows = np.array([47, 0, 13, 24, 23, 36, 13])
    np.testing.assert_array_equal(store.embeddings(rows), expect[rows])
    np.testing.assert_array_equal(StoreArray(store)[10:40], expect[10:40])
    np.testing.assert_array_equal(StoreArray(store)[rows], expect[rows])
    loc = store.locations(rows)
    assert loc["image_id"].tolist() == [3, 0, 1, 2, 1, 3, 1] and loc["tile"].tolist() == [0] * 7
    assert loc["row"].tolist() == [2, 0, 0, 0, 2, 0, 0] and loc["col"].tolist() == [3, 0, 1, 0, 3, 0, 1]
    assert (loc["image_id"].dtype, loc["row"].dtype) == (np.int32, np.int32)
    with pytest.raises(IndexError):
        store.embeddings([48])
    images = store.images().to_pydict()
    assert images["image_id"] == [0, 1, 2, 3]
    assert images["path"] == store.image_paths() == [f"train/{i:03d}.png" for i in range(4)]
    for i, (h, w) in enumerate(SIZES):
        data = (tmp_path / "data" / images["path"][i]).read_bytes()
        assert images["sha256"][i] == hashlib.sha256(data).hexdigest() and images["size"][i] == len(data)
        assert (images["height"][i], images["width"][i]) == (h, w)

    last = PatchStore(directory, partitions=[1])  # one partition: image ids go on from partition 0
    assert (last.num_patches, last.num_images, last.first_image_id) == (12, 1, 3)
    np.testing.assert_array_equal(last.embeddings(), expect[36:])
    assert last.locations([5])["image_id"].tolist() == [3] and last.image_paths() == ["train/003.png"]
    assert PatchStore(directory, partitions=[0]).num_patches == 36
    # the image paths alone, without opening the patch files (a damaged patch file is not read)
    (directory / "patches-00000.arrow").write_bytes(b"damaged")
    assert read_image_paths(directory) == [f"train/{i:03d}.png" for i in range(4)]
    assert read_image_paths(directory, [1]) == ["train/003.png"]


def test_image_record(tmp_path):
    (record,) = _images(tmp_path / "root", [(40, 60)])
    path = tmp_path / "root" / record.path
    outside = ImageRecord.from_file(path, tmp_path / "elsewhere")
    assert outside.path == path.as_posix() and os.path.isabs(outside.path) and outside.sha256 == record.sha256
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header survives, the pixels do not
    assert (ImageRecord.from_file(path, tmp_path).height, ImageRecord.from_file(path, tmp_path).width) == (40, 60)
    with pytest.raises(OSError):
        Image.open(path).load()  # a decoder would fail: from_file only read the header
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="x.png"):
        ImageRecord.from_file(tmp_path / "x.png", tmp_path)


def test_tiles(tmp_path):
    records = _images(tmp_path / "data", SIZES[:2])
    emb = np.random.default_rng(1).standard_normal((2, 3, 2, 2, DIM)).astype(np.float32)  # B, T, h, w, d
    with PatchStoreWriter(tmp_path, DIM) as writer:
        writer.write(records, emb, tiles=3)
    store = PatchStore(tmp_path)
    assert (store.num_patches, store.num_images) == (24, 2)
    np.testing.assert_array_equal(store.embeddings(), emb.reshape(-1, DIM))
    loc = store.locations(np.arange(24))
    assert loc["image_id"].tolist() == [0] * 12 + [1] * 12
    assert loc["tile"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2] * 2
    assert loc["row"].tolist() == [0, 0, 1, 1] * 6 and loc["col"].tolist() == [0, 1, 0, 1] * 6


@pytest.mark.parametrize("shape, tiles", [((2, 3, 4, DIM + 1), None), ((3, 3, 4, DIM), None), ((2, 3, 4, DIM), 2),
                                          ((2, 2, 3, 4, DIM), 3), ((2, 2, 3, 4, DIM), None), ((2, 0, 4, DIM), None),
                                          ((2, 3 * 4 * DIM), None)])
def test_bad_write_shapes(tmp_path, shape, tiles):
    records = _images(tmp_path / "data", SIZES[:2])
    with PatchStoreWriter(tmp_path, DIM) as writer:
        with pytest.raises(InputError, match="expected embeddings of shape"):
            writer.write(records, np.zeros(shape, np.float32), tiles=tiles)
        with pytest.raises(InputError, match="ImageRecord"):
            writer.write(["a.png", "b.png"], np.zeros((2, 3, 4, DIM), np.float32))
    assert PatchStore(tmp_path).num_patches == 0


def test_partitions_are_written_once(tmp_path):
    records = _images(tmp_path / "data", SIZES[:1])
    with PatchStoreWriter(tmp_path, DIM) as writer:
        writer.write(records, np.zeros((1, 2, 2, DIM), np.float32))
    with pytest.raises(InputError, match="images-00000.arrow: partition 0 already exists"):
        PatchStoreWriter(tmp_path, DIM)
    with pytest.raises(RuntimeError):  # a failed block leaves nothing behind
        with PatchStoreWriter(tmp_path, DIM, partition=1, first_image_id=1) as writer:
            writer.write(records, np.ones((1, 2, 2, DIM), np.float32))
            assert PatchStore(tmp_path).num_patches == 4  # an unfinished partition is invisible
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "images-00000.arrow", "patches-00000.arrow"]
    (tmp_path / "patches-00001.arrow.partial").write_bytes(b"")  # e.g. left by a crashed writer
    with pytest.raises(InputError, match="patches-00001.arrow.partial: cannot create"):
        PatchStoreWriter(tmp_path, DIM, partition=1)
    (tmp_path / "images-00002.arrow").write_bytes(b"")
    with pytest.raises(InputError, match="images-00002.arrow: partition 2 already exists"):
        PatchStoreWriter(tmp_path, DIM, partition=2)


def _write_v1(path, batches, names):
    """A version-1 store as patchsearch 0.1 wrote it: one file, the image path on every patch row."""
    dim = batches[0].shape[-1]
    schema = pa.schema([("image", pa.string()), ("image_id", pa.int32()), ("row", pa.int16()), ("col", pa.int16()),
                        ("embedding", pa.list_(pa.float32(), dim))],
                       metadata={"format": "patchsearch-patches", "dim": str(dim)})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        first = 0
        for emb, images in zip(batches, names):
            b, h, w, _ = emb.shape
            rows, cols = np.divmod(np.arange(h * w), w)
            writer.write_batch(pa.record_batch([
                pa.array(np.repeat(images, h * w).tolist(), pa.string()),
                pa.array(np.arange(first, first + b).repeat(h * w), pa.int32()),
                pa.array(np.tile(rows, b), pa.int16()), pa.array(np.tile(cols, b), pa.int16()),
                pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)], schema=schema))
            first += b


def test_version_1_store(tmp_path):
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((n, 3, 4, DIM)).astype(np.float32) for n in (2, 1)]
    _write_v1(tmp_path / "patches.arrow", batches, [["/data/a.png", "/data/b.png"], ["/data/c.png"]])
    expect = np.concatenate([b.reshape(-1, DIM) for b in batches])
    for store in (PatchStore(tmp_path / "patches.arrow"), PatchStore(tmp_path)):
        assert (store.dim, store.num_patches, store.num_images, store.files) == (DIM, 36, 3, ["patches.arrow"])
        np.testing.assert_array_equal(store.embeddings(), expect)
        np.testing.assert_array_equal(StoreArray(store)[[35, 2]], expect[[35, 2]])
        loc = store.locations([35, 0, 13])
        assert loc["image_id"].tolist() == [2, 0, 1] and loc["tile"].tolist() == [0, 0, 0]
        assert loc["row"].tolist() == [2, 0, 0] and loc["col"].tolist() == [3, 0, 1]
        assert store.image_paths() == ["/data/a.png", "/data/b.png", "/data/c.png"]
        images = store.images()
        assert images.schema.equals(image_schema(DIM))
        assert images["sha256"].to_pylist() == [None] * 3 and images["size"].to_pylist() == [-1] * 3
        assert images["height"].to_pylist() == images["width"].to_pylist() == [-1] * 3
    assert read_image_paths(tmp_path) == ["/data/a.png", "/data/b.png", "/data/c.png"]


def test_damaged_stores(tmp_path):
    directory, _ = _two_partitions(tmp_path)
    patches = directory / "patches-00000.arrow"
    data = patches.read_bytes()
    for damaged in (data[: len(data) // 2], data[:-1], bytes(len(data)), b""):
        patches.write_bytes(damaged)
        with pytest.raises(IndexFormatError, match="patches-00000.arrow: corrupted"):
            PatchStore(directory)
    patches.write_bytes(data)
    (directory / "images-00001.arrow").unlink()
    with pytest.raises(IndexFormatError, match="images-00001.arrow: patch store file missing"):
        PatchStore(directory)
    assert PatchStore(directory, partitions=[0]).num_images == 3
    with pytest.raises(IndexFormatError, match="images-00007.arrow: patch store file missing"):
        PatchStore(directory, partitions=[0, 7])
    for missing in (tmp_path / "nothing", tmp_path / "data"):
        with pytest.raises(IndexFormatError, match="patch store missing"):
            PatchStore(missing)
    with pytest.raises(IndexFormatError, match="00000.arrow: not a patchsearch-patches file of store version 1"):
        PatchStore(patches)  # a file path is read as a version-1 store


def test_inconsistent_partitions(tmp_path):
    directory, _ = _two_partitions(tmp_path)
    record = ImageRecord("x.png", 1, "0" * 64, 16, 16)
    with PatchStoreWriter(directory, DIM + 1, partition=2, first_image_id=4) as writer:
        writer.write([record], np.zeros((1, 3, 4, DIM + 1), np.float32))
    with pytest.raises(IndexFormatError, match="images-00002.arrow: dim 6, but images-00000.arrow has 5"):
        PatchStore(directory)
    for name in ("images-00002.arrow", "patches-00002.arrow"):
        (directory / name).unlink()
    with PatchStoreWriter(directory, DIM, partition=2, first_image_id=5) as writer:  # 4 is missing
        writer.write([record], np.zeros((1, 3, 4, DIM), np.float32))
    with pytest.raises(IndexFormatError, match="images-00002.arrow: image ids of the partition are not 4..4"):
        PatchStore(directory)
    with pytest.raises(IndexFormatError, match="images-00000.arrow: image ids of the partition are not 4..6"):
        PatchStore(directory, partitions=[1, 0])  # out of order
    (directory / "images-00000.arrow").unlink()  # images of partition 0 without image 2, which has patches
    with pa.OSFile(str(directory / "images-00000.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, image_schema(DIM)) as writer:
            writer.write_batch(pa.record_batch([[0, 1], ["a", "b"], [1, 1], ["0", "0"], [16, 16], [16, 16]],
                                               schema=image_schema(DIM)))
    with pytest.raises(IndexFormatError, match="images-00000.arrow: image ids of the partition are not 0..1"):
        PatchStore(directory, partitions=[0])
    (directory / "patches.arrow").write_bytes((directory / "patches-00001.arrow").read_bytes())
    for name in os.listdir(directory):
        if name != "patches.arrow":
            (directory / name).unlink()
    with pytest.raises(IndexFormatError, match="patches.arrow: not a patchsearch-patches file of store version 1"):
        PatchStore(directory)


def test_pyarrow_dataset_reads_the_partitions_as_one_table(tmp_path):
    directory, expect = _two_partitions(tmp_path)
    files = PatchStore(directory).files
    patches = ds.dataset([str(directory / f) for f in files if f.startswith("patches-")], format="ipc").to_table()
    assert patches.num_rows == 48 and patches.column_names == ["image_id", "tile", "row", "col", "embedding"]
    np.testing.assert_array_equal(np.stack(patches["embedding"].to_numpy(zero_copy_only=False)), expect)
    assert patches["image_id"].to_pylist() == [0] * 12 + [1] * 12 + [2] * 12 + [3] * 12
    images = ds.dataset([str(directory / f) for f in files if f.startswith("images-")], format="ipc").to_table()
    assert images["image_id"].to_pylist() == [0, 1, 2, 3] and images.schema.field("sha256").type == pa.string()


def test_store_is_memory_mapped(tmp_path):
    dim, rng = 256, np.random.default_rng(3)
    record = ImageRecord("a.png", 1, "0" * 64, 64, 64)
    emb = rng.standard_normal((16, 64, 64, dim), dtype=np.float32)
    with PatchStoreWriter(tmp_path, dim) as writer:
        for k in range(4):  # 4 record batches of 16384 patches, 16 MiB each: a 64 MiB file
            writer.write([record] * 4, emb[4 * k:4 * k + 4])
    expect = emb[4:8].reshape(-1, dim)
    before = pa.total_allocated_bytes()
    store = PatchStore(tmp_path)
    view = store._view(1)
    np.testing.assert_array_equal(view, expect)  # reads every byte of the batch
    assert view.nbytes == 16 << 20 and not view.flags.writeable
    assert pa.total_allocated_bytes() - before < 1 << 20  # nothing was read into Arrow memory
    if sys.platform.startswith("linux"):  # the view's memory is the file, mapped
        address, path = view.__array_interface__["data"][0], os.path.realpath(tmp_path / "patches-00000.arrow")
        with open("/proc/self/maps") as maps:
            regions = [line.split(maxsplit=5) for line in maps]
        assert any(len(r) == 6 and r[5].strip() == path and int(r[0].split("-")[0], 16) <= address
                   and address + view.nbytes <= int(r[0].split("-")[1], 16) for r in regions)
    rows = np.arange(16384, 16394)
    copy = store.embeddings(rows)
    assert copy.flags.writeable and copy.flags.owndata
    copy[:] = 0
    np.testing.assert_array_equal(store.embeddings(rows), expect[:10])


def test_locations_past_int16_do_not_wrap_and_int16_files_still_read(tmp_path):
    # a 1 x 40,000 feature grid: columns past 32,767 wrapped negative when stored as int16
    records = _images(tmp_path, [(16, 20)])
    with PatchStoreWriter(tmp_path, 2) as writer:
        writer.write(records, np.zeros((1, 1, 40_000, 2), np.float32))
    store = PatchStore(tmp_path)
    loc = store.locations([39_999, 32_768])
    assert loc["col"].tolist() == [39_999, 32_768] and loc["row"].tolist() == [0, 0]
    assert loc["col"].dtype == np.int32
    # a partition written with int16 locations (before int32) reads beside a new one
    from patchsearch.store import partition_files, patch_schema
    legacy = patch_schema(2, legacy=True)
    assert legacy.field("col").type == pa.int16()
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    with PatchStoreWriter(old_dir, 2, partition=0) as writer:
        writer.write(records, np.ones((1, 2, 3, 2), np.float32))
    table = pa.ipc.open_file(str(old_dir / partition_files(0)[1])).read_all()
    cast = pa.table([table[n].cast(legacy.field(n).type) for n in legacy.names], schema=legacy)
    with pa.OSFile(str(old_dir / partition_files(0)[1]), "wb") as sink, pa.ipc.new_file(sink, legacy) as w:
        w.write_table(cast)
    with PatchStoreWriter(old_dir, 2, partition=1, first_image_id=1) as writer:
        writer.write(records, np.full((1, 2, 3, 2), 2, np.float32))
    both = PatchStore(old_dir)
    assert both.num_patches == 12
    loc = both.locations([5, 11])
    assert loc["row"].tolist() == [1, 1] and loc["col"].tolist() == [2, 2] and loc["image_id"].tolist() == [0, 1]
    assert loc["row"].dtype == np.int32
    np.testing.assert_array_equal(both.embeddings([0, 11]), [[1, 1], [2, 2]])
