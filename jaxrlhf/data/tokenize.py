"""Canonical examples -> token ids, with explicit, reported truncation.

Token ids are returned as ``numpy.int32`` 1-D arrays.

Truncation rules (:func:`truncate_pair`, used by every ``encode_*`` / ``tokenize_*_dataset``):

1. the prompt is cut from the LEFT to ``max_prompt_length`` tokens (keeps the end of the dialogue,
   i.e. the turn being answered);
2. each response is then cut from the RIGHT so that ``len(prompt) + len(response) <= max_length``
   (a response cut this way loses its EOS, so the model is not taught to stop there);
3. a row that cannot be kept -- the (left-truncated) prompt alone fills ``max_length`` so no response
   token fits, or a response has 0 tokens -- is dropped and recorded in :class:`TruncationReport`
   with its index and reason; it is never silently lost.

``on_overflow`` chooses the policy: ``"truncate"`` (rules above), ``"drop"`` (any row that would
need truncation is dropped and recorded instead) or ``"error"`` (raise ``DataError`` naming the row).
A dataset whose rows were *all* dropped for their length raises :class:`~jaxrlhf.errors.DataError` (a
``ValueError``) naming the limits: nothing would be left to train on.

End of response: with plain text the response ends with ``tokenizer.eos_token_id``. With a chat
template the response is the rendered assistant turn up to and including the template's
end-of-turn token (e.g. ``<|im_end|>`` for ChatML), i.e. exactly the tokens the template would put
after ``add_generation_prompt=True`` minus trailing non-special text (such as ChatML's ``"\\n"``);
this is what the model must emit to end its turn at generation time. If the template is not
prefix-consistent (rendering prompt+reply does not start with the rendered prompt), the reply is
encoded as plain text followed by ``eos_token_id``.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from jaxrlhf.data import formats as F
from jaxrlhf.errors import DataError, ModelError

__all__ = [
    "OnOverflow",
    "TruncationReport",
    "SFTTokens",
    "PreferenceTokens",
    "RankedTokens",
    "ClassificationTokens",
    "encode_prompt",
    "encode_response",
    "encode_pair",
    "encode_text",
    "truncate_pair",
    "eos_ids_for",
    "pad_id_for",
    "tokenize_sft_dataset",
    "tokenize_preference_dataset",
    "tokenize_ranked_dataset",
    "tokenize_classification_dataset",
    "tokenize_prompt_dataset",
]

logger = logging.getLogger(__name__)

OnOverflow = Literal["truncate", "drop", "error"]
_POLICIES = ("truncate", "drop", "error")


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TruncationReport:
    """What truncation did to a dataset.

    Attributes:
      kept: rows returned.
      truncated_prompt: kept rows whose prompt was cut (from the left).
      truncated_response: kept rows with at least one response cut (from the right).
      dropped: ``(row index, reason)`` for each row left out. Reasons: ``"no_room_for_response"``
        (prompt alone fills ``max_length``), ``"empty_response"``, and with ``on_overflow="drop"``:
        ``"prompt_too_long"`` / ``"too_long"`` (would have needed prompt / response truncation);
        ``"empty_prompt"`` for prompt-only datasets.
    """

    kept: int = 0
    truncated_prompt: int = 0
    truncated_response: int = 0
    dropped: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    @property
    def n_dropped(self) -> int:
        return len(self.dropped)

    @property
    def dropped_indices(self) -> list[int]:
        return [i for i, _ in self.dropped]

    def counts(self) -> dict[str, int]:
        """Flat counts (for metrics / logging)."""
        return {
            "kept": self.kept,
            "truncated_prompt": self.truncated_prompt,
            "truncated_response": self.truncated_response,
            "dropped": self.n_dropped,
        }

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for _, r in self.dropped:
            reasons[r] = reasons.get(r, 0) + 1
        s = (
            f"kept {self.kept}, truncated prompt {self.truncated_prompt}, "
            f"truncated response {self.truncated_response}, dropped {self.n_dropped}"
        )
        if reasons:
            s += f" {reasons} (first rows: {self.dropped_indices[:20]})"
        return s

    def log(self, log: logging.Logger | None = None) -> None:
        """Log the summary (WARNING when rows were dropped, INFO otherwise)."""
        (log or logger).log(logging.WARNING if self.dropped else logging.INFO, "truncation: %s", self.summary())


# ----------------------------------------------------------------------------------------------
# Tokenized examples
# ----------------------------------------------------------------------------------------------
class SFTTokens(NamedTuple):
    """One SFT example as token ids: ``prompt_ids`` and ``response_ids`` (int numpy ``[n]``)."""

    prompt_ids: np.ndarray
    response_ids: np.ndarray


class PreferenceTokens(NamedTuple):
    """One preference pair as token ids: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (int numpy ``[n]``)."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray


