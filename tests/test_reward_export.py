"""Models other tools read: reward models <-> Hugging Face ``*ForSequenceClassification``, policies of the
DPO driver as Hugging Face folders.

Every check compares with ``transformers`` PyTorch (an independent implementation) in float32:

* a jaxrlhf reward model (tiny random Llama or GPT-2 backbone; head weight, bias and normalisation all
  non-trivial) exported with :func:`export_hf_reward_model` loads in ``AutoModelForSequenceClassification``
  (no missing / unexpected tensor) and scores a right-padded batch of texts of different lengths like
  ``score_texts``, after adding ``config.json``'s ``jaxrlhf_reward_offset``;
* the exported folder read back by :func:`load_hf_reward_model` (and as an RL reward through
  ``RewardModelReward.from_folder``) gives our scores again;
* a ``LlamaForSequenceClassification(num_labels=1)`` built and saved by ``transformers`` (untied, pad id =
  EOS, so ``transformers`` skips the trailing EOS) loads here and scores like torch;
* the DPO driver's ``export_dir`` loads in ``AutoModelForCausalLM`` with the trained policy's logits.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf.models.hub import load_pretrained
from jaxrlhf.models.reward_model import (HF_OFFSET_KEY, RewardModel, export_hf_reward_model, is_hf_reward_folder,
                                         load_hf_reward_model, save_reward_model, score_texts)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = ["Hi", "The movie was great, I loved every minute of it.", "bad", "A somewhat longer review: the plot "
         "was thin but the acting carried it through to a satisfying end.", "ok then"]
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def tiny_gpt2_folder(tmp_path_factory, shared_assets):
    """A randomly initialised 2-layer GPT-2 saved by ``transformers`` with the real GPT-2 tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    for name in TOKENIZER_FILES:
        shutil.copy(shared_assets / "gpt2-tokenizer" / name, folder / name)
    cfg = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def reward_model_on(folder) -> tuple[RewardModel, object]:
    """A RewardModel on the folder's backbone with a random head, bias 0.7 and stats (mean 0.3, std 2.5)."""
    pre = load_pretrained(str(folder))
    rm = RewardModel(pre.model, rngs=nnx.Rngs(1))
    D = pre.cfg.hidden_size
    rm.head.kernel.set_value(jnp.asarray(np.random.default_rng(0).normal(0, 1.0, (D, 1)), jnp.float32))
    rm.head.bias.set_value(jnp.asarray([0.7], jnp.float32))
    rm.reward_mean.set_value(jnp.asarray(0.3, jnp.float32))
    rm.reward_std.set_value(jnp.asarray(2.5, jnp.float32))
    return rm, pre.tokenizer


