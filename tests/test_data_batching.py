"""jaxrlhf.data.batching: fixed-shape numpy batches in the CONVENTIONS.md layout.

References: per-example numpy re-derivation (strip padding, compare ids / masks / positions).
"""
import numpy as np
import pytest

from jaxrlhf.data import batching as B

PAD = 99


def _examples(rng, n, max_p=6, max_r=6, min_r=1):
    out = []
    for _ in range(n):
        p = rng.integers(1, 50, rng.integers(0, max_p + 1)).tolist()
        r = rng.integers(50, 90, rng.integers(min_r, max_r + 1)).tolist()
        out.append((p, r))
    return out


def _expected_mask(p, r):
    m = np.array([0.0] * len(p) + [1.0] * len(r), np.float32)
    m[0] = 0.0
    return m


def _check_dtypes(batch):
    assert batch["tokens"].dtype == np.int32
    assert batch["completion_mask"].dtype == np.float32
    assert batch["segment_ids"].dtype == np.int32
    assert batch["positions"].dtype == np.int32


def test_lm_batch_left_vs_right_padding():
    rng = np.random.default_rng(0)
    exs = _examples(rng, 7) + [([], [5, 6, 7]), ([1, 2], [60])]
    T = 14
    right = B.build_lm_batch(exs, T, PAD, "right")
    left = B.build_lm_batch(exs, T, PAD, "left")
    for b in (right, left):
        _check_dtypes(b)
        assert all(v.shape == (len(exs), T) for v in b.values())
    for i, (p, r) in enumerate(exs):
        n = len(p) + len(r)
        for b, sl in ((right, slice(0, n)), (left, slice(T - n, T))):
            real = b["segment_ids"][i] > 0
            assert real.sum() == n and real[sl].all()
            np.testing.assert_array_equal(b["tokens"][i][real], p + r)
            np.testing.assert_array_equal(b["completion_mask"][i][real], _expected_mask(p, r))
            np.testing.assert_array_equal(b["positions"][i][real], np.arange(n))
            assert (b["tokens"][i][~real] == PAD).all()
            assert (b["completion_mask"][i][~real] == 0).all()
            assert (b["positions"][i][~real] == 0).all()
    # the same content after removing padding
    for k in B.LM_KEYS:
        for i in range(len(exs)):
            np.testing.assert_array_equal(right[k][i][right["segment_ids"][i] > 0], left[k][i][left["segment_ids"][i] > 0])


def test_lm_batch_errors_and_fixed_batch_size():
    with pytest.raises(ValueError, match=r"example 1 has 9 tokens .* > seq_len=8"):
        B.build_lm_batch([([1], [2]), ([1] * 5, [2] * 4)], 8, 0)
    b = B.build_lm_batch([([1], [2, 3])], 6, PAD, batch_size=4)
    assert b["tokens"].shape == (4, 6)
    assert (b["segment_ids"][1:] == 0).all() and (b["tokens"][1:] == PAD).all()
    with pytest.raises(ValueError, match="batch_size"):
        B.build_lm_batch([([1], [2])] * 3, 6, PAD, batch_size=2)
    with pytest.raises(ValueError, match="padding_side"):
        B.build_lm_batch([([1], [2])], 6, PAD, "middle")


