"""Rewards behind one signature: text functions, token rewards, weighted sums, config-built rewards, and a
classifier's label probability/logit vs ``transformers``' PyTorch classifier on the same texts."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf import config as C
from jaxrlhf import rewards as R

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = ("the movie was good great bad awful boring fun plot actors film i loved hated it and not a very "
         "story ending music scenes").split()
TEXTS = [("the movie was", " great and fun"), ("i", " hated it , awful plot"),
         ("the ending", " was not very good"), ("a film", " boring boring boring"),
         ("music and scenes", ""), ("it was a great great film and i loved the story and the actors", " !")]


def test_function_rewards_and_errors():
    prompts, comps = zip(*TEXTS)
    c = R.Completions.from_texts(prompts, comps)
    lex = R.FunctionReward(R.lexicon_sentiment)
    s = lex(c)
    assert s.dtype == np.float32 and s.shape == (len(TEXTS),)
    np.testing.assert_allclose(s[:4], np.tanh(np.array([2, -2, 1, -3]) / 2.0), rtol=1e-6)
    assert s[4] == 0.0
    np.testing.assert_array_equal(R.FunctionReward(R.word_count)(c), [3, 5, 4, 3, 0, 1])
    # By import path, as a config names it.
    assert R.load_function("jaxrlhf.rewards:word_count") is R.word_count
    with pytest.raises(ValueError, match="package.module:callable"):
        R.load_function("word_count")
    with pytest.raises(ValueError, match="returned 1 scores"):
        R.FunctionReward(lambda p, c: [1.0])(c)


def test_vader_sentiment():
    pytest.importorskip("vaderSentiment")
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    c = R.Completions.from_texts(["x", "y"], ["What a wonderful, moving film!", "Dull and terrible."])
    s = R.FunctionReward(R.vader_sentiment)(c)
    ref = [SentimentIntensityAnalyzer().polarity_scores(t)["compound"] for t in c.completions]
    np.testing.assert_allclose(s, ref, rtol=1e-6)
    assert s[0] > 0.5 and s[1] < -0.5


def test_token_reward_and_weighted_sum():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, (5, 9)).astype(np.int32)
    mask = np.zeros((5, 9), np.float32)
    for i, n in enumerate([0, 1, 4, 5, 3]):
        mask[i, 4:4 + n] = 1
    c = R.Completions(tokens_BS=jnp.asarray(tokens), completion_mask_BS=jnp.asarray(mask), prompt_len=4)
    count = R.count_token(2)
    got = count(c)
    assert isinstance(got, jax.Array) and count.on_device
    np.testing.assert_allclose(got, ((tokens == 2) * mask).sum(-1))
    frac = R.count_token(2, normalize=True)(c)
    np.testing.assert_allclose(frac, ((tokens == 2) * mask).sum(-1) / np.maximum(mask.sum(-1), 1), rtol=1e-6)
    both = R.WeightedSum([(count, 2.0), (R.count_token(3), -0.5)])
    assert both.on_device
    total, parts = both.parts(c)
    np.testing.assert_allclose(total, 2 * ((tokens == 2) * mask).sum(-1) - 0.5 * ((tokens == 3) * mask).sum(-1))
    assert set(parts) == {"count_2", "count_3"}


def test_reward_from_spec_combines_weighted_functions():
    spec = C.RewardSpec(functions=("jaxrlhf.rewards:lexicon_sentiment", "jaxrlhf.rewards:word_count"),
                        function_weights=(1.0, -0.1))
    reward = R.build_reward(spec)
    prompts, comps = zip(*TEXTS)
    c = R.Completions.from_texts(prompts, comps)
    total, parts = R.reward_parts(reward, c)
    assert not reward.on_device and set(parts) == {"lexicon_sentiment", "word_count"}
    np.testing.assert_allclose(total, R.lexicon_sentiment(prompts, comps) - 0.1 * R.word_count(prompts, comps),
                               rtol=1e-6)
    with pytest.raises(C.ConfigError, match="function_weights"):
        R.build_reward(C.RewardSpec(functions=("jaxrlhf.rewards:word_count",), function_weights=(1.0, 2.0)))


# --------------------------------------------------------------------------- classifiers vs transformers

def _bert_tokenizer(folder):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "!"] + WORDS
    tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert tok("the movie")["input_ids"] == [2, vocab.index("the"), vocab.index("movie"), 3]  # a real vocabulary
    return tok, len(vocab)


def _perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def distilbert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sentiment_distilbert")
    tok, n = _bert_tokenizer(folder)
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=n, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                        max_position_embeddings=64, num_labels=2, pad_token_id=0,
                                        id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                        label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model = _perturb(transformers.DistilBertForSequenceClassification(cfg))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder, model, tok


def _torch_logits(model, tok, texts, max_length=512):
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.double().numpy()


@pytest.mark.parametrize("output", ["prob", "logit", "logprob", "margin"])
def test_classifier_reward_matches_transformers(distilbert_folder, output):
    folder, model, tok = distilbert_folder
    reward = R.ClassifierReward.from_folder(str(folder), label="positive", output=output)
    assert reward.label == 1
    prompts, comps = zip(*TEXTS)
    got = reward(R.Completions.from_texts(prompts, comps))
    logits = _torch_logits(model, tok, [p + c for p, c in TEXTS])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = {"prob": np.exp(logp[:, 1]), "logit": logits[:, 1], "logprob": logp[:, 1],
            "margin": logits[:, 1] - logits[:, 0]}[output]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_classifier_scores_completion_only_and_truncates(distilbert_folder):
    folder, model, tok = distilbert_folder
    long = " ".join(["great film"] * 60)
    reward = R.ClassifierReward.from_folder(str(folder), label="POSITIVE", output="prob", score_prompt=False,
                                            max_length=16)
    c = R.Completions.from_texts(["the movie was", "x"], [" bad", long])
    logits = _torch_logits(model, tok, [" bad", long], max_length=16)
    np.testing.assert_allclose(reward(c), np.exp(logits[:, 1]) / np.exp(logits).sum(-1), atol=2e-5)
    with pytest.raises(ValueError, match="not one of its classes"):
        R.ClassifierReward.from_folder(str(folder), label="neutral")


def test_roberta_classifier_reward_matches_transformers(tmp_path, shared_assets):
    """A RoBERTa classifier with the real GPT-2 byte-level BPE vocabulary (RoBERTa's tokenizer)."""
    src = shared_assets / "gpt2-tokenizer"
    tok = transformers.RobertaTokenizerFast(vocab_file=str(src / "vocab.json"), merges_file=str(src / "merges.txt"))
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=80, type_vocab_size=1,
                                     num_labels=2, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                     id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = _perturb(transformers.RobertaForSequenceClassification(cfg))
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    reward = R.ClassifierReward.from_folder(str(tmp_path), label="positive", output="prob")
    assert reward.max_length == 80 - 2  # positions start after the padding index
    texts = ["What a wonderful film, I loved it.", "Terrible. Boring plot and awful acting, a waste of time!", "ok"]
    got = reward(R.Completions.from_texts([""] * 3, texts))
    logits = _torch_logits(model, tok, texts)
    np.testing.assert_allclose(got, np.exp(logits[:, 1]) / np.exp(logits).sum(-1), atol=2e-5)


def test_completions_decode_with_the_policy_tokenizer(distilbert_folder):
    """``Completions.from_sample``-style arrays decode prompt and completion separately (pads skipped)."""
    _, _, tok = distilbert_folder
    ids = {w: tok.convert_tokens_to_ids(w) for w in WORDS}
    pad = tok.pad_token_id
    tokens = np.array([[pad, ids["the"], ids["movie"], ids["was"], ids["great"], pad],
                       [ids["i"], ids["loved"], ids["it"], ids["fun"], ids["fun"], ids["fun"]]], np.int32)
    seg = np.array([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    mask = np.array([[0, 0, 0, 0, 1, 0], [0, 0, 0, 1, 1, 1]], np.float32)
    c = R.Completions(tokens_BS=tokens, completion_mask_BS=mask, segment_ids_BS=seg, prompt_len=4, tokenizer=tok)
    prompts, comps = c.texts()
    assert prompts == ["the movie was", "i loved it fun"] and comps == ["great", "fun fun"]
    assert R.FunctionReward(R.word_count)(c).tolist() == [1.0, 2.0]


def test_reward_model_reward_on_tokens():
    """A (randomly initialised) decoder reward model scored on the rollout's own tokens, normalised."""
    from jaxrlhf.models.config import ModelConfig
    from jaxrlhf.models.llama import Llama
    from jaxrlhf.models.reward_model import RewardModel

    cfg = ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, max_position_embeddings=16)
    rm = RewardModel(Llama(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (3, 6)), jnp.int32)
    seg = jnp.asarray([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    pos = jnp.maximum(jnp.cumsum(seg, 1) - 1, 0) * seg
    c = R.Completions(tokens_BS=tokens, segment_ids_BS=seg, positions_BS=pos, completion_mask_BS=seg)
    reward = R.RewardModelReward(rm, on_tokens=True, mean=0.5, std=2.0)
    assert reward.on_device
    want = (np.asarray(nnx.jit(lambda m, t, p, s: m.score(t, p, s))(rm, tokens, pos, seg)) - 0.5) / 2.0
    np.testing.assert_allclose(np.asarray(reward(c)), want, rtol=1e-5, atol=1e-6)


def test_reward_model_reward_from_folder_matches_score_texts(tmp_path, shared_assets):
    """The text path (re-tokenise with the reward model's tokenizer, EOS appended, bucketed padding) gives the
    reward-model module's own ``score_texts`` on the same texts, after a save/load round trip."""
    from transformers import AutoTokenizer

    from jaxrlhf.models.config import ModelConfig
    from jaxrlhf.models.llama import Llama
    from jaxrlhf.models.reward_model import RewardModel, load_reward_model, save_reward_model, score_texts

    tok = AutoTokenizer.from_pretrained(str(shared_assets / "gpt2-tokenizer"))
    cfg = ModelConfig(family="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, max_position_embeddings=64, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    save_reward_model(RewardModel(Llama(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1)), tmp_path / "rm", tok)
    reward = R.RewardModelReward.from_folder(str(tmp_path / "rm"), max_length=64, mean=1.0, std=0.5)
    prompts, comps = zip(*TEXTS)
    got = reward(R.Completions.from_texts(prompts, comps))
    rm, rm_tok = load_reward_model(tmp_path / "rm")
    want = (score_texts(rm, rm_tok, [p + c for p, c in TEXTS], max_length=64) - 1.0) / 0.5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
