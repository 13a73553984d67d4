"""RLAIF: preferences labelled by a language-model judge, read from its next-token probabilities.

The judge (any decoder jaxrlhf loads; the default is SmolLM2-135M-Instruct) is shown a conversation and two
replies labelled ``A`` and ``B`` (:data:`JUDGE_TEMPLATE`, through the judge's chat template) and asked which
is better. Its verdict is not parsed from generated text: it is the next-token distribution restricted to the
two label tokens, ``p(A) = softmax([logit_A, logit_B])[0]`` (Lee et al. 2023, "RLAIF", §2.1: "we compute the
log-probabilities of generating the tokens '1' and '2' ... and calculate the softmax to obtain a preference
distribution").

Every pair is judged in both orders to cancel position bias (Lee et al. 2023 §2.1.1; Zheng et al. 2023,
"Judging LLM-as-a-judge", §3.3): with ``p1 = P(A)`` when the first reply is shown as A and ``p2 = P(A)``
when the second reply is shown as A,

    P(first reply is better) = (p1 + (1 - p2)) / 2.

A judge that always answers "A" therefore gives 0.5 for every pair, and its verdict flips with the order
every time (position-bias rate 1). :func:`order_debiased_preference` is that arithmetic on arrays;
:func:`judge_pairs` runs the model; :func:`labelled_rows` writes the rows the reward-model and DPO drivers
read unchanged (``{prompt, chosen, rejected}`` plus ``judge_prob``, the judge's probability that ``chosen``
is the better reply).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.errors import ModelError

__all__ = [
    "JUDGE_TEMPLATE", "LABELS", "JudgeVerdicts", "order_debiased_preference", "label_token_ids",
    "judge_prompt_ids", "label_logits", "judge_pairs", "PairJudgement", "labelled_rows", "agreement_report",
    "pairs_of_rows", "load_judge", "label_rows", "label_file",
]

JUDGE_TEMPLATE = (
    "Here is a conversation between a human and an AI assistant, followed by two possible final replies of "
    "the assistant.\n\n"
    "Conversation:\n{prompt}\n\n"
    "Reply A:\n{a}\n\n"
    "Reply B:\n{b}\n\n"
    "Which reply is more helpful, honest and harmless? Answer with a single letter: A or B."
)
"""The judge's user message. ``{prompt}`` is the conversation before the reply (HH-RLHF text as is),
``{a}``/``{b}`` the two replies. It is wrapped in the judge's chat template with the assistant turn opened,
so the next token is the answer; the judge's probabilities of :data:`LABELS` are read there."""

LABELS = ("A", "B")


class JudgeVerdicts(NamedTuple):
    """Per pair (arrays ``[N]``, float64 unless noted).

    Attributes:
      prob_first: P(first reply is better) = (p_first_as_a + (1 - p_second_as_a)) / 2.
      p_first_as_a: the judge's P(A) with the first reply shown as A.
      p_second_as_a: the judge's P(A) with the second reply shown as A.
      flipped: bool; the verdict changes with the order (position bias).
    """

    prob_first: np.ndarray
    p_first_as_a: np.ndarray
    p_second_as_a: np.ndarray
    flipped: np.ndarray


