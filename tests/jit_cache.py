"""Test helper shared by the op/loss tests: call a jittable function under a cached ``jax.jit``."""

import functools

import jax
import numpy as np


def jit_cached(fn):
    """``fn`` run under ``jax.jit`` (one compile instead of many eager op dispatches, for speed);
    non-array positional arguments (strings, Python numbers, None) and keyword arguments are static."""

    cache = {}

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        idx = tuple(i for i, a in enumerate(args) if isinstance(a, (np.ndarray, np.generic, jax.Array)))
        static = tuple((i, a) for i, a in enumerate(args) if i not in idx)
        key = (idx, static, tuple(sorted(kwargs.items())))
        if key not in cache:

            def inner(*arrays):
                full = dict(static)
                full.update(zip(idx, arrays))
                return fn(*[full[i] for i in range(len(args))], **kwargs)

            cache[key] = jax.jit(inner)
        return cache[key](*[args[i] for i in idx])

    return wrapped
