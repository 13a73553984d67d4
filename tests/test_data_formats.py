"""jaxrlhf.data.formats (+ sources on the real files): rows -> canonical examples.

References are independent re-derivations: the raw files are re-read with ``gzip``/``json`` and the
expected strings are rebuilt with plain ``str`` operations.
"""
import dataclasses
import gzip
import json
import re

import pytest

from jaxrlhf.data import formats as F
from jaxrlhf.data.sources import load_rows

HH = "hh-rlhf-harmless-base-test/test.jsonl.gz"


def _read_jsonl(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------
# HH-RLHF (real file)
# ----------------------------------------------------------------------------------------------
def test_hh_rlhf_real_split_reconstructs_exactly(shared_assets):
    raw = _read_jsonl(shared_assets / HH)
    rows = load_rows(shared_assets / HH, split="test")
    assert len(rows) == len(raw) == 2312

    exact = F.preference_examples(rows, strip_leading_space=False)
    stripped = F.preference_examples(rows)  # default: one leading space removed
    assert len(exact) == len(stripped) == 2312
    for r, e, s in zip(raw, exact, stripped):
        assert isinstance(e, F.PreferenceExample)
        assert e.prompt.endswith("\n\nAssistant:") and e.prompt.startswith("\n\nHuman:")
        # exact string reconstruction
        assert e.prompt + e.chosen == r["chosen"]
        assert e.prompt + e.rejected == r["rejected"]
        # stripped form: exactly one separating space was removed
        assert s.prompt == e.prompt
        assert s.prompt + " " + s.chosen == r["chosen"]
        assert s.prompt + " " + s.rejected == r["rejected"]


def test_hh_rlhf_prefix_mismatch_is_reported(shared_assets):
    raw = _read_jsonl(shared_assets / HH)
    # independent: rows whose text up to the last "\n\nAssistant:" differs
    a = "\n\nAssistant:"
    expected_bad = [
        i for i, r in enumerate(raw)
        if r["chosen"][: r["chosen"].rfind(a) + len(a)] != r["rejected"][: r["rejected"].rfind(a) + len(a)]
    ]
    assert len(expected_bad) > 0
    flags = [F.preference_example(r, i)[1] for i, r in enumerate(raw)]
    assert [i for i, ok in enumerate(flags) if not ok] == expected_bad
    with pytest.raises(ValueError, match=rf"row {expected_bad[0]}"):
        F.preference_examples(raw, on_mismatch="error")
    assert len(F.preference_examples(raw, on_mismatch="drop")) == 2312 - len(expected_bad)


def test_hh_to_messages():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
    assert F.hh_to_messages(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    ex, _ = F.preference_example(
        {"chosen": text + " Sure.", "rejected": text + " No."}, hh_prompt_as_messages=True
    )
    assert ex.prompt[-1] == {"role": "user", "content": "Tell me a joke."}
    assert (ex.chosen, ex.rejected) == ("Sure.", "No.")


# ----------------------------------------------------------------------------------------------
# Self-instruct seed tasks / IMDB (real files)
# ----------------------------------------------------------------------------------------------
def test_self_instruct_seed_tasks(shared_assets):
    path = shared_assets / "alpaca-seed-tasks/seed_tasks.jsonl"
    raw = _read_jsonl(path)
    examples = F.sft_examples(load_rows(path))
    assert len(examples) == len(raw) >= 175
    for r, ex in zip(raw, examples):
        inst = r["instances"][0]
        want = r["instruction"] + ("\n\n" + inst["input"].strip() if inst["input"].strip() else "")
        assert ex.prompt == want
        assert ex.response == inst["output"]
    n_instances = sum(len(r["instances"]) for r in raw)
    assert len(F.sft_examples(raw, instances="all")) == n_instances


def test_imdb_classification_and_prefixes(shared_assets):
    path = shared_assets / "imdb-reviews-subset/test.jsonl.gz"
    raw = _read_jsonl(path)
    rows = load_rows(path, split="test")
    cls = F.classification_examples(rows)
    assert len(cls) == len(raw) == 2500
    assert [c.label for c in cls] == [r["label"] for r in raw]
    assert [c.text for c in cls] == [r["text"] for r in raw]
    assert sorted(set(c.label for c in cls)) == [0, 1]

    for n in (2, 8):
        prompts = F.imdb_prompt_examples(raw[:300], n_words=n)
        for r, p in zip(raw[:300], prompts):
            words = p.prompt.split(" ")
            assert 1 <= len(words) <= n
            assert "<br" not in p.prompt
            ref = re.sub(r"<br\s*/?>", " ", r["text"]).split()[:n]
            assert words == ref
    varied = F.imdb_prompt_examples(raw[:200], n_words=8, min_words=2, seed=3)
    lens = [len(p.prompt.split()) for p in varied]
    assert min(lens) >= 2 and max(lens) <= 8 and len(set(lens)) > 1
    assert varied == F.imdb_prompt_examples(raw[:200], n_words=8, min_words=2, seed=3)


# ----------------------------------------------------------------------------------------------
# Converters and errors (constructed rows)
# ----------------------------------------------------------------------------------------------
def test_sft_formats_autodetect():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye"},
    ]
    rows = [
        {"prompt": "p1", "response": "r1"},
        {"prompt": "p2", "completion": "c2"},
        {"instruction": "Do X", "input": "", "output": "o3"},
        {"instruction": "Do Y", "input": "with Z", "output": "o4"},
        {"messages": msgs},
    ]
    ex = F.sft_examples(rows)
    assert ex[0] == F.SFTExample("p1", "r1")
    assert ex[1] == F.SFTExample("p2", "c2")
    assert ex[2] == F.SFTExample("Do X", "o3")
    assert ex[3] == F.SFTExample("Do Y\n\nwith Z", "o4")
    assert ex[4].prompt == msgs[:4] and ex[4].response == "Bye"
    # datasets fills fields missing from a row with None: detection ignores them
    mixed = {"prompt": "p", "response": "r", "messages": None, "instruction": None, "instances": None}
    assert F.sft_examples([mixed]) == [F.SFTExample("p", "r")]
    with pytest.raises(ValueError, match=r"row 0 has none of"):
        F.sft_examples([{"text": "x"}])
    # explicit format
    assert F.sft_examples([{"prompt": "a", "completion": "b"}], format="prompt_completion")[0].response == "b"


@pytest.mark.parametrize(
    "fn,rows,field,idx",
    [
        (F.preference_examples, [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 17 + [{"prompt": "p", "rejected": "b"}], "chosen", 17),
        (F.preference_examples, [{"prompt": "p", "chosen": "a"}], "rejected", 0),
        (F.sft_examples, [{"prompt": "p", "response": "r"}, {"prompt": "p"}], "response", 1),
        (F.sft_examples, [{"instruction": "i", "input": ""}], "output", 0),
        (F.ranked_examples, [{"prompt": "p", "completions": ["a"]}], "ranking", 0),
        (F.classification_examples, [{"text": "t", "label": 1}, {"label": 0}], "text", 1),
        (F.prompt_examples, [{"text": "t"}], "prompt", 0),
    ],
)
def test_missing_field_names_field_and_row(fn, rows, field, idx):
    with pytest.raises(ValueError) as e:
        fn(rows)
    msg = str(e.value)
    assert f"'{field}'" in msg and f"row {idx}" in msg and "need" in msg


def test_missing_chosen_message_lists_formats():
    with pytest.raises(ValueError, match=r"row 0 has no 'chosen'; preference rows need \{prompt, chosen, rejected\} or HH-RLHF"):
        F.preference_examples([{"rejected": "x"}])


def test_preference_message_lists_and_ranked():
    u = {"role": "user", "content": "Q"}
    row = {
        "chosen": [u, {"role": "assistant", "content": "good"}],
        "rejected": [u, {"role": "assistant", "content": "bad"}],
    }
    ex = F.preference_examples([row])[0]
    assert ex == F.PreferenceExample([u], "good", "bad")
    row2 = {"prompt": [u], "chosen": [{"role": "assistant", "content": "g"}], "rejected": [{"role": "assistant", "content": "b"}]}
    assert F.preference_examples([row2])[0] == F.PreferenceExample([u], "g", "b")

    r = F.ranked_examples([{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [1, 0, 1]}])[0]
    assert r == F.RankedExample("p", ["a", "b", "c"], [1, 0, 1])
    assert F.ranked_examples([{"prompt": "p", "completions": ["a", "b", "c"], "scores": [0.5, 2.0, 0.5]}])[0].ranks == [1, 0, 1]
    with pytest.raises(ValueError, match="'ranking' has 2 entries"):
        F.ranked_examples([{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1]}])

    with pytest.raises(ValueError, match="'label'"):
        F.classification_examples([{"text": "t", "label": "pos"}])


def test_examples_are_frozen():
    ex = F.SFTExample("p", "r")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.prompt = "q"
    assert ex.prompt == "p"
