"""Rows (dicts from any source) -> canonical, frozen example dataclasses.

Canonical examples:

* :class:`SFTExample` ``(prompt, response)``
* :class:`PreferenceExample` ``(prompt, chosen, rejected)``
* :class:`RankedExample` ``(prompt, completions, ranks)``  (rank 0 = best, ties share a rank)
* :class:`ClassificationExample` ``(text, label)``
* :class:`PromptExample` ``(prompt)``  (rollouts)

A prompt is either a plain string or a list of ``{"role", "content"}`` messages. Responses are strings.

Each ``*_examples(rows, format="auto")`` function detects the row format from the keys present (or
takes an explicit ``format=``) and raises :class:`~jaxrlhf.errors.DataError` (a ``ValueError``) naming
the missing or empty field, the row index and the accepted formats when a row does not fit. The row index
counts the rows given (for a run: the training or held-out rows after ``data.eval_size``/``data.limit``).
"""
from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Union

from jaxrlhf.errors import DataError

__all__ = [
    "Message",
    "Prompt",
    "SFTExample",
    "PreferenceExample",
    "RankedExample",
    "ClassificationExample",
    "PromptExample",
    "sft_example",
    "sft_examples",
    "preference_example",
    "preference_examples",
    "ranked_example",
    "ranked_examples",
    "ranks_from_scores",
    "classification_example",
    "classification_examples",
    "prompt_example",
    "prompt_examples",
    "imdb_prefix",
    "imdb_prompt_examples",
    "split_hh_pair",
    "HHSplit",
    "hh_to_messages",
    "prompt_to_messages",
    "HH_ASSISTANT",
    "HH_HUMAN",
]

logger = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}
Prompt = Union[str, list[Message]]

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


# ----------------------------------------------------------------------------------------------
# Canonical examples
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SFTExample:
    """A prompt and the target response (loss only on the response)."""

    prompt: Prompt
    response: str


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response."""

    prompt: Prompt
    chosen: str
    rejected: str


@dataclasses.dataclass(frozen=True)
class RankedExample:
    """A prompt with ``N`` completions and their ranks (0 = best; equal ranks = tie)."""

    prompt: Prompt
    completions: list[str]
    ranks: list[int]


@dataclasses.dataclass(frozen=True)
class ClassificationExample:
    """A text and an integer class label (e.g. IMDB sentiment, 1 = positive)."""

    text: str
    label: int


@dataclasses.dataclass(frozen=True)
class PromptExample:
    """A prompt for rollouts (PPO / online methods)."""

    prompt: Prompt


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _missing(kind: str, index: int, field: str, accepted: str, extra: str = "") -> DataError:
    return DataError(f"row {index} has no {field!r}; {kind} rows need {accepted}{extra}")


def _require(row: Mapping[str, Any], field: str, index: int, kind: str, accepted: str) -> Any:
    if field not in row or row[field] is None:
        raise _missing(kind, index, field, accepted, f" (row keys: {sorted(row)})")
    return row[field]


def _check_messages(messages: Any, index: int, field: str) -> list[Message]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"row {index}: {field!r} must be a non-empty list of {{'role', 'content'}} messages")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(
                f"row {index}: {field}[{j}] must be a dict with 'role' and 'content', got {m!r:.80}"
            )
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    return out


def _check_prompt(prompt: Any, index: int, field: str = "prompt") -> Prompt:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        return _check_messages(prompt, index, field)
    raise DataError(f"row {index}: {field!r} must be a string or a list of messages, got {type(prompt).__name__}")


def _check_str(value: Any, index: int, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"row {index}: {field!r} must be a string, got {type(value).__name__}")
    return value


def _not_empty(value: Any, index: int, field: str, row: Mapping[str, Any]) -> Any:
    """``value`` unless it is an empty (or blank) string: then a DataError naming the row and the field."""
    if isinstance(value, str) and not value.strip():
        preview = {k: (v[:40] if isinstance(v, str) else v) for k, v in row.items()}
        raise DataError(f"row {index}: {field!r} is empty; fill it in or remove the row (row: {str(preview)[:160]})")
    return value


def _split_last_assistant(messages: list[Message], index: int, field: str) -> tuple[list[Message], str]:
    """(messages before the last assistant turn, its content)."""
    for j in range(len(messages) - 1, -1, -1):
        if messages[j]["role"] == "assistant":
            return messages[:j], messages[j]["content"]
    raise DataError(f"row {index}: {field!r} has no message with role 'assistant' to use as the response")


def prompt_to_messages(prompt: Prompt) -> list[Message]:
    """A string prompt becomes one user message; a message list is returned as a copy."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def hh_to_messages(text: str) -> list[Message]:
    """Convert an HH-RLHF style dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages.

    Turns are split at ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"`` markers; contents are stripped of
    surrounding whitespace. A trailing empty assistant turn (a prompt ending with
    ``"\\n\\nAssistant:"``) is dropped, so the result of converting an HH prompt ends with the user
    turn, ready for ``add_generation_prompt=True``.

    Raises:
      DataError: the text does not start with a ``"\\n\\nHuman:"`` or ``"\\n\\nAssistant:"`` marker.
    """
    markers = {HH_HUMAN: "user", HH_ASSISTANT: "assistant"}
    pos = 0
    if not text.startswith((HH_HUMAN, HH_ASSISTANT)):
        stripped = text.lstrip("\n")
        if stripped.startswith(("Human:", "Assistant:")):
            text = "\n\n" + stripped
        else:
            raise DataError(f"HH dialogue must start with {HH_HUMAN!r}, got {text[:40]!r}")
    messages: list[Message] = []
    while pos < len(text):
        marker = HH_HUMAN if text.startswith(HH_HUMAN, pos) else HH_ASSISTANT
        start = pos + len(marker)
        nxt = [i for i in (text.find(HH_HUMAN, start), text.find(HH_ASSISTANT, start)) if i != -1]
        end = min(nxt) if nxt else len(text)
        messages.append({"role": markers[marker], "content": text[start:end].strip()})
        pos = end
    if messages and messages[-1]["role"] == "assistant" and messages[-1]["content"] == "":
        messages.pop()
    return messages