def test_packing_reconstructs_examples():
    rng = np.random.default_rng(1)
    exs = _examples(rng, 40, max_p=8, max_r=10)
    T = 24
    batch, assign = B.pack_lm_examples(exs, T, PAD, return_assignment=True)
    _check_dtypes(batch)
    R = batch["tokens"].shape[0]
    total = sum(len(p) + len(r) for p, r in exs)
    assert R < len(exs) and R >= -(-total // T)
    seen = set()
    for i, ((p, r), (row, seg)) in enumerate(zip(exs, assign)):
        sel = batch["segment_ids"][row] == seg
        np.testing.assert_array_equal(batch["tokens"][row][sel], p + r)
        np.testing.assert_array_equal(batch["positions"][row][sel], np.arange(len(p) + len(r)))
        np.testing.assert_array_equal(batch["completion_mask"][row][sel], _expected_mask(p, r))
        assert np.flatnonzero(sel).tolist() == list(range(np.flatnonzero(sel)[0], np.flatnonzero(sel)[-1] + 1))
        seen.add((row, seg))
    assert len(seen) == len(exs)
    # segments 1, 2, 3... in order within each row; the first token of each segment is unmasked
    for row in range(R):
        seg = batch["segment_ids"][row]
        ids = [s for k, s in enumerate(seg) if s > 0 and (k == 0 or seg[k - 1] != s)]
        assert ids == list(range(1, len(ids) + 1))
        starts = [k for k in range(T) if seg[k] > 0 and (k == 0 or seg[k - 1] != seg[k])]
        assert (batch["completion_mask"][row][starts] == 0).all()
        assert (batch["positions"][row][starts] == 0).all()
        assert (batch["tokens"][row][seg == 0] == PAD).all()
    # independent reconstruction without the assignment: every example appears as one segment
    segs = sorted(
        tuple(batch["tokens"][row][batch["segment_ids"][row] == s].tolist())
        for row in range(R) for s in range(1, batch["segment_ids"][row].max() + 1)
    )
    assert segs == sorted(tuple(p + r) for p, r in exs)
    # first-fit: replaying the placements, no lower row had room for the example when it was placed
    fill = [0] * R
    for (p, r), (row, _) in zip(exs, assign):
        n = len(p) + len(r)
        assert all(fill[j] + n > T for j in range(row))
        fill[row] += n
        assert fill[row] <= T
    fixed = B.pack_lm_examples(exs, T, PAD, num_rows=R + 2)
    assert fixed["tokens"].shape == (R + 2, T) and (fixed["segment_ids"][R:] == 0).all()
    with pytest.raises(ValueError, match="num_rows"):
        B.pack_lm_examples(exs, T, PAD, num_rows=1)
    with pytest.raises(ValueError, match="example 0"):
        B.pack_lm_examples([([1] * 20, [2] * 10)], T, PAD)


def test_preference_batch_pair_axis():
    exs = [([1, 2, 3], [10, 11], [20]), ([4], [12, 13, 14], [21, 22])]
    b = B.build_preference_batch(exs, 8, PAD)
    _check_dtypes(b)
    assert all(v.shape == (2, 2, 8) for v in b.values())
    for i, (p, c, r) in enumerate(exs):
        ref_c = B.build_lm_batch([(p, c)], 8, PAD)
        ref_r = B.build_lm_batch([(p, r)], 8, PAD)
        for k in B.LM_KEYS:
            np.testing.assert_array_equal(b[k][i, 0], ref_c[k][0])
            np.testing.assert_array_equal(b[k][i, 1], ref_r[k][0])
    left = B.build_preference_batch(exs, 8, PAD, "left")
    assert (left["segment_ids"][:, :, -1] == 1).all()


def test_ranked_batch_pads_missing_completions():
    exs = [([1, 2], [[10], [11, 12], [13]], [1, 0, 1]), ([3], [[14, 15]], [0])]
    b = B.build_ranked_batch(exs, 6, PAD, num_completions=4)
    assert b["tokens"].shape == (2, 4, 6) and b["ranks"].dtype == np.int32
    np.testing.assert_array_equal(b["ranks"], [[1, 0, 1, -1], [0, -1, -1, -1]])
    assert (b["segment_ids"][0, 3] == 0).all() and (b["segment_ids"][1, 1:] == 0).all()
    assert (b["completion_mask"][1, 1:] == 0).all() and (b["tokens"][1, 1:] == PAD).all()
    np.testing.assert_array_equal(b["tokens"][0, 1, :4], [1, 2, 11, 12])
    with pytest.raises(ValueError, match="num_completions"):
        B.build_ranked_batch(exs, 6, PAD, num_completions=2)
    assert B.build_ranked_batch(exs, 6, PAD)["tokens"].shape == (2, 3, 6)


def test_classification_and_prompt_batches():
    c = B.build_classification_batch([([7, 8, 9], 1), ([3], 0)], 4, PAD, batch_size=3)
    assert c["labels"].dtype == np.int32 and c["labels"].tolist() == [1, 0, -1]
    np.testing.assert_array_equal(c["completion_mask"][0], [0, 1, 1, 0])
    np.testing.assert_array_equal(c["segment_ids"][1], [1, 0, 0, 0])

    pb = B.build_prompt_batch([[1, 2, 3], [4], []], 5, PAD)
    assert pb["prompt_tokens"].dtype == np.int32 and pb["prompt_mask"].dtype == np.int32
    np.testing.assert_array_equal(pb["prompt_tokens"], [[PAD, PAD, 1, 2, 3], [PAD, PAD, PAD, PAD, 4], [PAD] * 5])
    np.testing.assert_array_equal(pb["prompt_mask"], [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0] * 5])
    with pytest.raises(ValueError, match="prompt 0"):
        B.build_prompt_batch([[1] * 6], 5, PAD)


def test_stack_unstack_roundtrip():
    b = B.pack_lm_examples([([1], [2, 3]), ([4, 5], [6])], 4, PAD)
    rows = B.unstack_batch(b)
    back = B.stack_examples(rows)
    for k in b:
        np.testing.assert_array_equal(back[k], b[k])
