"""Tokenized examples -> fixed-shape numpy batches (keys and dtypes as in CONVENTIONS.md).

LM keys, shape ``[B, T]`` (``[B, 2, T]`` for pairs, ``[B, N, T]`` for rankings):

* ``tokens`` int32: token ids, ``pad_id`` on padding;
* ``completion_mask`` float32: 1 on response tokens that are predicted from the previous slot,
  0 on prompt, padding and the first token of every segment;
* ``segment_ids`` int32: 0 on padding, 1.. per (packed) sequence;
* ``positions`` int32: 0 at each sequence's first real token, counting up; 0 on padding.

Examples are never truncated here: a sequence longer than ``seq_len`` raises ``ValueError`` (truncate
with the ``tokenize_*_dataset`` helpers, which report what they cut). Every builder takes an optional
``batch_size`` that appends all-padding rows so the leading dimension is fixed even for a short last
batch (padding rows have ``segment_ids == 0`` everywhere, ranks -1, labels -1, desirable False).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from jaxrlhf.data.tokenize import (  # noqa: F401  (re-exported: dataset-level helpers)
    tokenize_classification_dataset,
    tokenize_preference_dataset,
    tokenize_prompt_dataset,
    tokenize_ranked_dataset,
    tokenize_sft_dataset,
)

__all__ = [
    "LM_KEYS",
    "build_lm_batch",
    "pack_lm_examples",
    "build_preference_batch",
    "build_ranked_batch",
    "build_classification_batch",
    "build_prompt_batch",
    "stack_examples",
    "unstack_batch",
]

LM_KEYS = ("tokens", "completion_mask", "segment_ids", "positions")
PaddingSide = Literal["right", "left"]


def _ids(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.int32).reshape(-1)


def _empty_lm(shape: tuple[int, ...], pad_id: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.full(shape, pad_id, np.int32),
        "completion_mask": np.zeros(shape, np.float32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }


def _check_args(seq_len: int, padding_side: str, n: int, batch_size: int | None) -> int:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if batch_size is None:
        return n
    if n > batch_size:
        raise ValueError(f"got {n} examples for batch_size={batch_size}; pass at most batch_size examples")
    return batch_size


def _write_seq(
    batch: dict[str, np.ndarray],
    row: tuple,
    prompt: np.ndarray,
    response: np.ndarray,
    seq_len: int,
    padding_side: str,
    index: int,
) -> None:
    n_p, n_r = len(prompt), len(response)
    n = n_p + n_r
    if n > seq_len:
        raise ValueError(
            f"example {index} has {n} tokens (prompt {n_p} + response {n_r}) > seq_len={seq_len}; "
            "truncate first (tokenize_*_dataset(max_length=seq_len)) or raise seq_len"
        )
    if n == 0:
        return
    start = 0 if padding_side == "right" else seq_len - n
    sl = row + (slice(start, start + n),)
    batch["tokens"][sl] = np.concatenate([prompt, response])
    batch["segment_ids"][sl] = 1
    batch["positions"][sl] = np.arange(n, dtype=np.int32)
    cm = np.zeros(n, np.float32)
    cm[n_p:] = 1.0
    cm[0] = 0.0  # the first token of a sequence is never predicted
    batch["completion_mask"][sl] = cm


def build_lm_batch(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    seq_len: int,
    pad_id: int,
    padding_side: PaddingSide = "right",
    *,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """One sequence per row: ``[(prompt_ids, response_ids), ...]`` -> LM batch ``[B, T]``.

    Args:
      examples: B pairs of int token-id sequences (e.g. ``SFTTokens``).
      seq_len: T.
      pad_id: token id written on padding (masked by ``segment_ids == 0``).
      padding_side: ``"right"`` (real tokens in slots ``0..n-1``) or ``"left"`` (slots ``T-n..T-1``);
        positions count 0..n-1 over the real tokens either way.
      batch_size: pad with all-padding rows up to this many rows.

    Returns:
      ``tokens`` int32[B,T], ``completion_mask`` float32[B,T] (1 on response tokens, 0 on the first
      token), ``segment_ids`` int32[B,T] (1 real / 0 pad), ``positions`` int32[B,T].

    Raises:
      ValueError: an example longer than ``seq_len`` (names the example), bad arguments.
    """
    b = _check_args(seq_len, padding_side, len(examples), batch_size)
    batch = _empty_lm((b, seq_len), pad_id)
    for i, ex in enumerate(examples):
        prompt, response = ex[0], ex[1]
        _write_seq(batch, (i,), _ids(prompt), _ids(response), seq_len, padding_side, i)
    return batch


class _LeftmostFit:
    """Max segment tree over row capacities: leftmost row with capacity >= L in O(log n)."""

    def __init__(self, n_rows: int, capacity: int):
        size = 1
        while size < max(n_rows, 1):
            size *= 2
        self.size = size
        self.tree = np.zeros(2 * size, np.int64)
        self.tree[size:size + n_rows] = capacity
        for i in range(size - 1, 0, -1):
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])

    def find(self, need: int) -> int:
        if self.tree[1] < need:
            return -1
        i = 1
        while i < self.size:
            i = 2 * i if self.tree[2 * i] >= need else 2 * i + 1
        return i - self.size

    def take(self, row: int, amount: int) -> None:
        i = row + self.size
        self.tree[i] -= amount
        i //= 2
        while i:
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])
            i //= 2


def pack_lm_examples(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    seq_len: int,
    pad_id: int,
    *,
    num_rows: int | None = None,
    return_assignment: bool = False,
) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
    """Greedy first-fit packing of several ``(prompt_ids, response_ids)`` per row -> LM batch ``[R, T]``.

    Examples are placed in order, each into the first (lowest) row that still has room (a new row
    when none has), so rows keep their examples in input order. Within a row the k-th example gets
    ``segment_ids == k`` (1, 2, 3...), positions restart at 0 per segment, and ``completion_mask`` is 0
    on the first token of each segment (it is not predicted from the previous segment). Padding is
    on the right.

    Args:
      examples: pairs of token-id sequences, each of length <= ``seq_len``.
      seq_len: T.
      pad_id: padding token id.
      num_rows: emit exactly this many rows (extra rows are all padding).
      return_assignment: also return, per example, ``(row, segment_id)``.

    Returns:
      The LM batch (int32 ``tokens``/``segment_ids``/``positions``, float32 ``completion_mask``, each
      ``[R, T]``), and the assignment when requested.

    Raises:
      ValueError: an example longer than ``seq_len``, or more than ``num_rows`` rows needed.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    pairs = [(_ids(ex[0]), _ids(ex[1])) for ex in examples]
    for i, (p, r) in enumerate(pairs):
        if len(p) + len(r) > seq_len:
            raise ValueError(
                f"example {i} has {len(p) + len(r)} tokens > seq_len={seq_len}; truncate first or raise seq_len"
            )
    fit = _LeftmostFit(len(pairs), seq_len)
    fill: list[int] = []  # used slots per open row
    nseg: list[int] = []
    assignment: list[tuple[int, int]] = []
    for p, r in pairs:
        n = len(p) + len(r)
        if n == 0:
            assignment.append((-1, 0))
            continue
        row = fit.find(n)
        if row == len(fill):
            fill.append(0)
            nseg.append(0)
        fit.take(row, n)
        nseg[row] += 1
        assignment.append((row, nseg[row]))
        fill[row] += n
    n_rows = len(fill)
    if num_rows is not None:
        if n_rows > num_rows:
            raise ValueError(f"packing needs {n_rows} rows > num_rows={num_rows}; raise num_rows or pass fewer examples")
        n_rows = num_rows
    batch = _empty_lm((n_rows, seq_len), pad_id)
    cursor = [0] * len(fill)
    for (p, r), (row, seg) in zip(pairs, assignment):
        if row < 0:
            continue
        n = len(p) + len(r)
        s = slice(cursor[row], cursor[row] + n)
        batch["tokens"][row, s] = np.concatenate([p, r])
        batch["segment_ids"][row, s] = seg
        batch["positions"][row, s] = np.arange(n, dtype=np.int32)
        cm = np.zeros(n, np.float32)
        cm[len(p):] = 1.0
        cm[0] = 0.0
        batch["completion_mask"][row, s] = cm
        cursor[row] += n
    return (batch, assignment) if return_assignment else batch