def torch_scores(folder, texts) -> np.ndarray:
    """``AutoModelForSequenceClassification`` logits ``[B]`` of ``text + EOS`` (right-padded batch with the
    folder's own tokenizer), checking that every tensor was used and none was missing."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_labels == 1
    tok.padding_side = "right"
    enc = tok([t + tok.eos_token for t in texts], padding=True, return_tensors="pt")
    assert (enc["input_ids"] == model.config.pad_token_id).sum() > 0  # the batch really is padded
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert out.shape == (len(texts), 1)
    return out[:, 0].numpy()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_scores_like_transformers_and_round_trips(family, tiny_llama_folder, tiny_gpt2_folder, tmp_path):
    folder = tiny_llama_folder if family == "llama" else tiny_gpt2_folder
    rm, tok = reward_model_on(folder)
    ours = score_texts(rm, tok, TEXTS, max_length=48, batch_size=8)
    out = export_hf_reward_model(rm, tmp_path / "hf_reward", tok)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [{"llama": "LlamaForSequenceClassification",
                                        "gpt2": "GPT2ForSequenceClassification"}[family]]
    offset = config[HF_OFFSET_KEY]
    assert offset == pytest.approx((0.7 - 0.3) / 2.5)
    # GPT-2's tokenizer has only <|endoftext|> (= EOS): a padding token was added, not EOS.
    assert config["pad_token_id"] != tok.eos_token_id and tok.pad_token_id is None  # caller's tokenizer intact

    theirs = torch_scores(out, TEXTS)
    np.testing.assert_allclose(theirs + offset, ours, rtol=1e-4, atol=1e-4)
    assert np.std(ours) > 1e-3  # different texts, different scores: the comparison is not vacuous

    # Round trip: our loader on the exported folder.
    assert is_hf_reward_folder(out)
    back, back_tok = load_hf_reward_model(out)
    np.testing.assert_allclose(score_texts(back, back_tok, TEXTS, max_length=48, batch_size=8), ours,
                               rtol=1e-4, atol=1e-4)
    # ... and as an RL reward (the RewardSpec.reward_model path).
    from jaxrlhf.rewards import Completions, RewardModelReward

    reward = RewardModelReward.from_folder(str(out), max_length=48)
    got = reward(Completions.from_texts([""] * len(TEXTS), TEXTS))
    np.testing.assert_allclose(got, ours, rtol=1e-4, atol=1e-4)


def test_hf_built_llama_reward_model_loads_and_scores_like_torch(shared_assets, tmp_path):
    """``LlamaForSequenceClassification(num_labels=1)`` from ``transformers`` (untied, no LM head saved; pad id =
    EOS, so ``transformers`` pools at the last token before the trailing EOS) scores the same here."""
    folder = tmp_path / "hf_rm"
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(shared_assets / "gpt2-tokenizer" / name, folder / name)
    cfg = transformers.LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256,
                                   pad_token_id=50256, num_labels=1)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok.pad_token = tok.eos_token
    tok.save_pretrained(str(folder))

    theirs = torch_scores(folder, TEXTS)
    rm, rm_tok = load_hf_reward_model(folder)
    assert rm.pool_ignore_id == 50256 and rm.num_outputs == 1
    ours = score_texts(rm, rm_tok, TEXTS, max_length=48, batch_size=8)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert np.std(ours) > 1e-3

    # save_reward_model keeps transformers' pooling rule (pool_ignore_id) through our own format.
    save_reward_model(rm, tmp_path / "ours", rm_tok)
    from jaxrlhf.models.reward_model import load_reward_model

    again, again_tok = load_reward_model(tmp_path / "ours")
    np.testing.assert_allclose(score_texts(again, again_tok, TEXTS, max_length=48, batch_size=8), theirs,
                               rtol=1e-4, atol=1e-4)
    # Re-exported to Hugging Face it keeps pad = EOS (the same pooling) and the same scores.
    out = export_hf_reward_model(again, tmp_path / "re_export", again_tok)
    np.testing.assert_allclose(torch_scores(out, TEXTS), theirs, rtol=1e-4, atol=1e-4)


def test_export_refuses_what_hf_cannot_hold(tiny_llama_folder):
    pre = load_pretrained(str(tiny_llama_folder))
    clf = RewardModel(pre.model, num_outputs=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_outputs=2"):
        export_hf_reward_model(clf, "/nonexistent", pre.tokenizer)
    rm = RewardModel(pre.model, pooling="mean", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pooling='last'"):
        export_hf_reward_model(rm, "/nonexistent", pre.tokenizer)
    rm = RewardModel(pre.model, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="EOS id"):
        export_hf_reward_model(rm, "/nonexistent", pre.tokenizer, pad_token_id=pre.tokenizer.eos_token_id)


def test_dpo_driver_exports_a_transformers_policy(tiny_llama_folder, shared_assets, tmp_path):
    """One DPO step; ``export_dir`` loads in ``AutoModelForCausalLM`` with the trained policy's logits."""
    from jaxrlhf import config as C
    from jaxrlhf.drivers import run_experiment

    hh = str(shared_assets / "hh-rlhf-harmless-base-test" / "test.jsonl.gz")
    cfg = C.ExperimentConfig(
        name="dpo", model=C.ModelSpec(name=str(tiny_llama_folder)),
        optim=C.OptimConfig(lr=1e-2, schedule="constant"),
        data=C.DataConfig(source=hh, split="test", max_length=32, max_prompt_length=16, eval_size=0, limit=8,
                          batch_size=8, use_chat_template=False),
        train=C.TrainConfig(steps=1, save_every=1, num_samples=0, run_dir=str(tmp_path / "runs")),
        algo=C.DPOConfig(loss="dpo", beta=0.1))
    summary = run_experiment(cfg)
    export = summary["export_dir"]
    assert export == str(tmp_path / "runs" / "dpo" / "hf")

    pre = load_pretrained(str(tiny_llama_folder))
    graphdef, initial = nnx.split(pre.model)
    params = jax.device_get(summary["state"].params)
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(initial)))
    assert moved > 1e-4  # the exported policy is the trained one, not the initial
    tokens = np.random.default_rng(0).integers(0, 50257, (2, 12)).astype(np.int32)
    ours = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens)).logits_BTV)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
