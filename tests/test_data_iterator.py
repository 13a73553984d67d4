"""jaxrlhf.data.iterator: deterministic/resumable order, process slices, global arrays, fixed splits.

References: the expected order is re-derived with ``np.random.default_rng([seed, epoch])``; the
fixed split is pinned and re-derived with ``hashlib``.
"""
import functools
import hashlib

import jax
import numpy as np
import pytest

from jaxrlhf.data import batching as B
from jaxrlhf.data.iterator import BatchIterator, train_eval_split


def _collate_ids(items):
    return {"ids": np.asarray(items, np.int64)}


def _take(it, k):
    return [next(it)["ids"].copy() for _ in range(k)]


def test_order_is_deterministic_by_seed_and_epoch():
    n, bs = 23, 4
    it = BatchIterator(list(range(n)), bs, _collate_ids, seed=7)
    assert len(it) == n // bs
    got = _take(it, 3 * len(it))
    for e in range(3):
        perm = np.random.default_rng([7, e]).permutation(n)
        for b in range(len(it)):
            np.testing.assert_array_equal(got[e * len(it) + b], perm[b * bs:(b + 1) * bs])
    again = _take(BatchIterator(list(range(n)), bs, _collate_ids, seed=7), 3 * len(it))
    assert all((a == b).all() for a, b in zip(got, again))
    other = _take(BatchIterator(list(range(n)), bs, _collate_ids, seed=8), 3 * len(it))
    assert any((a != b).any() for a, b in zip(got, other))
    # epochs differ from one another
    assert not np.array_equal(np.concatenate(got[: len(it)]), np.concatenate(got[len(it): 2 * len(it)]))


@pytest.mark.parametrize("k", [0, 3, 5, 6, 13])
def test_resume_yields_the_same_batches(k):
    n, bs = 25, 4  # 6 batches per epoch (drop_last)
    ref = BatchIterator(list(range(n)), bs, _collate_ids, seed=3)
    _take(ref, k)
    state = ref.get_state()
    assert set(state) == {"epoch", "index"}
    expected = _take(ref, 10)
    resumed = BatchIterator(list(range(n)), bs, _collate_ids, seed=3)
    resumed.set_state(dict(state))
    got = _take(resumed, 10)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_drop_last_false_and_num_epochs():
    it = BatchIterator(list(range(10)), 4, _collate_ids, seed=0, drop_last=False, shuffle=False, num_epochs=2)
    got = [b["ids"].tolist() for b in it]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] * 2
    with pytest.raises(ValueError, match="drop_last"):
        BatchIterator(list(range(3)), 4, _collate_ids, seed=0)
    with pytest.raises(ValueError, match="'index'"):
        BatchIterator(list(range(8)), 4, _collate_ids, seed=0).set_state({"epoch": 0})


def test_process_slices_concatenate_to_global_batch():
    n, bs, pc = 37, 8, 4
    glob = BatchIterator(list(range(n)), bs, _collate_ids, seed=11)
    locs = [BatchIterator(list(range(n)), bs, _collate_ids, seed=11, process_index=i, process_count=pc) for i in range(pc)]
    for _ in range(2 * len(glob)):
        g = next(glob)["ids"]
        parts = [next(l)["ids"] for l in locs]
        assert all(len(p) == bs // pc for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), g)
    with pytest.raises(ValueError, match="divisible"):
        BatchIterator(list(range(n)), 6, _collate_ids, seed=0, process_count=4)


def test_iterator_with_real_collate_fixed_shapes():
    exs = [([1, 2], list(range(10, 10 + k))) for k in range(1, 12)]
    collate = functools.partial(B.build_lm_batch, seq_len=16, pad_id=0, batch_size=4)
    it = BatchIterator(exs, 4, collate, seed=0, drop_last=False, num_epochs=1)
    shapes = [tuple(b["tokens"].shape) for b in it]
    assert shapes == [(4, 16)] * 3


def test_place_batch_on_fake_cpu_mesh():
    """The one host->mesh helper: every leaf of a batch (or a lone array) is split over (data, fsdp)."""
    from jaxrlhf.sharding import MeshConfig, make_mesh, place_batch

    nd = len(jax.devices())
    if nd < 2:
        pytest.skip("needs several (fake) devices")
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=1))
    batch = B.build_preference_batch(
        [([1, 2], [3 + i], [4, 5 + i]) for i in range(nd)], seq_len=6, pad_id=0
    )
    out = place_batch(batch, mesh)
    for k, v in batch.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(out[k]), v)
        assert len(out[k].addressable_shards) == nd
        assert out[k].addressable_shards[0].data.shape[0] == v.shape[0] // nd
    lone = place_batch(np.arange(nd, dtype=np.float32), mesh)
    np.testing.assert_array_equal(np.asarray(lone), np.arange(nd))
    assert lone.addressable_shards[0].data.shape == (1,)

def test_train_eval_split_is_fixed():
    tr, ev = train_eval_split(2312, 312, seed=0)
    assert len(ev) == 312 and len(tr) == 2000
    assert np.intersect1d(tr, ev).size == 0
    np.testing.assert_array_equal(np.union1d(tr, ev), np.arange(2312))
    # independent re-derivation with hashlib
    keys = [int.from_bytes(hashlib.blake2b(f"0:{i}".encode(), digest_size=8).digest(), "big") for i in range(2312)]
    ref = sorted(sorted(range(2312), key=lambda i: keys[i])[:312])
    assert ev.tolist() == ref
    assert ev[:8].tolist() == [3, 7, 9, 18, 23, 24, 29, 31]  # pinned: the held-out set must never move
    tr2, ev2 = train_eval_split(2312, 312, seed=0)
    np.testing.assert_array_equal(ev, ev2)
    _, ev3 = train_eval_split(2312, 312, seed=1)
    assert not np.array_equal(ev, ev3)
    _, evf = train_eval_split(100, 0.1, seed=0)
    assert len(evf) == 10
    with pytest.raises(ValueError, match="eval_size"):
        train_eval_split(10, 11)