def order_debiased_preference(logits_first_as_a_N2, logits_second_as_a_N2) -> JudgeVerdicts:
    """The judge's preference from its label logits in both orders (module docstring for the maths).

    Args:
      logits_first_as_a_N2: float ``[N, 2]``, the next-token logits of (``A``, ``B``) with the first reply
        shown as A; ``logits_second_as_a_N2`` the same with the order swapped.
    Returns:
      :class:`JudgeVerdicts`. A verdict is "first" when its probability is > 0.5, "second" when < 0.5;
      a pair is ``flipped`` when the two orders' verdicts differ (an exact 0.5 in either order counts as
      no verdict, so it is flipped unless both orders are exactly 0.5).
    Raises:
      ValueError: the arrays are not ``[N, 2]`` or differ in shape.
    """
    a = np.asarray(logits_first_as_a_N2, np.float64)
    b = np.asarray(logits_second_as_a_N2, np.float64)
    if a.ndim != 2 or a.shape[1] != 2 or a.shape != b.shape:
        raise ValueError(f"label logits must both be [N, 2] (A, B), got {a.shape} and {b.shape}")
    p1 = 1.0 / (1.0 + np.exp(a[:, 1] - a[:, 0]))  # softmax over the two labels, P(A)
    p2 = 1.0 / (1.0 + np.exp(b[:, 1] - b[:, 0]))
    first_by_order1 = np.sign(p1 - 0.5)     # +1 first better, -1 second better, 0 no verdict
    first_by_order2 = np.sign(0.5 - p2)
    flipped = first_by_order1 != first_by_order2
    return JudgeVerdicts((p1 + (1.0 - p2)) / 2.0, p1, p2, flipped)


def label_token_ids(tokenizer: Any) -> tuple[int, int]:
    """The token ids of ``A`` and ``B`` as the first token of the assistant's reply.

    Raises:
      ModelError: a label is not a single token of the judge's tokenizer.
    """
    ids = []
    for label in LABELS:
        enc = tokenizer.encode(label, add_special_tokens=False)
        if len(enc) != 1:
            raise ModelError(f"judge tokenizer encodes the label {label!r} as {len(enc)} tokens {enc}; the judge "
                             "needs single-token answer labels (use another judge model)")
        ids.append(int(enc[0]))
    return ids[0], ids[1]


def _truncate(tokenizer: Any, text: str, max_tokens: int, keep: str) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    ids = ids[-max_tokens:] if keep == "end" else ids[:max_tokens]
    return ("..." if keep == "end" else "") + tokenizer.decode(ids) + ("" if keep == "end" else " ...")


def judge_prompt_ids(tokenizer: Any, prompt: str, first: str, second: str, *, max_prompt_tokens: int = 192,
                     max_reply_tokens: int = 96) -> tuple[list[int], list[int]]:
    """Token ids of the judge's input in both orders (first reply as A, then second reply as A).

    The conversation keeps its last ``max_prompt_tokens`` tokens and each reply its first
    ``max_reply_tokens`` (the judge sees "..." where text was cut). The chat template is applied with the
    assistant turn opened (``add_generation_prompt``); without a chat template the raw text ends in
    ``"\\nAnswer:"``.
    """
    prompt = _truncate(tokenizer, prompt.strip(), max_prompt_tokens, keep="end")
    first = _truncate(tokenizer, first.strip(), max_reply_tokens, keep="start")
    second = _truncate(tokenizer, second.strip(), max_reply_tokens, keep="start")

    def ids(a: str, b: str) -> list[int]:
        text = JUDGE_TEMPLATE.format(prompt=prompt, a=a, b=b)
        if getattr(tokenizer, "chat_template", None):
            out = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                add_generation_prompt=True)
            out = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return [int(t) for t in out]
        return tokenizer.encode(text + "\nAnswer:", add_special_tokens=True)

    return ids(first, second), ids(second, first)


@functools.partial(jax.jit, static_argnums=0)
def _last_token_label_logits(graphdef, params, tokens_BT, lengths_B, label_ids_2):
    from flax import nnx

    model = nnx.merge(graphdef, params)
    B, T = tokens_BT.shape
    segment_ids = (jnp.arange(T)[None, :] < lengths_B[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T)[None, :], (B, T)).astype(jnp.int32)
    out = model(tokens_BT, positions, segment_ids)
    last = jnp.take_along_axis(out.hidden_BTD, (lengths_B - 1)[:, None, None], axis=1)  # [B, 1, D]
    # Only the last position's logits are used: the full [B, T, V] logits are dead code XLA removes.
    return model.logits(last)[:, 0, :][:, label_ids_2].astype(jnp.float32)