@dataclasses.dataclass(frozen=True)
class HHSplit:
    """Result of :func:`split_hh_pair`.

    ``prompt + sep_chosen + chosen == original chosen`` and likewise for ``rejected``, where ``sep_*``
    is the single leading space that was stripped (``""`` when nothing was stripped).
    ``exact`` is False when the two dialogues differed before their last ``"\\n\\nAssistant:"`` and the
    split fell back to the last ``"\\n\\nAssistant:"`` of their common prefix.
    """

    prompt: str
    chosen: str
    rejected: str
    sep_chosen: str
    sep_rejected: str
    exact: bool


def split_hh_pair(
    chosen: str,
    rejected: str,
    *,
    strip_leading_space: bool = True,
    on_mismatch: Literal["fallback", "error"] = "fallback",
    index: int = 0,
) -> HHSplit:
    """Split two full HH-RLHF dialogues into (shared prompt, chosen reply, rejected reply).

    Both texts are split at their LAST ``"\\n\\nAssistant:"``; the prompt is the shared dialogue up to
    and including that marker, and each reply is the rest with ONE leading space removed (when
    ``strip_leading_space``), so ``prompt + " " + reply`` reconstructs the original exactly.

    When the two prefixes differ (5 of the 2312 harmless-base test pairs: the chosen reply itself
    contains extra "Human:/Assistant:" turns), ``on_mismatch="fallback"`` splits both at the last
    ``"\\n\\nAssistant:"`` inside their longest common prefix (reported via ``exact=False``), and
    ``"error"`` raises.

    Raises:
      DataError: a text has no ``"\\n\\nAssistant:"``; or the prefixes differ with ``on_mismatch="error"``
        or have no common ``"\\n\\nAssistant:"``.
    """
    ic, ir = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if ic < 0 or ir < 0:
        field = "chosen" if ic < 0 else "rejected"
        raise DataError(
            f"row {index}: {field!r} has no {HH_ASSISTANT!r} turn; HH-RLHF rows need full dialogues "
            "'\\n\\nHuman: ...\\n\\nAssistant: ...' (or use {prompt, chosen, rejected})"
        )
    cut_c, cut_r = ic + len(HH_ASSISTANT), ir + len(HH_ASSISTANT)
    exact = chosen[:cut_c] == rejected[:cut_r]
    if not exact:
        if on_mismatch == "error":
            raise DataError(
                f"row {index}: chosen and rejected differ before their last {HH_ASSISTANT!r}; "
                "the pair has no shared prompt (use on_mismatch='fallback' to split at the common prefix)"
            )
        common = os.path.commonprefix([chosen, rejected])
        k = common.rfind(HH_ASSISTANT)
        if k < 0:
            raise DataError(f"row {index}: chosen and rejected share no {HH_ASSISTANT!r} turn")
        cut_c = cut_r = k + len(HH_ASSISTANT)
    prompt = chosen[:cut_c]
    rest_c, rest_r = chosen[cut_c:], rejected[cut_r:]
    sep_c = sep_r = ""
    if strip_leading_space:
        if rest_c.startswith(" "):
            sep_c, rest_c = " ", rest_c[1:]
        if rest_r.startswith(" "):
            sep_r, rest_r = " ", rest_r[1:]
    return HHSplit(prompt, rest_c, rest_r, sep_c, sep_r, exact)


