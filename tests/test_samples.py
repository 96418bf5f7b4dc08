"""The on-disk sample store: the batch grid and shards, corrupt-file detection, atomic packing."""

import numpy as np
import pytest

from foca_bench.samples import Sample, SampleStore, batches, read_png, write_png


def test_shards_partition_the_same_batch_grid():
    one = batches(103, 10)
    assert [(b.start, b.stop) for b in one][-1] == (100, 103) and len(one) == 11
    for k in (2, 3, 8):
        parts = [batches(103, 10, s, k) for s in range(k)]
        together = sorted((b.start, b.stop) for p in parts for b in p)
        assert together == [(b.start, b.stop) for b in one]  # disjoint, complete, same batches as one shard
    with pytest.raises(ValueError, match="benchmark.shard=2"):
        batches(10, 2, 2, 2)


def _store(tmp_path, n=6):
    return SampleStore(tmp_path, [Sample(index=i, seed=i, label=i % 3) for i in range(n)], shape=(4, 5, 3))


def test_missing_truncated_corrupt_and_misshapen_files_are_detected(tmp_path):
    store = _store(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (6, 4, 5, 3), dtype=np.uint8)
    assert store.write(range(6), images, only={0, 1, 2, 3, 4}) == 5
    assert store.missing() == [5]
    data = store.path(store.samples[1]).read_bytes()
    store.path(store.samples[1]).write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray(store.path(store.samples[2]).read_bytes())
    flipped[60] ^= 0xFF  # inside the image data: the PNG CRC no longer matches
    store.path(store.samples[2]).write_bytes(bytes(flipped))
    write_png(store.path(store.samples[3]), images[3][:2])  # wrong size
    assert store.missing() == [1, 2, 3, 5]
    assert store.todo(range(0, 2)) == [1]
    assert np.array_equal(read_png(store.path(store.samples[0])), images[0])  # lossless round trip
    with pytest.raises(RuntimeError, match="4 of 6 samples are missing"):
        store.pack()
    assert not store.done.exists() and not store.npz.exists()


def test_pack_writes_npz_in_index_order_then_done(tmp_path):
    store = _store(tmp_path)
    images = np.random.default_rng(1).integers(0, 256, (6, 4, 5, 3), dtype=np.uint8)
    store.write(range(6), images)
    store.pack()
    with np.load(store.npz) as f:
        assert np.array_equal(f["arr_0"], images) and f["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert store.complete() and not list(tmp_path.glob(".*.tmp"))