def label_logits(graphdef, params, token_lists: Sequence[Sequence[int]], label_ids: tuple[int, int], *,
                 batch_size: int = 8, bucket: int = 64, desc: str = "judge") -> np.ndarray:
    """The judge's next-token logits of the two labels after each input: float32 ``[N, 2]``, in input order.

    Inputs are batched by length (sorted, so a batch pads to little more than its own longest input),
    right-padded to a multiple of ``bucket`` tokens (a few compiled shapes), ``batch_size`` per batch (the
    last batch padded with copies of its first row, dropped). A progress bar counts the inputs.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    out = np.zeros((len(token_lists), 2), np.float32)
    pad = 0
    with tqdm(total=len(order), desc=desc, unit="input", leave=False) as bar:
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            chunk = [list(token_lists[j]) for j in idx]
            n = len(chunk)
            chunk += [chunk[0]] * (batch_size - n)
            T = -(-max(len(t) for t in chunk) // bucket) * bucket
            toks = np.full((batch_size, T), pad, np.int32)
            for r, t in enumerate(chunk):
                toks[r, :len(t)] = t
            lengths = np.asarray([len(t) for t in chunk], np.int32)
            logits = _last_token_label_logits(graphdef, params, toks, lengths, np.asarray(label_ids, np.int32))
            out[idx] = np.asarray(jax.device_get(logits))[:n]
            bar.update(n)
    return out


@dataclasses.dataclass(frozen=True)
class PairJudgement:
    """One judged pair: the texts, and the judge's verdicts (see :class:`JudgeVerdicts`)."""

    prompt: str
    first: str
    second: str
    prob_first: float
    p_first_as_a: float
    p_second_as_a: float
    flipped: bool


def judge_pairs(graphdef, params, tokenizer, pairs: Sequence[tuple[str, str, str]], *, batch_size: int = 8,
                max_prompt_tokens: int = 192, max_reply_tokens: int = 96) -> list[PairJudgement]:
    """Judge ``(prompt, first, second)`` triples in both orders with the decoder ``(graphdef, params)``.

    Raises:
      ModelError: the labels are not single tokens of ``tokenizer``, or an input is longer than the judge's
        context (lower ``max_prompt_tokens``/``max_reply_tokens``).
    """
    from flax import nnx

    label_ids = label_token_ids(tokenizer)
    inputs_a, inputs_b = [], []
    for prompt, first, second in pairs:
        a, b = judge_prompt_ids(tokenizer, prompt, first, second, max_prompt_tokens=max_prompt_tokens,
                                max_reply_tokens=max_reply_tokens)
        inputs_a.append(a)
        inputs_b.append(b)
    context = nnx.merge(graphdef, params).cfg.max_position_embeddings
    longest = max((len(t) for t in inputs_a + inputs_b), default=0)
    if longest > context:
        raise ModelError(f"a judge input has {longest} tokens, more than the judge's context {context}; lower "
                         "max_prompt_tokens / max_reply_tokens")
    la = label_logits(graphdef, params, inputs_a, label_ids, batch_size=batch_size, desc="judge (first as A)")
    lb = label_logits(graphdef, params, inputs_b, label_ids, batch_size=batch_size, desc="judge (second as A)")
    v = order_debiased_preference(la, lb)
    return [PairJudgement(p, f, s, float(v.prob_first[i]), float(v.p_first_as_a[i]), float(v.p_second_as_a[i]),
                          bool(v.flipped[i])) for i, (p, f, s) in enumerate(pairs)]


def labelled_rows(judged: Sequence[PairJudgement]) -> list[dict]:
    """``{prompt, chosen, rejected, judge_prob, position_flip}`` rows: ``chosen`` is the reply the judge
    prefers (the first on an exact tie) and ``judge_prob`` its probability of being better (>= 0.5). The
    DPO and reward-model drivers read them as any ``{prompt, chosen, rejected}`` file."""
    rows = []
    for j in judged:
        first_wins = j.prob_first >= 0.5
        rows.append({"prompt": j.prompt, "chosen": j.first if first_wins else j.second,
                     "rejected": j.second if first_wins else j.first,
                     "judge_prob": j.prob_first if first_wins else 1.0 - j.prob_first,
                     "position_flip": j.flipped})
    return rows