def _as_rows(rows: Iterable[Mapping[str, Any]]) -> Iterable[tuple[int, Mapping[str, Any]]]:
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"row {i} must be a dict of fields, got {type(row).__name__}")
        yield i, row


# ----------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------
SFTFormat = Literal["auto", "prompt_response", "prompt_completion", "alpaca", "self_instruct", "messages"]
_SFT_ACCEPTED = (
    "{prompt, response}, {prompt, completion}, {instruction, input, output} (Alpaca), "
    "{instruction, instances: [{input, output}]} (self-instruct) or {messages: [...]}"
)


def _has(row: Mapping[str, Any], key: str) -> bool:
    """Key present with a value (datasets fills fields absent from a row with None)."""
    return row.get(key) is not None


def _detect_sft(row: Mapping[str, Any]) -> str:
    if _has(row, "messages"):
        return "messages"
    if _has(row, "instances"):
        return "self_instruct"
    if _has(row, "instruction"):
        return "alpaca"
    if _has(row, "prompt"):
        return "prompt_completion" if _has(row, "completion") and not _has(row, "response") else "prompt_response"
    return ""


def _alpaca_prompt(instruction: str, inp: str) -> str:
    inp = (inp or "").strip()
    return f"{instruction}\n\n{inp}" if inp else instruction


def sft_example(
    row: Mapping[str, Any],
    index: int = 0,
    *,
    format: SFTFormat = "auto",
    instances: Literal["first", "all"] = "first",
) -> list[SFTExample]:
    """One row -> SFT example(s) (a list: self-instruct rows give one per instance with ``instances="all"``).

    Formats: ``prompt_response`` ``{prompt, response}``; ``prompt_completion`` ``{prompt, completion}``;
    ``alpaca`` ``{instruction, input?, output}`` (prompt = instruction, plus ``"\\n\\n" + input`` when
    the input is non-empty); ``self_instruct`` ``{instruction, instances: [{input, output}]}``;
    ``messages`` ``{messages: [...]}`` (the last assistant turn is the response, the messages before
    it the prompt; later messages are ignored).

    Raises:
      DataError: a required field is missing (the message names the field, the row and the formats).
    """
    fmt = _detect_sft(row) if format == "auto" else format
    kind = "SFT"
    if fmt == "":
        raise DataError(
            f"row {index} has none of 'prompt', 'instruction' or 'messages'; {kind} rows need "
            f"{_SFT_ACCEPTED} (row keys: {sorted(row)})"
        )
    if fmt == "prompt_response":
        prompt = _check_prompt(_require(row, "prompt", index, kind, _SFT_ACCEPTED), index)
        return [SFTExample(prompt, _check_str(_require(row, "response", index, kind, _SFT_ACCEPTED), index, "response"))]
    if fmt == "prompt_completion":
        prompt = _check_prompt(_require(row, "prompt", index, kind, _SFT_ACCEPTED), index)
        completion = _require(row, "completion", index, kind, _SFT_ACCEPTED)
        if isinstance(completion, (list, tuple)):  # conversational completion: [{"role": "assistant", ...}]
            _, completion = _split_last_assistant(_check_messages(completion, index, "completion"), index, "completion")
        return [SFTExample(prompt, _check_str(completion, index, "completion"))]
    if fmt == "alpaca":
        instruction = _check_str(_require(row, "instruction", index, kind, _SFT_ACCEPTED), index, "instruction")
        output = _check_str(_require(row, "output", index, kind, _SFT_ACCEPTED), index, "output")
        return [SFTExample(_alpaca_prompt(instruction, row.get("input") or ""), output)]
    if fmt == "self_instruct":
        instruction = _check_str(_require(row, "instruction", index, kind, _SFT_ACCEPTED), index, "instruction")
        inst = _require(row, "instances", index, kind, _SFT_ACCEPTED)
        if not isinstance(inst, (list, tuple)) or not inst:
            raise DataError(f"row {index}: 'instances' must be a non-empty list of {{input, output}}")
        chosen = inst if instances == "all" else inst[:1]
        out = []
        for j, item in enumerate(chosen):
            if not isinstance(item, Mapping) or "output" not in item:
                raise DataError(f"row {index} has no 'output' in instances[{j}]; {kind} rows need {_SFT_ACCEPTED}")
            out.append(SFTExample(_alpaca_prompt(instruction, item.get("input") or ""), str(item["output"])))
        return out
    if fmt == "messages":
        msgs = _check_messages(_require(row, "messages", index, kind, _SFT_ACCEPTED), index, "messages")
        prompt, response = _split_last_assistant(msgs, index, "messages")
        if not prompt:
            raise DataError(f"row {index}: 'messages' has no turn before the last assistant turn to use as prompt")
        return [SFTExample(prompt, response)]
    raise DataError(f"unknown SFT format {format!r}; use 'auto' or one of {SFTFormat.__args__[1:]}")