def build_preference_batch(
    examples: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
    seq_len: int,
    pad_id: int,
    padding_side: PaddingSide = "right",
    *,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """``[(prompt_ids, chosen_ids, rejected_ids), ...]`` -> LM keys of shape ``[B, 2, T]``.

    Index 0 of the pair axis is ``prompt + chosen``, index 1 ``prompt + rejected`` (never concatenated
    on the batch axis). Same per-sequence layout as :func:`build_lm_batch`.

    Raises:
      ValueError: a sequence longer than ``seq_len``.
    """
    b = _check_args(seq_len, padding_side, len(examples), batch_size)
    batch = _empty_lm((b, 2, seq_len), pad_id)
    for i, ex in enumerate(examples):
        p = _ids(ex[0])
        _write_seq(batch, (i, 0), p, _ids(ex[1]), seq_len, padding_side, i)
        _write_seq(batch, (i, 1), p, _ids(ex[2]), seq_len, padding_side, i)
    return batch


def build_ranked_batch(
    examples: Sequence[tuple[Sequence[int], Sequence[Sequence[int]], Sequence[int]]],
    seq_len: int,
    pad_id: int,
    num_completions: int | None = None,
    padding_side: PaddingSide = "right",
    *,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """``[(prompt_ids, [completion_ids...], ranks), ...]`` -> LM keys ``[B, N, T]`` + ``ranks`` int32[B, N].

    ``N = num_completions`` (default: the most completions of any example). An example with fewer
    completions gets all-padding rows (``tokens == pad_id``, masks/segments/positions 0) with rank -1.

    Raises:
      ValueError: more completions than ``num_completions``, ranks/completions length mismatch,
        a sequence longer than ``seq_len``.
    """
    n = num_completions if num_completions is not None else max((len(ex[1]) for ex in examples), default=1)
    b = _check_args(seq_len, padding_side, len(examples), batch_size)
    batch = _empty_lm((b, n, seq_len), pad_id)
    ranks = np.full((b, n), -1, np.int32)
    for i, ex in enumerate(examples):
        p, comps, rk = _ids(ex[0]), ex[1], list(ex[2])
        if len(comps) > n:
            raise ValueError(f"example {i} has {len(comps)} completions > num_completions={n}")
        if len(rk) != len(comps):
            raise ValueError(f"example {i} has {len(rk)} ranks for {len(comps)} completions")
        for j, c in enumerate(comps):
            _write_seq(batch, (i, j), p, _ids(c), seq_len, padding_side, i)
        ranks[i, : len(rk)] = rk
    batch["ranks"] = ranks
    return batch


def build_classification_batch(
    examples: Sequence[tuple[Sequence[int], int]],
    seq_len: int,
    pad_id: int,
    padding_side: PaddingSide = "right",
    *,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """``[(ids, label), ...]`` -> LM keys ``[B, T]`` + ``labels`` int32[B].

    The whole text is treated as the completion (``completion_mask`` 1 on every real token but the
    first), so the same batch can also train a language model; a last-token classifier reads the
    slot of the last nonzero ``segment_ids``. Padding rows get label -1.
    """
    batch = build_lm_batch([((), ex[0]) for ex in examples], seq_len, pad_id, padding_side, batch_size=batch_size)
    labels = np.full(batch["tokens"].shape[0], -1, np.int32)
    labels[: len(examples)] = [int(ex[1]) for ex in examples]
    batch["labels"] = labels
    return batch


def build_prompt_batch(
    prompts: Sequence[Sequence[int]],
    prompt_len: int,
    pad_id: int,
    *,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Prompts for rollouts -> ``prompt_tokens`` int32[B,P] LEFT-padded and ``prompt_mask`` int32[B,P].

    Left padding puts every prompt's last token in slot ``P-1`` so generation starts at the same slot
    for the whole batch; positions of real tokens are ``cumsum(prompt_mask) - 1``.

    Raises:
      ValueError: a prompt longer than ``prompt_len`` (truncate with ``tokenize_prompt_dataset``).
    """
    b = _check_args(prompt_len, "left", len(prompts), batch_size)
    tokens = np.full((b, prompt_len), pad_id, np.int32)
    mask = np.zeros((b, prompt_len), np.int32)
    for i, p in enumerate(prompts):
        p = _ids(p)
        if len(p) > prompt_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens > prompt_len={prompt_len}; truncate first")
        if len(p):
            tokens[i, prompt_len - len(p):] = p
            mask[i, prompt_len - len(p):] = 1
    return {"prompt_tokens": tokens, "prompt_mask": mask}


def unstack_batch(batch: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Split a batch dict along its leading axis into per-row dicts (e.g. packed rows for an iterator)."""
    sizes = {k: np.shape(v)[0] for k, v in batch.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch arrays disagree on the leading dimension: {sizes}")
    n = next(iter(sizes.values()), 0)
    return [{k: np.asarray(v)[i] for k, v in batch.items()} for i in range(n)]


def stack_examples(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Inverse of :func:`unstack_batch`: stack per-row dicts into a batch dict (a ``collate_fn``)."""
    if not rows:
        raise ValueError("stack_examples needs at least one row")
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