def agreement_report(judged: Sequence[PairJudgement], human_first_is_chosen: Sequence[bool] | None = None) -> dict:
    """Summary of judged pairs: ``n``, ``position_bias_rate`` (share of pairs whose verdict flips with the
    order) and its standard error, ``mean_confidence`` (mean of max(prob, 1 - prob)); with human labels
    (``human_first_is_chosen[i]``: the human preferred the first reply), ``agreement`` (share of pairs where
    the debiased judge prefers the human's choice; a tie at exactly 0.5 counts half) and its standard error."""
    prob = np.asarray([j.prob_first for j in judged], np.float64)
    flips = np.asarray([j.flipped for j in judged], np.float64)
    n = len(prob)
    sem = (lambda x: float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan"))  # noqa: E731
    out = {"n": n, "position_bias_rate": float(flips.mean()) if n else float("nan"),
           "position_bias_rate_sem": sem(flips),
           "mean_confidence": float(np.maximum(prob, 1 - prob).mean()) if n else float("nan")}
    if human_first_is_chosen is not None:
        human = np.asarray(human_first_is_chosen, bool)
        agree = np.where(prob == 0.5, 0.5, (prob > 0.5) == human).astype(np.float64)
        out.update(agreement=float(agree.mean()) if n else float("nan"), agreement_sem=sem(agree))
    return out


def _prompt_text(prompt: Any) -> str:
    """A prompt as the judge reads it: text as is; a message list as ``Human:``/``Assistant:`` turns."""
    if isinstance(prompt, str):
        return prompt
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt) + "\n\nAssistant:"


def pairs_of_rows(rows: Sequence[dict]) -> tuple[list[tuple[str, str, str]], list[bool | None]]:
    """``(pairs, human)``: the ``(prompt, first, second)`` triples to judge and, per pair, whether the human
    label prefers ``first`` (None when the row carries no human preference).

    Accepted rows: preference pairs in any format :func:`jaxrlhf.data.formats.preference_example` reads
    (HH-RLHF dialogues, ``{prompt, chosen, rejected}``, message lists; ``first`` = chosen, so a judge that
    agrees with the human prefers ``first``), or ``{prompt, completions: [...]}`` with two or more
    completions (every pair ``i < j``; ``ranks``/``ranking`` or ``scores`` give the human preference).

    Raises:
      DataError: a row is neither (names the row and the accepted layouts).
    """
    from jaxrlhf.data.formats import preference_example, ranks_from_scores
    from jaxrlhf.errors import DataError

    pairs: list[tuple[str, str, str]] = []
    human: list[bool | None] = []
    for i, row in enumerate(rows):
        if "completions" in row:
            comps = row["completions"]
            if not isinstance(comps, (list, tuple)) or len(comps) < 2 or "prompt" not in row:
                raise DataError(f"row {i}: a 'completions' row needs a 'prompt' and a list of >= 2 completions "
                                "to judge")
            ranks = row.get("ranks") or row.get("ranking")
            if ranks is None and row.get("scores") is not None:
                ranks = ranks_from_scores(row["scores"])
            for j in range(len(comps)):
                for k in range(j + 1, len(comps)):
                    pairs.append((_prompt_text(row["prompt"]), str(comps[j]), str(comps[k])))
                    human.append(None if ranks is None or ranks[j] == ranks[k] else bool(ranks[j] < ranks[k]))
            continue
        try:
            ex, _ = preference_example(row, i)
        except ValueError as e:
            raise DataError(f"{e}; the judge reads preference pairs or {{prompt, completions: [...]}} rows") from None
        pairs.append((_prompt_text(ex.prompt), ex.chosen, ex.rejected))
        human.append(True)
    return pairs, human