def sft_examples(
    rows: Iterable[Mapping[str, Any]],
    *,
    format: SFTFormat = "auto",
    instances: Literal["first", "all"] = "first",
) -> list[SFTExample]:
    """Rows -> SFT examples (see :func:`sft_example`). Raises ``DataError`` on the first bad row."""
    out: list[SFTExample] = []
    for i, row in _as_rows(rows):
        out.extend(sft_example(row, i, format=format, instances=instances))
    return out


# ----------------------------------------------------------------------------------------------
# Preferences
# ----------------------------------------------------------------------------------------------
PreferenceFormat = Literal["auto", "prompt_chosen_rejected", "hh", "messages"]
_PREF_ACCEPTED = (
    "{prompt, chosen, rejected} or HH-RLHF dialogues {chosen, rejected} "
    "or chat message lists {chosen: [...], rejected: [...]}"
)


def _response_text(value: Any, index: int, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        _, content = _split_last_assistant(_check_messages(value, index, field), index, field)
        return content
    raise DataError(f"row {index}: {field!r} must be a string or a list of messages, got {type(value).__name__}")


def preference_example(
    row: Mapping[str, Any],
    index: int = 0,
    *,
    format: PreferenceFormat = "auto",
    strip_leading_space: bool = True,
    on_mismatch: Literal["fallback", "error"] = "fallback",
    hh_prompt_as_messages: bool = False,
) -> tuple[PreferenceExample, bool]:
    """One row -> ``(PreferenceExample, exact)``; ``exact`` is False only for HH pairs split by fallback.

    Formats:
      * ``prompt_chosen_rejected``: ``{prompt, chosen, rejected}``; chosen/rejected may be strings or
        message lists (the last assistant turn is taken).
      * ``hh``: ``{chosen, rejected}`` full HH-RLHF dialogues, split by :func:`split_hh_pair`. The prompt
        stays raw text ending with ``"\\n\\nAssistant:"`` unless ``hh_prompt_as_messages``
        (then :func:`hh_to_messages`).
      * ``messages``: ``{chosen: [...], rejected: [...]}`` full conversations; the prompt is the messages
        before each one's last assistant turn and must be identical in both.

    Raises:
      DataError: a required field is missing (message names the field, row and formats), or the
        shared prompt of an HH / messages pair cannot be found.
    """
    kind = "preference"
    if format == "auto":
        if _has(row, "prompt"):
            fmt = "prompt_chosen_rejected"
        elif isinstance(row.get("chosen"), (list, tuple)):
            fmt = "messages"
        else:
            fmt = "hh"
    else:
        fmt = format
    if fmt == "prompt_chosen_rejected":
        prompt = _not_empty(_check_prompt(_require(row, "prompt", index, kind, _PREF_ACCEPTED), index), index,
                            "prompt", row)
        chosen = _response_text(_require(row, "chosen", index, kind, _PREF_ACCEPTED), index, "chosen")
        rejected = _response_text(_require(row, "rejected", index, kind, _PREF_ACCEPTED), index, "rejected")
        _not_empty(chosen, index, "chosen", row)
        _not_empty(rejected, index, "rejected", row)
        return PreferenceExample(prompt, chosen, rejected), True
    if fmt == "hh":
        chosen = _check_str(_require(row, "chosen", index, kind, _PREF_ACCEPTED), index, "chosen")
        rejected = _check_str(_require(row, "rejected", index, kind, _PREF_ACCEPTED), index, "rejected")
        s = split_hh_pair(
            chosen, rejected, strip_leading_space=strip_leading_space, on_mismatch=on_mismatch, index=index
        )
        prompt: Prompt = hh_to_messages(s.prompt) if hh_prompt_as_messages else s.prompt
        return PreferenceExample(prompt, s.chosen, s.rejected), s.exact
    if fmt == "messages":
        c = _check_messages(_require(row, "chosen", index, kind, _PREF_ACCEPTED), index, "chosen")
        r = _check_messages(_require(row, "rejected", index, kind, _PREF_ACCEPTED), index, "rejected")
        pc, chosen = _split_last_assistant(c, index, "chosen")
        pr, rejected = _split_last_assistant(r, index, "rejected")
        if pc != pr:
            raise DataError(
                f"row {index}: 'chosen' and 'rejected' conversations differ before their last assistant turn; "
                "give an explicit 'prompt' field"
            )
        if not pc:
            raise DataError(f"row {index}: 'chosen' has no turns before the assistant reply to use as prompt")
        return PreferenceExample(pc, chosen, rejected), True
    raise DataError(f"unknown preference format {format!r}; use 'auto' or one of {PreferenceFormat.__args__[1:]}")


def preference_examples(
    rows: Iterable[Mapping[str, Any]],
    *,
    format: PreferenceFormat = "auto",
    strip_leading_space: bool = True,
    on_mismatch: Literal["fallback", "error", "drop"] = "fallback",
    hh_prompt_as_messages: bool = False,
) -> list[PreferenceExample]:
    """Rows -> preference examples (see :func:`preference_example`).

    HH pairs whose prefixes differ are split at the common prefix (``"fallback"``, logged as a warning
    with their row indices), raise (``"error"``) or are left out (``"drop"``, also logged).
    """
    out: list[PreferenceExample] = []
    inexact: list[int] = []
    for i, row in _as_rows(rows):
        ex, exact = preference_example(
            row,
            i,
            format=format,
            strip_leading_space=strip_leading_space,
            on_mismatch="error" if on_mismatch == "error" else "fallback",
            hh_prompt_as_messages=hh_prompt_as_messages,
        )
        if not exact:
            inexact.append(i)
            if on_mismatch == "drop":
                continue
        out.append(ex)
    if inexact:
        what = "dropped" if on_mismatch == "drop" else "split at their longest common prefix"
        logger.warning(
            "%d HH pairs differ before their last Assistant turn and were %s: rows %s",
            len(inexact), what, inexact[:50],
        )
    return out


# ----------------------------------------------------------------------------------------------
# Rankings
# ----------------------------------------------------------------------------------------------
_RANKED_ACCEPTED = "{prompt, completions, ranking} (ranking[i] = rank of completions[i], 0 = best) or {prompt, completions, scores}"


def ranks_from_scores(scores: Sequence[float]) -> list[int]:
    """Dense ranks from scores (higher score = better): best -> 0, equal scores share a rank."""
    distinct = sorted(set(float(s) for s in scores), reverse=True)
    pos = {s: r for r, s in enumerate(distinct)}
    return [pos[float(s)] for s in scores]


def ranked_example(row: Mapping[str, Any], index: int = 0) -> RankedExample:
    """``{prompt, completions, ranking}`` (or ``scores``, higher = better) -> :class:`RankedExample`.

    Raises:
      DataError: missing field; ``ranking`` not the same length as ``completions``; negative or
        non-integer ranks.
    """
    kind = "ranked"
    prompt = _check_prompt(_require(row, "prompt", index, kind, _RANKED_ACCEPTED), index)
    comps = _require(row, "completions", index, kind, _RANKED_ACCEPTED)
    if not isinstance(comps, (list, tuple)) or not comps:
        raise DataError(f"row {index}: 'completions' must be a non-empty list of strings")
    completions = [_response_text(c, index, f"completions[{j}]") for j, c in enumerate(comps)]
    if "ranking" in row and row["ranking"] is not None:
        raw = list(row["ranking"])
        field = "ranking"
    elif "ranks" in row and row["ranks"] is not None:
        raw = list(row["ranks"])
        field = "ranks"
    elif "scores" in row and row["scores"] is not None:
        raw = ranks_from_scores(row["scores"])
        field = "scores"
    else:
        raise _missing(kind, index, "ranking", _RANKED_ACCEPTED)
    if len(raw) != len(completions):
        raise DataError(
            f"row {index}: {field!r} has {len(raw)} entries but 'completions' has {len(completions)}"
        )
    ranks = []
    for r in raw:
        if isinstance(r, bool) or int(r) != r or r < 0:
            raise DataError(f"row {index}: {field!r} must hold non-negative integer ranks (0 = best), got {raw}")
        ranks.append(int(r))
    return RankedExample(prompt, completions, ranks)


def ranked_examples(rows: Iterable[Mapping[str, Any]]) -> list[RankedExample]:
    """Rows -> ranked examples (see :func:`ranked_example`)."""
    return [ranked_example(row, i) for i, row in _as_rows(rows)]


# ----------------------------------------------------------------------------------------------
# Classification, prompts
# ----------------------------------------------------------------------------------------------
_CLS_ACCEPTED = "{text, label} (label an integer class id)"


def classification_example(
    row: Mapping[str, Any], index: int = 0, *, text_field: str = "text", label_field: str = "label"
) -> ClassificationExample:
    """``{text, label}`` -> :class:`ClassificationExample`.

    Raises:
      DataError: missing field or a non-integer label.
    """
    kind = "classification"
    text = _check_str(_require(row, text_field, index, kind, _CLS_ACCEPTED), index, text_field)
    label = _require(row, label_field, index, kind, _CLS_ACCEPTED)
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        raise DataError(f"row {index}: {label_field!r} must be an integer class id, got {label!r}")
    return ClassificationExample(text, int(label))


def classification_examples(
    rows: Iterable[Mapping[str, Any]], *, text_field: str = "text", label_field: str = "label"
) -> list[ClassificationExample]:
    """Rows -> classification examples (see :func:`classification_example`)."""
    return [
        classification_example(row, i, text_field=text_field, label_field=label_field) for i, row in _as_rows(rows)
    ]


def prompt_example(row: Mapping[str, Any], index: int = 0, *, field: str = "prompt") -> PromptExample:
    """``{prompt}`` (string or messages) -> :class:`PromptExample`; also accepts ``{messages}``.

    Raises:
      DataError: the field is missing.
    """
    if not _has(row, field) and _has(row, "messages"):
        return PromptExample(_check_messages(row["messages"], index, "messages"))
    return PromptExample(_check_prompt(_require(row, field, index, "prompt", f"{{{field}}} or {{messages}}"), index, field))


def prompt_examples(rows: Iterable[Mapping[str, Any]], *, field: str = "prompt") -> list[PromptExample]:
    """Rows -> prompt examples (see :func:`prompt_example`)."""
    return [prompt_example(row, i, field=field) for i, row in _as_rows(rows)]


def imdb_prefix(text: str, n_words: int = 8) -> str:
    """First ``n_words`` whitespace-separated words of a review, with ``<br />`` tags removed.

    Used as the query for sentiment-steering PPO (the policy continues the review). Words are
    re-joined with single spaces.

    Raises:
      DataError: ``n_words < 1``.
    """
    if n_words < 1:
        raise DataError(f"n_words must be >= 1, got {n_words}")
    cleaned = text.replace("<br />", " ").replace("<br/>", " ").replace("<br>", " ")
    return " ".join(cleaned.split()[:n_words])


def imdb_prompt_examples(
    rows: Iterable[Mapping[str, Any]],
    *,
    n_words: int = 8,
    min_words: int | None = None,
    seed: int = 0,
    text_field: str = "text",
) -> list[PromptExample]:
    """IMDB rows ``{text, ...}`` -> prompt examples of the first words of each review.

    With ``min_words`` set, each prefix length is drawn uniformly from ``[min_words, n_words]`` with a
    ``random.Random(seed)`` (deterministic); otherwise every prefix has ``n_words`` words (or fewer when
    the review is shorter).

    Raises:
      DataError: a row has no ``text_field``.
    """
    rng = random.Random(seed)
    out = []
    for i, row in _as_rows(rows):
        text = _check_str(_require(row, text_field, i, "IMDB prompt", f"{{{text_field}}}"), i, text_field)
        n = n_words if min_words is None else rng.randint(min_words, n_words)
        out.append(PromptExample(imdb_prefix(text, n)))
    return out
