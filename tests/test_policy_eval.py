"""The study's one evaluation (jaxrlhf.policy_eval) against independent recomputations.

On the tiny Llama: the sequence KL of a policy against itself is 0; against another policy it equals
Σ_t log π(y_t) − log π_ref(y_t) recomputed in float64 numpy from both models' full forward passes on the
same sampled tokens; judge means, the win rate against stored reference scores and distinct-n equal hand
computations on the decoded samples; padding prompts of the last batch are not counted.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrlhf import config as C
from jaxrlhf.evaluate import distinct_n
from jaxrlhf.models.hub import load_pretrained
from jaxrlhf.policy_eval import build_policy_evaluator
from jaxrlhf.rewards import word_count

PROMPTS = ["The film was", "I watched this movie", "Acting:", "What a", "Never again will I"]
REF_GOLD = [1.0, 30.0, 2.5, 4.0, 100.0]


@pytest.fixture(scope="module")
def setup(tiny_llama_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "reference_gold": g}) + "\n" for p, g in zip(PROMPTS, REF_GOLD)))
    pre = load_pretrained(str(tiny_llama_folder))
    graphdef, params = nnx.split(pre.model)
    spec = C.PolicyEvalSpec(prompts=str(path), judges=(("gold", C.RewardSpec(functions=("jaxrlhf.rewards:word_count",))),),
                            batch_size=4, max_new_tokens=6, max_prompt_length=8, seed=3)
    ev = build_policy_evaluator(spec, graphdef=graphdef, ref_params=params, tokenizer=pre.tokenizer,
                                model_cfg=pre.cfg)
    other = jax.tree.map(lambda x: x * 1.3, params)  # another policy with the same architecture
    return ev, graphdef, params, other, pre.tokenizer


def numpy_seq_logps(graphdef, params, out, n):
    """Σ log p(completion token) per row from a float64 log-softmax of a plain forward pass."""
    model = nnx.merge(graphdef, params)
    logits = np.asarray(model(out.tokens_BS, out.positions_BS, out.segment_ids_BS).logits_BTV, np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    toks, mask = np.asarray(out.tokens_BS), np.asarray(out.completion_mask_BS)
    return np.array([sum(logp[b, t - 1, toks[b, t]] for t in range(1, toks.shape[1]) if mask[b, t] > 0)
                     for b in range(n)])


def test_kl_of_the_reference_itself_is_zero(setup):
    ev, _, params, _, _ = setup
    metrics, _ = ev(params)
    assert abs(metrics["kl"]) < 1e-4


def test_metrics_equal_independent_recomputation(setup):
    ev, graphdef, params, other, tok = setup
    metrics, samples = ev(other)
    outs = ev.sample_all(other, jax.random.key(3))  # the evaluator's key (seed 3)
    pol, ref, texts, token_lists = [], [], [], []
    for i, out in enumerate(outs):
        n = min(4, len(PROMPTS) - 4 * i)
        pol.append(numpy_seq_logps(graphdef, other, out, n))
        ref.append(numpy_seq_logps(graphdef, params, out, n))
        ct, m = np.asarray(out.completion_tokens_BN), np.asarray(out.completion_mask_BN)
        token_lists += [row[mm > 0].tolist() for row, mm in zip(ct[:n], m[:n])]
        texts += [tok.decode(row[mm > 0].tolist(), skip_special_tokens=True) for row, mm in zip(ct[:n], m[:n])]
    kl = np.concatenate(pol) - np.concatenate(ref)
    assert len(kl) == len(PROMPTS)  # the padding repeat in the last batch is not counted
    np.testing.assert_allclose(metrics["kl"], kl.mean(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(metrics["kl_sem"], kl.std(ddof=1) / np.sqrt(len(kl)), rtol=1e-3, atol=1e-4)
    gold = word_count(PROMPTS, texts)
    assert metrics["gold"] == pytest.approx(float(np.mean(gold)))
    assert metrics["gold_sem"] == pytest.approx(float(np.std(gold, ddof=1) / np.sqrt(len(gold))))
    wins = [1.0 if g > r else 0.5 if g == r else 0.0 for g, r in zip(gold, REF_GOLD)]
    assert metrics["win_rate"] == pytest.approx(np.mean(wins))
    assert metrics["distinct_1"] == pytest.approx(distinct_n(token_lists, 1))
    assert metrics["length"] == pytest.approx(np.mean([len(t) for t in token_lists]))
    assert [s["completion"] for s in samples] == texts[:len(samples)]