def load_judge(name: str, dtype: str = "bfloat16"):
    """``(graphdef, params, tokenizer)`` of the judge model ``name`` (short name, folder, .gguf or hub id)
    in ``dtype`` (``bfloat16`` or ``float32``).

    Raises:
      ModelError: the model has no tokenizer.
    """
    from flax import nnx

    from jaxrlhf.models.hub import load_pretrained

    pre = load_pretrained(name)
    if pre.tokenizer is None:
        raise ModelError(f"judge {name!r} has no tokenizer; give a model folder or .gguf with one")
    pre.model.cfg = pre.cfg.replace(dtype=dtype)
    graphdef, params = nnx.split(pre.model)
    return graphdef, params, pre.tokenizer


def label_rows(rows: Sequence[dict], judge, *, batch_size: int = 8, max_prompt_tokens: int = 192,
               max_reply_tokens: int = 96) -> tuple[list[dict], dict]:
    """Judge every pair of ``rows`` (:func:`pairs_of_rows`) with ``judge = (graphdef, params, tokenizer)``.

    Returns ``(labelled rows, report)``: the rows of :func:`labelled_rows` (plus ``human_agrees`` where the
    input had a human preference) and :func:`agreement_report` over the pairs with a human label.
    """
    graphdef, params, tokenizer = judge
    pairs, human = pairs_of_rows(rows)
    judged = judge_pairs(graphdef, params, tokenizer, pairs, batch_size=batch_size,
                         max_prompt_tokens=max_prompt_tokens, max_reply_tokens=max_reply_tokens)
    out = labelled_rows(judged)
    for row, j, h in zip(out, judged, human):
        if h is not None:
            row["human_agrees"] = bool((j.prob_first > 0.5) == h) if j.prob_first != 0.5 else None
    labelled = [(j, h) for j, h in zip(judged, human) if h is not None]
    report = agreement_report(judged)
    if labelled:
        report.update({k: v for k, v in agreement_report([j for j, _ in labelled], [h for _, h in labelled]).items()
                       if k.startswith("agreement")}, n_human=len(labelled))
    return out, report


def label_file(source: str, out: str, *, judge: str = "smollm2-135m-instruct", split: str = "train",
               limit: int = 0, seed: int = 0, dtype: str = "bfloat16", batch_size: int = 8,
               max_prompt_tokens: int = 192, max_reply_tokens: int = 96) -> dict:
    """``jaxrlhf label``: judge the pairs of a data source and write JSONL rows the reward-model and DPO
    experiments read unchanged, plus ``<out>.report.json`` (agreement with the human labels when the input
    has them, position-bias rate, sizes).

    ``limit`` > 0 judges a seeded sample of that many rows (file order kept). Returns the report.

    Raises:
      DataError / DataFileNotFoundError: the source cannot be read or has no pairs.
      ModelError: the judge cannot be loaded or its labels are not single tokens.
    """
    import json
    import pathlib

    from jaxrlhf.data.sources import load_rows
    from jaxrlhf.errors import DataError

    rows = load_rows(source, split=split)
    idx = np.arange(len(rows))
    if limit and limit < len(rows):
        idx = np.sort(np.random.default_rng(seed).permutation(len(rows))[:limit])
    rows = [rows[int(i)] for i in idx]
    if not rows:
        raise DataError(f"{source}: no rows to judge")
    labelled, report = label_rows(rows, load_judge(judge, dtype), batch_size=batch_size,
                                  max_prompt_tokens=max_prompt_tokens, max_reply_tokens=max_reply_tokens)
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in labelled))
    report = dict(report, source=source, split=split, judge=judge, rows=len(rows), out=str(path))
    pathlib.Path(str(path) + ".report.json").write_text(json.dumps(report, indent=2))
    return report
