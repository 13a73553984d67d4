"""Abstention-aware rewards on a verifiable task: arithmetic questions with known answers.

The task (:func:`make_questions`): seeded arithmetic questions in two tiers,

* ``easy``: one-digit addition ``a + b`` with ``a, b`` in 1..9 (SmolLM2-135M-Instruct gets ~90% right);
* ``hard``: three-digit by two-digit multiplication ``a * b`` with ``a`` in 100..999, ``b`` in 10..99
  (it almost never does; it guesses),

each asked as ``What is 532 * 48? Answer with just the number. If you are not sure, say "I don't know".``
The answer is recomputed from the prompt text itself (:func:`parse_question`), so a reward is a pure
function of ``(prompt, completion)`` and fits the host-reward signature of :mod:`jaxrlhf.rewards`
(the policy's decoded prompt, chat-template text included, is searched for the question).

The checker (:func:`grade`) labels a completion ``correct``, ``wrong`` or ``abstain``:

1. the completion's first abstention phrase (:data:`ABSTENTION_PHRASES`: "I don't know", "not sure",
   "cannot answer", ...) and its first number are located; when the phrase comes first (or there is
   no number) the completion is an **abstention** -- the first committed statement decides, so a hedge
   after an answer ("12, but I'm not sure") is graded as the answer 12;
2. otherwise the **answer** is the number right after the first ``=`` (``"7 + 7 = 14"`` -> 14); failing
   that, the number right after ``is`` / ``equals`` / ``answer:`` (``"462 times 12 is 5544"``); failing
   that, the first number. Numbers may carry a sign, thousands separators (``1,234``) and decimals
   (``14.0`` equals 14);
3. a completion with neither a number nor an abstention phrase is **malformed** and counts as wrong.

The reward (:func:`abstention_reward`): ``+1`` correct, ``0`` abstain, ``-λ`` wrong (``λ`` =
``wrong_penalty`` >= 0). Answering a question one gets right with probability ``p`` is worth
``p - λ(1 - p)``, so the optimal policy answers iff ``p > λ / (1 + λ)`` and abstains otherwise (the
"selective prediction" threshold, e.g. Kalai et al. 2025, "Why Language Models Hallucinate", §4): with
``λ = 0`` abstaining is never better than guessing; with ``λ = 1`` it pays below 50% confidence.

In a config the reward is the weighted sum of three indicator functions (:func:`reward_spec`)::

    RewardSpec(functions=("jaxrlhf.abstention:answer_correct", "jaxrlhf.abstention:answer_wrong",
                          "jaxrlhf.abstention:answer_abstained"), function_weights=(1.0, -λ, 0.0))

so ``λ`` is one dotted override (``--config.algo.reward.function_weights=[1,-2,0]``), no callable per ``λ`` is
needed, and the RL driver logs the three rates of every rollout as ``reward/answer_correct`` ... (the
zero-weight abstention term is there for that metric).

Evaluation (:func:`evaluate_abstention`): greedy completions of a fixed held-out question list, graded,
and the correct / abstain / wrong rates per tier (:func:`tier_rates`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxrlhf.errors import DataError

__all__ = [
    "TIERS", "LABELS", "ABSTENTION_PHRASES", "PROMPT_TEMPLATE", "Question", "make_questions", "question_rows",
    "parse_question", "extract_answer", "find_abstention", "grade", "grade_all", "abstention_reward",
    "answer_correct", "answer_wrong", "answer_abstained", "reward_spec", "tier_rates", "evaluate_abstention",
    "mean_std_table",
]

TIERS = ("easy", "hard")
LABELS = ("correct", "abstain", "wrong")
ABSTENTION_PHRASES = (
    "i don't know", "i do not know", "i dont know", "don't know", "do not know", "not sure", "unsure",
    "cannot answer", "can't answer", "can not answer", "unable to answer", "no idea", "not certain",
    "cannot be determined", "can't be determined", "cannot compute", "can't compute", "cannot calculate",
    "can't calculate", "i'm not able to", "i am not able to",
)
PROMPT_TEMPLATE = 'What is {a} {op} {b}? Answer with just the number. If you are not sure, say "I don\'t know".'

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_OP_WORDS = {"+": "+", "plus": "+", "-": "-", "minus": "-", "*": "*", "x": "*", "×": "*", "times": "*"}
_QUESTION = re.compile(r"What is (-?\d+) (\+|-|\*|x|×|plus|minus|times) (-?\d+)\?")
_NUM = r"[-−]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_NUMBER = re.compile(r"(?<![\w.])" + _NUM)
_AFTER_EQ = re.compile(r"=\s*\$?(" + _NUM + r")")
_AFTER_WORD = re.compile(r"\b(?:is|equals|answer:)\s*\$?(" + _NUM + r")", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Question:
    """One arithmetic question: ``a op b``, its ``tier`` and ``answer`` (an int)."""

    a: int
    op: str
    b: int
    tier: str

    @property
    def answer(self) -> int:
        return _OPS[self.op](self.a, self.b)

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(a=self.a, op=self.op, b=self.b)


def make_questions(n: int, *, seed: int, hard_fraction: float = 0.5) -> list[Question]:
    """``n`` questions drawn with ``numpy.random.default_rng(seed)``: ``round(n * hard_fraction)`` hard
    (``a * b``, ``a`` in 100..999, ``b`` in 10..99) and the rest easy (``a + b``, ``a, b`` in 1..9),
    shuffled. Easy questions repeat (there are only 81); hard ones almost never do.

    Raises:
      ValueError: ``n < 1`` or ``hard_fraction`` outside [0, 1].
    """
    if n < 1:
        raise ValueError(f"make_questions: n must be >= 1, got {n}")
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"make_questions: hard_fraction must be in [0, 1], got {hard_fraction}")
    rng = np.random.default_rng(seed)
    n_hard = int(round(n * hard_fraction))
    easy = [Question(int(a), "+", int(b), "easy") for a, b in rng.integers(1, 10, size=(n - n_hard, 2))]
    hard = [Question(int(a), "*", int(b), "hard")
            for a, b in zip(rng.integers(100, 1000, size=n_hard), rng.integers(10, 100, size=n_hard))]
    qs = easy + hard
    return [qs[i] for i in rng.permutation(len(qs))]


def question_rows(questions: Sequence[Question]) -> list[dict]:
    """JSONL rows ``{"prompt", "tier", "answer"}`` (a ``data.source`` / prompts file for the drivers)."""
    return [{"prompt": q.prompt, "tier": q.tier, "answer": q.answer} for q in questions]


def parse_question(prompt: str) -> tuple[int, str]:
    """``(answer, tier)`` of the last ``What is <a> <op> <b>?`` in ``prompt`` (chat-template text around it
    is ignored). ``tier`` is ``easy`` for ``+`` and ``-`` of one-digit numbers, else ``hard``.

    Raises:
      DataError: no question in the prompt (the data source is not this task's questions).
    """
    found = _QUESTION.findall(prompt)
    if not found:
        raise DataError(f"no arithmetic question 'What is <a> <op> <b>?' in the prompt {prompt[-120:]!r}; "
                        "the abstention rewards need prompts made by jaxrlhf.abstention.make_questions")
    a, word, b = found[-1]
    a, op, b = int(a), _OP_WORDS[word], int(b)
    tier = "easy" if op in "+-" and abs(a) < 10 and abs(b) < 10 else "hard"
    return _OPS[op](a, b), tier


def _to_number(text: str) -> float:
    return float(text.replace(",", "").replace("−", "-"))


def extract_answer(completion: str) -> tuple[float, int] | None:
    """``(value, position)`` of the answer in ``completion`` (rule 2 of the module doc), or None when it
    holds no number. ``position`` is the index of the completion's first number (the start of the
    committed statement)."""
    first = _NUMBER.search(completion)
    if first is None:
        return None
    for pattern in (_AFTER_EQ, _AFTER_WORD):
        m = pattern.search(completion)
        if m is not None:
            return _to_number(m.group(1)), first.start()
    return _to_number(first.group(0)), first.start()


def find_abstention(completion: str) -> int | None:
    """Index of the first abstention phrase in ``completion`` (case-insensitive, curly apostrophes
    normalised), or None."""
    text = completion.lower().replace("’", "'").replace("‘", "'")
    hits = [i for i in (text.find(p) for p in ABSTENTION_PHRASES) if i >= 0]
    return min(hits) if hits else None


def grade(prompt: str, completion: str) -> str:
    """``correct``, ``abstain`` or ``wrong`` (malformed = wrong) by the rules of the module doc.

    Raises:
      DataError: ``prompt`` holds no question (:func:`parse_question`).
    """
    answer, _ = parse_question(prompt)
    found = extract_answer(completion)
    abstain = find_abstention(completion)
    if abstain is not None and (found is None or abstain < found[1]):
        return "abstain"
    if found is None:
        return "wrong"
    return "correct" if math.isclose(found[0], answer, rel_tol=0.0, abs_tol=1e-9) else "wrong"


def grade_all(prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
    """:func:`grade` of each pair.

    Raises:
      ValueError: different lengths; DataError: a prompt without a question.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"prompts ({len(prompts)}) and completions ({len(completions)}) differ in length")
    return [grade(p, c) for p, c in zip(prompts, completions)]