class RankedTokens(NamedTuple):
    """One K-way ranking as token ids: ``prompt_ids``, one ``completion_ids`` array per completion and its
    ``ranks`` (0 = best, equal = tie)."""

    prompt_ids: np.ndarray
    completion_ids: list[np.ndarray]
    ranks: list[int]


class ClassificationTokens(NamedTuple):
    """One classification example: the text's token ``ids`` (int numpy ``[n]``) and its class ``label``."""

    ids: np.ndarray
    label: int


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------
def _ids(x: Any) -> list[int]:
    if isinstance(x, Mapping) or hasattr(x, "keys"):
        x = x["input_ids"]
    x = list(x)
    if x and isinstance(x[0], (list, tuple)):  # batched output of one item
        x = list(x[0])
    return [int(t) for t in x]


def eos_ids_for(tokenizer: Any, model_cfg: Any = None) -> tuple[int, ...]:
    """End-of-sequence ids (the one helper): the model config's ``eos_token_ids`` (when given) followed by
    the tokenizer's ``eos_token_id`` (an int or a list), duplicates removed, order kept; ``()`` when
    neither has one."""
    ids: list[int] = list(getattr(model_cfg, "eos_token_ids", None) or ()) if model_cfg is not None else []
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids += list(tok_eos) if isinstance(tok_eos, (list, tuple)) else [tok_eos]
    return tuple(dict.fromkeys(int(i) for i in ids))


def pad_id_for(tokenizer: Any, model_cfg: Any = None) -> int:
    """The padding id (the one helper): tokenizer ``pad_token_id``, else the model config's
    ``pad_token_id``, else the first EOS id (:func:`eos_ids_for`), else 0. Padding positions are always
    masked (``segment_ids == 0`` / ``prompt_mask == 0``), so the id only has to be a valid token."""
    for cand in (getattr(tokenizer, "pad_token_id", None), getattr(model_cfg, "pad_token_id", None)):
        if cand is not None:
            return int(cand)
    eos = eos_ids_for(tokenizer, model_cfg)
    return eos[0] if eos else 0


