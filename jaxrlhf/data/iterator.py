"""Deterministic, resumable batch iteration, multi-host slicing, and fixed train/eval splits."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxrlhf.errors import DataError

__all__ = ["BatchIterator", "train_eval_split"]


class BatchIterator:
    """Epoch-shuffled batches with a resumable state.

    Epoch ``e`` visits the examples in the order ``np.random.default_rng([seed, e]).permutation(n)``
    (or ``0..n-1`` when ``shuffle=False``) and cuts it into global batches of ``batch_size``. The state
    ``{"epoch": e, "index": i}`` means "the next batch is batch ``i`` of epoch ``e``", so a fresh
    iterator given the state of another (:meth:`set_state`) yields exactly the batches the other would
    have yielded next. The order depends only on ``(seed, epoch)``, not on how many batches were drawn.

    Multi-host: with ``process_count > 1`` each process gets the contiguous slice
    ``[process_index * b, (process_index + 1) * b)`` (``b = batch_size // process_count``) of every
    global batch, so concatenating the processes' batches in process order gives the global batch. Only
    the examples of that slice are read (``examples.fetch(indices)`` when the sequence has it, e.g.
    :class:`jaxrlhf.distributed.ShardedExamples`, which tokenises just those rows).

    Args:
      examples: an indexable sequence (list, ``datasets.Dataset``, ...) of examples.
      batch_size: GLOBAL batch size (divisible by ``process_count``).
      collate_fn: list of examples -> numpy batch dict (e.g. ``functools.partial(build_lm_batch,
        seq_len=..., pad_id=...)``).
      seed: shuffling seed.
      drop_last: drop the last incomplete global batch of each epoch. With ``drop_last=False`` the
        last batch is short (a process's slice may even be empty): use a collate with ``batch_size=``
        to pad it to a fixed shape.
      shuffle: reshuffle every epoch (False: dataset order).
      num_epochs: stop after this many epochs (None: iterate forever).
      process_index, process_count: this process's slice (defaults: single process).

    Raises:
      ValueError: ``batch_size`` not positive or not divisible by ``process_count``; fewer examples
        than one batch with ``drop_last=True``; bad process index.
    """

    def __init__(
        self,
        examples: Sequence[Any],
        batch_size: int,
        collate_fn: Callable[[list[Any]], Mapping[str, np.ndarray]],
        seed: int,
        drop_last: bool = True,
        *,
        shuffle: bool = True,
        num_epochs: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
        if batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} (global) must be divisible by process_count={process_count}"
            )
        self.examples = examples
        self.n = len(examples)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.collate_fn = collate_fn
        self.seed = int(seed)
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.process_index = process_index
        self.process_count = process_count
        self.batches_per_epoch = self.n // batch_size if drop_last else -(-self.n // batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{self.n} examples give no batch of batch_size={batch_size} with drop_last=True; "
                "use more data or a smaller batch (data.batch_size), or drop_last=False"
            )
        self._epoch = 0
        self._index = 0
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    # --- state ---------------------------------------------------------------------------------
    def get_state(self) -> dict[str, int]:
        """``{"epoch": int, "index": int}``: the next batch is batch ``index`` of epoch ``epoch``."""
        return {"epoch": self._epoch, "index": self._index}

    def set_state(self, state: Mapping[str, int]) -> None:
        """Resume from :meth:`get_state` output.

        Raises:
          ValueError: missing keys or negative / out-of-range values.
        """
        for k in ("epoch", "index"):
            if k not in state:
                raise ValueError(f"iterator state has no {k!r}; expected {{'epoch': int, 'index': int}}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise ValueError(
                f"bad iterator state {dict(state)}: need epoch >= 0 and 0 <= index <= {self.batches_per_epoch}"
            )
        self._epoch, self._index = epoch, index

    # --- order ---------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Example indices of epoch ``epoch`` in visiting order, int64[n]."""
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def global_batch_indices(self, epoch: int, index: int) -> np.ndarray:
        """Example indices of global batch ``index`` of ``epoch`` (all processes)."""
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.epoch_order(epoch), epoch
        return self._order[index * self.batch_size: (index + 1) * self.batch_size]

    def local_batch_indices(self, epoch: int, index: int) -> np.ndarray:
        """This process's slice of global batch ``index`` of ``epoch``."""
        g = self.global_batch_indices(epoch, index)
        lo = self.process_index * self.local_batch_size
        return g[lo: lo + self.local_batch_size]

    # --- iteration -----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch."""
        return self.batches_per_epoch

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Mapping[str, np.ndarray]:
        if self._index >= self.batches_per_epoch:
            self._epoch += 1
            self._index = 0
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        idx = self.local_batch_indices(self._epoch, self._index)
        self._index += 1
        fetch = getattr(self.examples, "fetch", None)  # e.g. jaxrlhf.distributed.ShardedExamples: one batched read
        return self.collate_fn(fetch(idx) if callable(fetch) else [self.examples[int(i)] for i in idx])


def train_eval_split(n: int, eval_size: int | float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed held-out split of ``range(n)``: ``(train_indices, eval_indices)``, both sorted int64.

    Example ``i`` is ranked by ``blake2b(f"{seed}:{i}")`` and the ``eval_size`` smallest hashes are held
    out, so the split depends only on ``(n, eval_size, seed)`` -- not on the numpy version or RNG
    streams -- and is the same on every host and every run (e.g. HH-RLHF harmless-base test:
    ``train_eval_split(2312, 312, seed=0)``).

    Args:
      n: number of examples.
      eval_size: number of held-out examples, or a fraction in (0, 1) (rounded).
      seed: split seed.

    Raises:
      ValueError: ``eval_size`` outside ``[0, n]``.
    """
    if isinstance(eval_size, float) and 0 < eval_size < 1:
        eval_size = int(round(eval_size * n))
    eval_size = int(eval_size)
    if not 0 <= eval_size <= n:
        raise ValueError(f"eval_size must be in [0, {n}] (or a fraction in (0, 1)), got {eval_size}")
    keys = np.array(
        [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") for i in range(n)],
        dtype=np.uint64,
    )
    order = np.argsort(keys, kind="stable")
    eval_idx = np.sort(order[:eval_size]).astype(np.int64)
    train_idx = np.sort(order[eval_size:]).astype(np.int64)
    return train_idx, eval_idx
