"""Preference data from a policy and a judge: sample K completions per prompt, rank them by a reward.

This is how the DPO paper builds its controlled-sentiment preference data (Rafailov et al. 2023, §6.1:
completions sampled from the SFT reference and labelled by the sentiment classifier) and how
InstructGPT's K-way rankings look (Ouyang et al. 2022, §3.5). :func:`sample_and_score` returns the
scored completions; :func:`ranking_rows` and :func:`pair_rows` turn them into the JSONL rows that
``jaxrlhf.data.formats`` reads unchanged (``{prompt, completions, scores}`` rankings and
``{prompt, chosen, rejected}`` pairs), so the reward-model and DPO drivers train on them as on any file.
"""

from __future__ import annotations

import itertools
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxrlhf.data.batching import build_prompt_batch
from jaxrlhf.rewards import Completions, RewardFn
from jaxrlhf.sampling import SamplingConfig, sample

__all__ = ["ScoredCompletions", "sample_and_score", "ranking_rows", "pair_rows", "write_jsonl"]


class ScoredCompletions(list):
    """``[(prompt_text, [completion_text] * K, float64 scores [K])]``, one entry per prompt."""


def sample_and_score(graphdef, params, tokenizer, prompt_ids: Sequence[np.ndarray], prompt_texts: Sequence[str], *,
                     reward: RewardFn, sampling: SamplingConfig, k: int, key: jax.Array, prompt_len: int,
                     pad_id: int, prompts_per_batch: int = 8) -> ScoredCompletions:
    """Sample ``k`` completions of every prompt from the policy and score prompt + completion.

    Args:
      graphdef, params: the policy (``nnx.split`` of a decoder).
      tokenizer: decodes completions (special tokens skipped).
      prompt_ids: token ids of each prompt (int, at most ``prompt_len`` each).
      prompt_texts: the prompts as text (kept in the rows as they are).
      reward: scores ``Completions`` -> float ``[rows]`` (e.g. the gold classifier).
      sampling: the sampler's settings (temperature 1 for samples of π itself).
      k: completions per prompt (>= 1; rankings and pairs need >= 2).
      key: PRNG key; batch ``i`` uses ``fold_in(key, i)`` (reproducible for a fixed prompt order).
      prompts_per_batch: prompts per sampler call (``prompts_per_batch * k`` rows).

    Returns:
      one ``(prompt_text, completions, scores)`` per prompt, completions in sampling order.

    Raises:
      ValueError: ``k < 1``, or prompt ids and texts of different lengths.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 completions per prompt, got {k}")
    if len(prompt_ids) != len(prompt_texts):
        raise ValueError(f"{len(prompt_ids)} prompt id lists but {len(prompt_texts)} prompt texts")
    out = ScoredCompletions()
    for b, start in enumerate(range(0, len(prompt_ids), prompts_per_batch)):
        ids = list(prompt_ids[start:start + prompts_per_batch])
        n = len(ids)
        ids += [ids[-1]] * (prompts_per_batch - n)  # fixed shapes: pad the last batch with repeats
        rows = [p for p in ids for _ in range(k)]
        batch = build_prompt_batch(rows, prompt_len, pad_id)
        res = sample((graphdef, params), batch["prompt_tokens"], batch["prompt_mask"], jax.random.fold_in(key, b),
                     sampling)
        comp = Completions.from_sample(res, tokenizer)
        scores = np.asarray(jax.device_get(reward(comp)), np.float64).reshape(prompts_per_batch, k)
        _, texts = comp.texts()
        for i in range(n):
            out.append((prompt_texts[start + i], texts[i * k:(i + 1) * k], scores[i]))
    return out


def ranking_rows(scored: ScoredCompletions) -> list[dict[str, Any]]:
    """``{prompt, completions, scores}`` rows (ranks follow from the scores, higher = better)."""
    return [{"prompt": p, "completions": list(c), "scores": [float(x) for x in s]} for p, c, s in scored]


def pair_rows(scored: ScoredCompletions, *, min_gap: float = 0.0) -> list[dict[str, Any]]:
    """All ``C(K, 2)`` pairs of each prompt as ``{prompt, chosen, rejected}`` rows (the higher score
    is chosen); pairs whose scores differ by ``<= min_gap`` (ties) are left out, as the DPO paper's
    pairs have a strict preference."""
    rows = []
    for p, comps, s in scored:
        for i, j in itertools.combinations(range(len(comps)), 2):
            if abs(s[i] - s[j]) <= min_gap:
                continue
            hi, lo = (i, j) if s[i] > s[j] else (j, i)
            rows.append({"prompt": p, "chosen": comps[hi], "rejected": comps[lo]})
    return rows


def write_jsonl(rows: Sequence[dict], path: str | pathlib.Path) -> pathlib.Path:
    """Write ``rows`` as JSON lines (UTF-8); returns the path. With several processes (each holding the same
    rows) process 0 alone writes; a study's next stage or arm starts after it (:mod:`jaxrlhf.study`)."""
    path = pathlib.Path(path)
    if jax.process_index() != 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