class _Encoder:
    """Per-tokenizer encoding state computed once (BOS behaviour, special ids)."""

    def __init__(self, tokenizer: Any, use_chat_template: bool):
        self.tok = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            warnings.warn(
                "use_chat_template=True but the tokenizer has no chat_template; string prompts are "
                "encoded as plain text",
                stacklevel=3,
            )
        self.chat = use_chat_template and has_template
        self.special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos = None if eos is None else int(eos)
        probe_with, probe_without = self.text("a", True), self.text("a", False)
        self.appends_eos = (
            self.eos is not None and probe_with[-1:] == [self.eos] and probe_without[-1:] != [self.eos]
        )

    def text(self, s: str, special: bool) -> list[int]:
        return _ids(self.tok(s, add_special_tokens=special))

    def prompt(self, prompt: F.Prompt) -> list[int]:
        if self.chat:
            return _ids(
                self.tok.apply_chat_template(F.prompt_to_messages(prompt), add_generation_prompt=True, tokenize=True)
            )
        if not isinstance(prompt, str):
            raise DataError(
                "prompt is a list of messages but no chat template is used; set use_chat_template=True "
                "(data.use_chat_template) with a tokenizer that has a chat_template (or give string prompts)"
            )
        ids = self.text(prompt, special=True)
        # drop a trailing EOS some post-processors append: the prompt must not end the sequence.
        if self.appends_eos and ids and ids[-1] == self.eos:
            ids = ids[:-1]
        return ids

    def texts(self, strings: Sequence[str], special: bool, chunk: int = 1024) -> list[list[int]]:
        """Batch-encode strings (one tokenizer call per chunk)."""
        out: list[list[int]] = []
        for k in range(0, len(strings), chunk):
            enc = self.tok(list(strings[k: k + chunk]), add_special_tokens=special)
            out.extend([int(t) for t in ids] for ids in enc["input_ids"])
        return out

    def prompt_many(self, prompts: Sequence[F.Prompt]) -> list[list[int]]:
        """``[self.prompt(p) for p in prompts]``, batched for plain string prompts."""
        if self.chat or not all(isinstance(p, str) for p in prompts):
            return [self.prompt(p) for p in prompts]
        out = self.texts(prompts, special=True)
        if self.appends_eos:
            out = [ids[:-1] if ids and ids[-1] == self.eos else ids for ids in out]
        return out

    def response_many(
        self, prompts: Sequence[F.Prompt], prompt_ids: Sequence[list[int]], responses: Sequence[str], add_eos: bool
    ) -> list[list[int]]:
        """``[self.response(...) ...]``, batched for plain text."""
        if self.chat:
            return [self.response(p, pi, r, add_eos) for p, pi, r in zip(prompts, prompt_ids, responses)]
        if add_eos and self.eos is None:
            raise ModelError("add_eos=True but the tokenizer has no eos_token_id; set eos_token or add_eos=False")
        tail = [self.eos] if add_eos else []
        return [ids + tail for ids in self.texts(responses, special=False)]

    def response(self, prompt: F.Prompt, prompt_ids: list[int], response: str, add_eos: bool) -> list[int]:
        if self.chat:
            messages = F.prompt_to_messages(prompt) + [{"role": "assistant", "content": response}]
            full = _ids(self.tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=True))
            if full[: len(prompt_ids)] == prompt_ids:
                suffix = full[len(prompt_ids):]
                last_special = max((j for j, t in enumerate(suffix) if t in self.special), default=-1)
                if last_special >= 0:
                    return suffix[: last_special + 1] if add_eos else suffix[:last_special]
                return suffix + ([self.eos] if add_eos and self.eos is not None else [])
        ids = self.text(response, special=False)
        if add_eos:
            if self.eos is None:
                raise ModelError("add_eos=True but the tokenizer has no eos_token_id; set eos_token or add_eos=False")
            ids = ids + [self.eos]
        return ids


def encode_prompt(tokenizer: Any, prompt: F.Prompt, use_chat_template: bool = False) -> np.ndarray:
    """Token ids of a prompt, int32[P].

    With ``use_chat_template`` and a tokenizer that has a ``chat_template``:
    ``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`` (a string prompt
    becomes one user message). Otherwise the string is encoded with the tokenizer's special tokens
    (BOS when the tokenizer adds one; a trailing EOS added by a post-processor is removed).

    Raises:
      DataError: a message-list prompt without a chat template.
    """
    return np.asarray(_Encoder(tokenizer, use_chat_template).prompt(prompt), np.int32)


def encode_response(
    tokenizer: Any, prompt: F.Prompt, response: str, *, use_chat_template: bool = False, add_eos: bool = True
) -> np.ndarray:
    """Token ids of a response given its prompt, int32[R], ending with EOS / end-of-turn (see module doc)."""
    enc = _Encoder(tokenizer, use_chat_template)
    return np.asarray(enc.response(prompt, enc.prompt(prompt), response, add_eos), np.int32)