def abstention_reward(prompts: Sequence[str], completions: Sequence[str], wrong_penalty: float = 1.0) -> np.ndarray:
    """``+1`` correct, ``0`` abstain, ``-wrong_penalty`` wrong (malformed included): float32 ``[B]``.

    Raises:
      ValueError: ``wrong_penalty < 0`` or different lengths; DataError: a prompt without a question.
    """
    if not wrong_penalty >= 0:
        raise ValueError(f"wrong_penalty (λ) must be >= 0, got {wrong_penalty}")
    value = {"correct": 1.0, "abstain": 0.0, "wrong": -float(wrong_penalty)}
    return np.asarray([value[g] for g in grade_all(prompts, completions)], np.float32)


def _indicator(label: str, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    return np.asarray([g == label for g in grade_all(prompts, completions)], np.float32)


def answer_correct(prompts: list[str], completions: list[str]) -> np.ndarray:
    """1.0 where the completion is graded ``correct``, else 0.0: float32 ``[B]`` (:func:`grade`)."""
    return _indicator("correct", prompts, completions)


def answer_wrong(prompts: list[str], completions: list[str]) -> np.ndarray:
    """1.0 where the completion is graded ``wrong`` (malformed included), else 0.0: float32 ``[B]``."""
    return _indicator("wrong", prompts, completions)


def answer_abstained(prompts: list[str], completions: list[str]) -> np.ndarray:
    """1.0 where the completion is an abstention, else 0.0: float32 ``[B]``."""
    return _indicator("abstain", prompts, completions)


def reward_spec(wrong_penalty: float):
    """The :class:`jaxrlhf.config.RewardSpec` of :func:`abstention_reward` with ``λ = wrong_penalty``:
    the three indicators weighted ``(1, -λ, 0)`` (module doc).

    Raises:
      ValueError: ``wrong_penalty < 0``.
    """
    from jaxrlhf.config import RewardSpec

    if not wrong_penalty >= 0:
        raise ValueError(f"wrong_penalty (λ) must be >= 0, got {wrong_penalty}")
    return RewardSpec(functions=tuple(f"jaxrlhf.abstention:{f.__name__}"
                                      for f in (answer_correct, answer_wrong, answer_abstained)),
                      function_weights=(1.0, -float(wrong_penalty), 0.0))


def tier_rates(labels: Sequence[str], tiers: Sequence[str]) -> dict[str, float]:
    """Rates of each label per tier and over all: ``{"<tier>/<label>": fraction, "<tier>/n": count}``
    for tier in ``easy``, ``hard``, ``all`` (a tier with no questions gets NaN rates).

    Raises:
      ValueError: different lengths, or an unknown label / tier.
    """
    if len(labels) != len(tiers):
        raise ValueError(f"labels ({len(labels)}) and tiers ({len(tiers)}) differ in length")
    if bad := set(labels) - set(LABELS):
        raise ValueError(f"unknown labels {sorted(bad)}; expected {LABELS}")
    if bad := set(tiers) - set(TIERS):
        raise ValueError(f"unknown tiers {sorted(bad)}; expected {TIERS}")
    lab, tie = np.asarray(labels, object), np.asarray(tiers, object)
    out: dict[str, float] = {}
    for tier in (*TIERS, "all"):
        sel = np.ones(len(lab), bool) if tier == "all" else tie == tier
        n = int(sel.sum())
        out[f"{tier}/n"] = float(n)
        for label in LABELS:
            out[f"{tier}/{label}"] = float(np.mean(lab[sel] == label)) if n else float("nan")
    return out


def evaluate_abstention(graphdef: Any, params: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *,
                        eos_token_ids: Sequence[int], max_new_tokens: int = 12, batch_size: int = 32,
                        use_chat_template: bool = True) -> tuple[dict[str, float], list[dict]]:
    """Greedy completions of ``rows`` (``{"prompt", "tier"}``), graded: ``(tier_rates, records)``.

    Prompts are encoded as the RL driver encodes them (:func:`jaxrlhf.data.tokenize.encode_prompt`,
    with the chat template when ``use_chat_template``), left-padded to the longest, in batches of
    ``batch_size`` rows (the last padded with repeats, dropped), so one compiled sampler serves every
    call with the same rows. ``records``: ``{"prompt", "tier", "completion", "label"}`` per row.

    Raises:
      ValueError: no rows, or a row without ``prompt`` / with an unknown ``tier``.
    """
    import jax

    from jaxrlhf.data.batching import build_prompt_batch
    from jaxrlhf.data.tokenize import encode_prompt, pad_id_for
    from jaxrlhf.sampling import SamplingConfig, sample

    if not rows:
        raise ValueError("evaluate_abstention: no rows")
    for i, r in enumerate(rows):
        if not r.get("prompt") or r.get("tier") not in TIERS:
            raise ValueError(f"evaluate_abstention: row {i} needs a 'prompt' and a 'tier' in {TIERS}, got {dict(r)}")
    ids = [encode_prompt(tokenizer, r["prompt"], use_chat_template=use_chat_template) for r in rows]
    P = max(len(x) for x in ids)
    pad = pad_id_for(tokenizer)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_token_ids=tuple(eos_token_ids),
                         pad_token_id=pad)
    completions: list[str] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - real)
        b = build_prompt_batch(chunk, P, pad)
        out = jax.device_get(sample((graphdef, params), b["prompt_tokens"], b["prompt_mask"], jax.random.key(0), cfg))
        completions += [tokenizer.decode(t[m > 0], skip_special_tokens=True)
                        for t, m in zip(np.asarray(out.completion_tokens_BN)[:real],
                                        np.asarray(out.completion_mask_BN)[:real])]
    prompts = [r["prompt"] for r in rows]
    labels = grade_all(prompts, completions)
    tiers = [r["tier"] for r in rows]
    records = [{"prompt": p, "tier": t, "completion": c, "label": lab}
               for p, t, c, lab in zip(prompts, tiers, completions, labels)]
    return tier_rates(labels, tiers), records


def mean_std_table(groups: Mapping[str, Sequence[Mapping[str, float]]], keys: Sequence[str], digits: int = 2) -> str:
    """A markdown table: one row per group, one column per key, cells ``mean ± std`` over the group's
    dicts (:func:`jaxrlhf.evaluate.mean_std_over_seeds`: sample std, ddof = 1; ``mean`` alone for a group
    of one), and a column ``n`` (the group size).

    Raises:
      ValueError: an empty group, or a dict without one of ``keys``.
    """
    from jaxrlhf.evaluate import format_mean_std, mean_std_over_seeds

    head = "| group | n | " + " | ".join(keys) + " |\n|---|---|" + "---|" * len(keys) + "\n"
    lines = []
    for name, dicts in groups.items():
        if not dicts:
            raise ValueError(f"mean_std_table: group {name!r} is empty")
        cells = []
        for k in keys:
            if any(k not in d for d in dicts):
                raise ValueError(f"mean_std_table: group {name!r} has a row without {k!r}")
            cells.append(format_mean_std(mean_std_over_seeds(d[k] for d in dicts), digits))
        lines.append(f"| {name} | {len(dicts)} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"