def truncate_pair(
    prompt_ids: Sequence[int],
    responses: Sequence[Sequence[int]],
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    on_overflow: OnOverflow = "truncate",
    report: TruncationReport | None = None,
    index: int = 0,
) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """Apply the truncation rules (module doc) to a prompt and its response(s).

    All responses share the prompt (preference pairs, rankings), so they get the same room
    ``max_length - len(prompt)``. Returns ``(prompt_ids, [response_ids...])`` as int32 arrays, or
    ``None`` when the row is dropped (recorded in ``report`` when given).

    Raises:
      DataError: ``on_overflow="error"`` and the row needs truncation or cannot be kept (the message
        names the row index and the lengths); bad ``max_length`` / policy.
    """
    if on_overflow not in _POLICIES:
        raise ValueError(f"on_overflow must be one of {_POLICIES}, got {on_overflow!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 0:
        raise ValueError(f"max_prompt_length must be >= 0 or None, got {max_prompt_length}")
    report = report if report is not None else TruncationReport()
    prompt = np.asarray(prompt_ids, np.int32).reshape(-1)
    resps = [np.asarray(r, np.int32).reshape(-1) for r in responses]
    n_prompt = len(prompt)
    cut_prompt = max_prompt_length is not None and n_prompt > max_prompt_length
    kept_prompt = min(n_prompt, max_prompt_length) if max_prompt_length is not None else n_prompt
    room = max_length - kept_prompt
    cut_resp = any(len(r) > room for r in resps)
    empty = any(len(r) == 0 for r in resps)

    if on_overflow == "error" and (cut_prompt or cut_resp or empty):
        longest = max((len(r) for r in resps), default=0)
        why = "has an empty response" if empty else "needs truncation"
        raise DataError(
            f"row {index} {why}: prompt {n_prompt} tokens (max_prompt_length={max_prompt_length}), "
            f"longest response {longest} tokens, max_length={max_length}; raise the limits, or use "
            "on_overflow='truncate' or 'drop'"
        )
    if on_overflow == "drop" and (cut_prompt or cut_resp):
        report.dropped.append((index, "prompt_too_long" if cut_prompt else "too_long"))
        return None
    if cut_prompt:
        prompt = prompt[n_prompt - kept_prompt:] if kept_prompt > 0 else prompt[:0]
    if room <= 0:
        report.dropped.append((index, "no_room_for_response"))
        return None
    if empty:
        report.dropped.append((index, "empty_response"))
        return None
    resps = [r[:room] for r in resps]
    report.kept += 1
    report.truncated_prompt += int(cut_prompt)
    report.truncated_response += int(cut_resp)
    return prompt, resps


def encode_pair(
    tokenizer: Any,
    prompt: F.Prompt,
    response: str,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    use_chat_template: bool = False,
    add_eos: bool = True,
    on_overflow: OnOverflow = "truncate",
    report: TruncationReport | None = None,
    index: int = 0,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Encode and truncate one (prompt, response): ``(prompt_ids int32[P], response_ids int32[R])``.

    ``P <= max_prompt_length`` (prompt cut from the left), ``P + R <= max_length`` (response cut from
    the right). Returns ``None`` when the row is dropped; pass ``report``/``index`` to record it.

    Raises:
      DataError: ``on_overflow="error"`` and the row needs truncation (names the row ``index``).
    """
    enc = _Encoder(tokenizer, use_chat_template)
    p = enc.prompt(prompt)
    r = enc.response(prompt, p, response, add_eos)
    out = truncate_pair(
        p, [r], max_length=max_length, max_prompt_length=max_prompt_length,
        on_overflow=on_overflow, report=report, index=index,
    )
    return None if out is None else (out[0], out[1][0])


def encode_text(
    tokenizer: Any,
    text: str,
    *,
    max_length: int,
    add_eos: bool = True,
    on_overflow: OnOverflow = "truncate",
    report: TruncationReport | None = None,
    index: int = 0,
) -> np.ndarray | None:
    """Encode a text for classification, int32[L] with ``L <= max_length``.

    Encoded with the tokenizer's special tokens (BOS if it adds one) plus EOS when ``add_eos``. Too
    long texts keep their beginning; the EOS is re-appended after the cut so the last token is
    always EOS (a fixed pooling token for last-token classifiers). Counted as ``truncated_response``.

    Raises:
      DataError: ``on_overflow="error"`` and the text is too long or empty.
    """
    enc = _Encoder(tokenizer, False)
    return _truncate_text(enc, enc.prompt(text), max_length, add_eos, on_overflow, report, index)


def _truncate_text(
    enc: _Encoder,
    ids: list[int],
    max_length: int,
    add_eos: bool,
    on_overflow: OnOverflow,
    report: TruncationReport | None,
    index: int,
) -> np.ndarray | None:
    if on_overflow not in _POLICIES:
        raise ValueError(f"on_overflow must be one of {_POLICIES}, got {on_overflow!r}")
    report = report if report is not None else TruncationReport()
    if add_eos:
        if enc.eos is None:
            raise ModelError("add_eos=True but the tokenizer has no eos_token_id")
        ids = ids + [enc.eos]
    if not ids:
        if on_overflow == "error":
            raise DataError(f"row {index} has an empty text")
        report.dropped.append((index, "empty_response"))
        return None
    if len(ids) > max_length:
        if on_overflow == "error":
            raise DataError(
                f"row {index} needs truncation: text {len(ids)} tokens > max_length={max_length}; raise "
                "max_length or use on_overflow='truncate' or 'drop'"
            )
        if on_overflow == "drop":
            report.dropped.append((index, "too_long"))
            return None
        ids = ids[: max_length - 1] + [enc.eos] if add_eos and max_length > 1 else ids[:max_length]
        report.truncated_response += 1
    report.kept += 1
    return np.asarray(ids, np.int32)


# ----------------------------------------------------------------------------------------------
# Dataset-level helpers
# ----------------------------------------------------------------------------------------------
def _as_examples(items: Iterable[Any], example_type: type, convert) -> list[Any]:
    items = list(items)
    if items and isinstance(items[0], Mapping):
        return convert(items)
    for i, ex in enumerate(items):
        if not isinstance(ex, example_type):
            raise DataError(f"row {i} is a {type(ex).__name__}; expected a dict row or {example_type.__name__}")
    return items


_LENGTH_REASONS = ("no_room_for_response", "prompt_too_long", "too_long")


def _finish(report: TruncationReport, name: str, *, max_length: int | None, max_prompt_length: int | None,
            on_overflow: str) -> None:
    """Log the report; raise DataError when every row was dropped and at least one for its length."""
    report.log(logger)
    if report.kept == 0 and any(r in _LENGTH_REASONS for _, r in report.dropped):
        reasons: dict[str, int] = {}
        for _, r in report.dropped:
            reasons[r] = reasons.get(r, 0) + 1
        fix = ("raise data.max_length / data.max_prompt_length" if on_overflow == "truncate" else
               "raise data.max_length / data.max_prompt_length, or set data.on_overflow='truncate' (cuts rows to fit)")
        raise DataError(f"all {report.n_dropped} {name} rows were dropped by truncation {reasons} with "
                        f"max_length={max_length}, max_prompt_length={max_prompt_length}, on_overflow={on_overflow!r}; "
                        f"{fix}")
    logger.debug("%s tokenized", name)


def tokenize_sft_dataset(
    rows: Iterable[Mapping[str, Any] | F.SFTExample],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    use_chat_template: bool = False,
    add_eos: bool = True,
    on_overflow: OnOverflow = "truncate",
    format: F.SFTFormat = "auto",
    instances: Literal["first", "all"] = "first",
) -> tuple[list[SFTTokens], TruncationReport]:
    """Rows (or :class:`~jaxrlhf.data.formats.SFTExample`) -> ``([SFTTokens], TruncationReport)``.

    Report indices are positions in the example list (equal to row indices except for self-instruct
    rows with ``instances="all"``).
    """
    examples = _as_examples(rows, F.SFTExample, lambda r: F.sft_examples(r, format=format, instances=instances))
    enc = _Encoder(tokenizer, use_chat_template)
    report = TruncationReport()
    out: list[SFTTokens] = []
    prompts = [ex.prompt for ex in examples]
    ps = enc.prompt_many(prompts)
    rs = enc.response_many(prompts, ps, [ex.response for ex in examples], add_eos)
    for i, (p, r) in enumerate(zip(ps, rs)):
        t = truncate_pair(p, [r], max_length=max_length, max_prompt_length=max_prompt_length,
                          on_overflow=on_overflow, report=report, index=i)
        if t is not None:
            out.append(SFTTokens(t[0], t[1][0]))
    _finish(report, "SFT", max_length=max_length, max_prompt_length=max_prompt_length, on_overflow=on_overflow)
    return out, report


def tokenize_preference_dataset(
    rows: Iterable[Mapping[str, Any] | F.PreferenceExample],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    use_chat_template: bool = False,
    add_eos: bool = True,
    on_overflow: OnOverflow = "truncate",
    format: F.PreferenceFormat = "auto",
    **format_kwargs: Any,
) -> tuple[list[PreferenceTokens], TruncationReport]:
    """Rows (or ``PreferenceExample``) -> ``([PreferenceTokens], TruncationReport)``.

    Chosen and rejected share the (left-truncated) prompt and each gets ``max_length - P`` tokens.
    ``format_kwargs`` go to :func:`~jaxrlhf.data.formats.preference_examples`.
    """
    examples = _as_examples(
        rows, F.PreferenceExample, lambda r: F.preference_examples(r, format=format, **format_kwargs)
    )
    enc = _Encoder(tokenizer, use_chat_template)
    report = TruncationReport()
    out: list[PreferenceTokens] = []
    prompts = [ex.prompt for ex in examples]
    ps = enc.prompt_many(prompts)
    cs = enc.response_many(prompts, ps, [ex.chosen for ex in examples], add_eos)
    rs = enc.response_many(prompts, ps, [ex.rejected for ex in examples], add_eos)
    for i, (p, c, r) in enumerate(zip(ps, cs, rs)):
        t = truncate_pair(p, [c, r], max_length=max_length, max_prompt_length=max_prompt_length,
                          on_overflow=on_overflow, report=report, index=i)
        if t is not None:
            out.append(PreferenceTokens(t[0], t[1][0], t[1][1]))
    _finish(report, "preference", max_length=max_length, max_prompt_length=max_prompt_length,
            on_overflow=on_overflow)
    return out, report


def tokenize_ranked_dataset(
    rows: Iterable[Mapping[str, Any] | F.RankedExample],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    use_chat_template: bool = False,
    add_eos: bool = True,
    on_overflow: OnOverflow = "truncate",
) -> tuple[list[RankedTokens], TruncationReport]:
    """Rows (or ``RankedExample``) -> ``([RankedTokens], TruncationReport)``."""
    examples = _as_examples(rows, F.RankedExample, F.ranked_examples)
    enc = _Encoder(tokenizer, use_chat_template)
    report = TruncationReport()
    out: list[RankedTokens] = []
    for i, ex in enumerate(examples):
        p = enc.prompt(ex.prompt)
        rs = [enc.response(ex.prompt, p, c, add_eos) for c in ex.completions]
        t = truncate_pair(p, rs, max_length=max_length, max_prompt_length=max_prompt_length,
                          on_overflow=on_overflow, report=report, index=i)
        if t is not None:
            out.append(RankedTokens(t[0], t[1], list(ex.ranks)))
    _finish(report, "ranked", max_length=max_length, max_prompt_length=max_prompt_length, on_overflow=on_overflow)
    return out, report


def tokenize_classification_dataset(
    rows: Iterable[Mapping[str, Any] | F.ClassificationExample],
    tokenizer: Any,
    *,
    max_length: int,
    add_eos: bool = True,
    on_overflow: OnOverflow = "truncate",
) -> tuple[list[ClassificationTokens], TruncationReport]:
    """Rows (or ``ClassificationExample``) -> ``([ClassificationTokens], TruncationReport)`` (see :func:`encode_text`)."""
    examples = _as_examples(rows, F.ClassificationExample, F.classification_examples)
    report = TruncationReport()
    out: list[ClassificationTokens] = []
    enc = _Encoder(tokenizer, False)
    for i, (ex, ids) in enumerate(zip(examples, enc.prompt_many([ex.text for ex in examples]))):
        ids = _truncate_text(enc, ids, max_length, add_eos, on_overflow, report, i)
        if ids is not None:
            out.append(ClassificationTokens(ids, int(ex.label)))
    _finish(report, "classification", max_length=max_length, max_prompt_length=None, on_overflow=on_overflow)
    return out, report


def tokenize_prompt_dataset(
    rows: Iterable[Mapping[str, Any] | F.PromptExample],
    tokenizer: Any,
    *,
    max_prompt_length: int,
    use_chat_template: bool = False,
    on_overflow: OnOverflow = "truncate",
) -> tuple[list[np.ndarray], TruncationReport]:
    """Rows (or ``PromptExample``) -> ``([prompt_ids int32[P]], TruncationReport)``; prompts cut from the left."""
    examples = _as_examples(rows, F.PromptExample, F.prompt_examples)
    if on_overflow not in _POLICIES:
        raise ValueError(f"on_overflow must be one of {_POLICIES}, got {on_overflow!r}")
    enc = _Encoder(tokenizer, use_chat_template)
    report = TruncationReport()
    out: list[np.ndarray] = []
    for i, p in enumerate(enc.prompt_many([ex.prompt for ex in examples])):
        if not p:
            if on_overflow == "error":
                raise DataError(f"row {i} has an empty prompt")
            report.dropped.append((i, "empty_prompt"))
            continue
        if len(p) > max_prompt_length:
            if on_overflow == "error":
                raise DataError(
                    f"row {i} needs truncation: prompt {len(p)} tokens > max_prompt_length={max_prompt_length}; "
                    "raise data.max_prompt_length, or use on_overflow='truncate' or 'drop'"
                )
            if on_overflow == "drop":
                report.dropped.append((i, "prompt_too_long"))
                continue
            p = p[len(p) - max_prompt_length:]
            report.truncated_prompt += 1
        report.kept += 1
        out.append(np.asarray(p, np.int32))
    _finish(report, "prompt", max_length=None, max_prompt_length=max_prompt_length, on_overflow=on_overflow)
    return out, report
