"""Rewards for RL from feedback, all behind one signature.

A reward is any callable ``reward(c: Completions) -> scores_B`` (float32, one score per rollout row).
:class:`Completions` carries the rollout's device arrays (tokens, masks) and decodes the texts lazily,
once, on the host, so every kind of reward sees the same object:

==========================  ========================================  ==================================
reward                      what it computes                          where it runs
==========================  ========================================  ==================================
:class:`TokenReward`        a jittable ``fn(tokens_BS, mask_BS)``     device, no host round trip
:class:`FunctionReward`     a Python ``fn(prompts, completions)``     host, on decoded text
:class:`ClassifierReward`   logit / prob of a label of an HF          host re-tokenisation with the
                            sequence classifier (BERT family)         classifier's tokenizer, then device
:class:`RewardModelReward`  a trained reward model (decoder/encoder   host re-tokenisation, then device
                            + head, normalised), or an HF decoder     (or device only: ``on_tokens``)
                            ``*ForSequenceClassification`` (TRL)
:class:`WeightedSum`        ``Σ_i w_i · reward_i``                    host if any part is host
==========================  ========================================  ==================================

Cost of host rewards: the completion tokens are fetched from the device (a sync point: the rollout
must have finished), decoded with the policy's tokenizer, and (for classifiers / reward models with
their own tokenizer) re-encoded; for B rows of N tokens this is O(B·N) Python work per iteration plus
the scoring itself (VADER: ~0.1-1 ms per text). The device stays idle meanwhile, so at large batch
sizes prefer a :class:`TokenReward` or a reward model that shares the policy's tokenizer
(``RewardModelReward(..., on_tokens=True)``), which keep the whole rollout on the device.

:func:`build_reward` turns a :class:`jaxrlhf.config.RewardSpec` into a reward; the text functions
:func:`vader_sentiment`, :func:`lexicon_sentiment` and :func:`word_count` are importable by path from a
config (``"jaxrlhf.rewards:vader_sentiment"``).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

__all__ = ["Completions", "RewardFn", "TokenReward", "FunctionReward", "ClassifierReward", "RewardModelReward",
           "WeightedSum", "build_reward", "load_function", "count_token", "vader_sentiment",
           "lexicon_sentiment", "word_count", "reward_parts"]


# ------------------------------------------------------------------------------------------- inputs

@dataclasses.dataclass
class Completions:
    """What a reward sees: one rollout of ``B`` rows.

    Attributes:
      tokens_BS: int32 prompt (left-padded) + completion, or None when built from text only.
      completion_mask_BS: float32, 1 on completion tokens (up to and including EOS).
      segment_ids_BS / positions_BS: as in an LM batch (for rewards that run a model on the tokens).
      prompt_len: P, the number of prompt slots at the start of ``tokens_BS``.
      tokenizer: the policy's tokenizer (decodes the texts; not needed by token rewards).
      prompts / completions: decoded texts (filled on first use of :meth:`texts`, or given).
    """

    tokens_BS: Any = None
    completion_mask_BS: Any = None
    segment_ids_BS: Any = None
    positions_BS: Any = None
    prompt_len: int = 0
    tokenizer: Any = None
    prompts: list[str] | None = None
    completions: list[str] | None = None

    @classmethod
    def from_sample(cls, sample, tokenizer=None) -> "Completions":
        """From a :class:`jaxrlhf.sampling.SampleOutput` (device arrays are kept; nothing is fetched)."""
        return cls(tokens_BS=sample.tokens_BS, completion_mask_BS=sample.completion_mask_BS,
                   segment_ids_BS=sample.segment_ids_BS, positions_BS=sample.positions_BS,
                   prompt_len=int(sample.tokens_BS.shape[1] - sample.completion_tokens_BN.shape[1]),
                   tokenizer=tokenizer)

    @classmethod
    def from_texts(cls, prompts: Sequence[str], completions: Sequence[str]) -> "Completions":
        """Text-only (for host rewards and tests). Raises ValueError when the lengths differ."""
        if len(prompts) != len(completions):
            raise ValueError(f"prompts ({len(prompts)}) and completions ({len(completions)}) differ in length")
        return cls(prompts=list(prompts), completions=list(completions))

    @property
    def size(self) -> int:
        if self.tokens_BS is not None:
            return int(self.tokens_BS.shape[0])
        return len(self.completions or [])

    def texts(self) -> tuple[list[str], list[str]]:
        """``(prompts, completions)`` decoded with the policy tokenizer (special tokens skipped); fetched and
        decoded once, then cached.

        Raises:
          ValueError: no texts and no tokenizer to decode with.
        """
        if self.completions is None:
            if self.tokenizer is None or self.tokens_BS is None:
                raise ValueError("Completions has neither texts nor (tokens and a tokenizer) to decode; "
                                 "build it with Completions.from_sample(sample, tokenizer)")
            toks, mask, seg = jax.device_get((self.tokens_BS, self.completion_mask_BS, self.segment_ids_BS))
            toks, mask, seg = np.asarray(toks), np.asarray(mask), np.asarray(seg)
            P = self.prompt_len
            dec = self.tokenizer.decode
            self.prompts = [dec(t[:P][s[:P] != 0].tolist(), skip_special_tokens=True) for t, s in zip(toks, seg)]
            self.completions = [dec(t[P:][m[P:] > 0].tolist(), skip_special_tokens=True) for t, m in zip(toks, mask)]
        return list(self.prompts or []), list(self.completions)

    def scored_texts(self, score_prompt: bool) -> list[str]:
        """The texts a text model scores: prompt + completion, or the completion alone."""
        prompts, completions = self.texts()
        return [p + c for p, c in zip(prompts, completions)] if score_prompt else completions


class RewardFn(Protocol):
    """``reward(c: Completions) -> float32 [B]`` (numpy for host rewards, a jax array for device ones).
    ``name`` labels its metric (``reward/<name>``); ``on_device`` says whether it avoids the host."""

    name: str
    on_device: bool

    def __call__(self, c: Completions) -> Any: ...


# ------------------------------------------------------------------------------------------- token rewards

@dataclasses.dataclass
class TokenReward:
    """A jittable reward of token arrays: ``fn(tokens_BS, completion_mask_BS) -> float32 [B]``.

    Runs on the device under ``jax.jit`` (compiled once per shape), no decoding."""

    fn: Callable[[Array, Array], Array]
    name: str = "tokens"
    on_device: bool = True

    def __post_init__(self):
        self._jit = jax.jit(self.fn)

    def __call__(self, c: Completions) -> Array:
        if c.tokens_BS is None:
            raise ValueError(f"reward {self.name!r} scores tokens; this Completions holds only text")
        return self._jit(c.tokens_BS, c.completion_mask_BS).astype(jnp.float32)


def count_token(token_id: int, normalize: bool = False) -> TokenReward:
    """Reward = how many completion tokens equal ``token_id`` (divided by the completion length when
    ``normalize``). A synthetic task with a known optimum (every token = ``token_id``)."""

    def fn(tokens_BS, mask_BS):
        hits = jnp.sum((tokens_BS == token_id) * mask_BS, axis=-1)
        return hits / jnp.maximum(jnp.sum(mask_BS, axis=-1), 1.0) if normalize else hits

    return TokenReward(fn, name=f"count_{token_id}")


# ------------------------------------------------------------------------------------------- text functions

@dataclasses.dataclass
class FunctionReward:
    """A Python function of decoded text, ``fn(prompts: list[str], completions: list[str]) -> float[B]``,
    run on the host (see the module docstring for the cost)."""

    fn: Callable[[list[str], list[str]], Sequence[float]]
    name: str = ""
    on_device: bool = False

    def __post_init__(self):
        self.name = self.name or getattr(self.fn, "__name__", "function")

    def __call__(self, c: Completions) -> np.ndarray:
        prompts, completions = c.texts()
        out = np.asarray(self.fn(prompts, completions), np.float32).reshape(-1)
        if out.shape[0] != len(completions):
            raise ValueError(f"reward function {self.name!r} returned {out.shape[0]} scores for "
                             f"{len(completions)} completions")
        return out


def load_function(path: str) -> Callable:
    """Import ``"package.module:attribute"`` (a config's reference to a reward function).

    Raises:
      ValueError: not of that form, or the attribute is missing / not callable.
    """
    if ":" not in path:
        raise ValueError(f"reward function {path!r} must be 'package.module:callable'")
    mod, attr = path.split(":", 1)
    fn = getattr(importlib.import_module(mod), attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {path!r}: {mod} has no callable {attr!r}")
    return fn


_VADER = None


def vader_sentiment(prompts: list[str], completions: list[str]) -> np.ndarray:
    """VADER compound sentiment of each completion, in ``[-1, 1]`` (Hutto & Gilbert 2014; the
    ``vaderSentiment`` package, which ships its lexicon: ``pip install vaderSentiment==3.3.2``).

    Only the completion is scored (the prompt's own sentiment would be a per-prompt constant).

    Raises:
      ImportError: the package is not installed (the message says how to install it).
    """
    global _VADER
    if _VADER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("vader_sentiment needs `pip install vaderSentiment==3.3.2` "
                              "(or use jaxrlhf.rewards:lexicon_sentiment)") from e
        _VADER = SentimentIntensityAnalyzer()
    del prompts
    return np.asarray([_VADER.polarity_scores(c)["compound"] for c in completions], np.float32)


_POSITIVE = frozenset("""good great excellent amazing wonderful best love loved loves lovely enjoy enjoyed
beautiful brilliant perfect fun funny favorite favourite fantastic superb awesome nice masterpiece
moving touching charming delightful recommend recommended beautifully impressive outstanding solid
classic entertaining hilarious memorable powerful stunning terrific gorgeous fine happy glad""".split())
_NEGATIVE = frozenset("""bad worst awful terrible boring horrible poor waste wasted hate hated stupid dull
disappointing disappointed disappointment mess annoying lame ridiculous worse weak pointless mediocre
crap garbage unfunny painful fails failed failure sadly unfortunately poorly tedious cheap predictable
sucks ugly nonsense""".split())


def lexicon_sentiment(prompts: list[str], completions: list[str]) -> np.ndarray:
    """A dependency-free sentiment rule: ``tanh((#positive - #negative words) / 2)`` per completion, with
    a small built-in movie-review lexicon; in ``(-1, 1)``. A stand-in for a trained classifier."""
    del prompts
    out = []
    for c in completions:
        words = re.findall(r"[a-z']+", c.lower())
        out.append(np.tanh((sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)) / 2.0))
    return np.asarray(out, np.float32)


def word_count(prompts: list[str], completions: list[str]) -> np.ndarray:
    """Number of whitespace-separated words of each completion (a length rule; weight it negatively to
    penalise length)."""
    del prompts
    return np.asarray([len(c.split()) for c in completions], np.float32)


# ------------------------------------------------------------------------------------------- model rewards

def _bucket(n: int, max_length: int) -> int:
    """Pad lengths to a power of two (>= 16) capped at ``max_length``: few distinct shapes to compile."""
    b = 16
    while b < n:
        b *= 2
    return min(b, max_length)


_CLASSIFIER_OUTPUTS = ("logit", "prob", "logprob", "margin")


def classifier_scores(logits_BC: Array, label: int, output: str) -> Array:
    """Score of class ``label`` from classifier logits ``[B, C]``: ``logit``, ``prob`` (softmax),
    ``logprob`` (log-softmax) or ``margin`` (its logit minus the largest other logit). float32 ``[B]``.

    Raises:
      ValueError: unknown ``output`` or ``label`` out of range.
    """
    if output not in _CLASSIFIER_OUTPUTS:
        raise ValueError(f"classifier output must be one of {_CLASSIFIER_OUTPUTS}, got {output!r}")
    C = logits_BC.shape[-1]
    if not 0 <= label < C:
        raise ValueError(f"classifier label index {label} out of range for {C} classes")
    z = logits_BC.astype(jnp.float32)
    if output == "logit":
        return z[:, label]
    if output == "prob":
        return jax.nn.softmax(z, axis=-1)[:, label]
    if output == "logprob":
        return jax.nn.log_softmax(z, axis=-1)[:, label]
    others = jnp.where(jnp.arange(C) == label, -jnp.inf, z)
    return z[:, label] - jnp.max(others, axis=-1)


def resolve_label(label: str | int, labels: Sequence[str], num_labels: int) -> int:
    """A class index from a name in ``labels`` (case-insensitive) or an integer / digit string.

    Raises:
      ValueError: unknown name or index out of range (the message lists the classes).
    """
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        names = [s.lower() for s in labels]
        if label.lower() not in names:
            raise ValueError(f"classifier label {label!r} is not one of its classes {list(labels)}; "
                             "give a class name or an index")
        return names.index(label.lower())
    idx = int(label)
    if not 0 <= idx < num_labels:
        raise ValueError(f"classifier label index {idx} out of range [0, {num_labels})")
    return idx


class ClassifierReward:
    """Score of one label of a BERT-family sequence classifier (``jaxrlhf.models.bert.Encoder``) on the
    decoded text, re-tokenised with the classifier's own tokenizer (host), run on the device.

    Args:
      model: an ``Encoder`` with a classification head (``cfg.num_labels >= 2``).
      tokenizer: the classifier's ``transformers`` tokenizer.
      label: class name (from the checkpoint's ``id2label``) or index.
      output: ``logit``, ``prob``, ``logprob`` or ``margin`` (:func:`classifier_scores`).
      max_length: tokens per text (longer texts are truncated, as ``truncation=True``).
      score_prompt: score prompt + completion (True) or the completion alone.

    Raises:
      ValueError: no classification head, or an unknown label.
    """

    on_device = False

    def __init__(self, model: nnx.Module, tokenizer: Any, *, label: str | int = "positive", output: str = "logit",
                 max_length: int = 512, score_prompt: bool = True, name: str = "classifier"):
        cfg = model.cfg
        if not getattr(cfg, "num_labels", 0):
            raise ValueError("ClassifierReward needs a sequence classifier (model.cfg.num_labels >= 2)")
        if output not in _CLASSIFIER_OUTPUTS:
            raise ValueError(f"classifier output must be one of {_CLASSIFIER_OUTPUTS}, got {output!r}")
        self.label = resolve_label(label, cfg.labels, cfg.num_labels)
        self.output, self.tokenizer, self.score_prompt, self.name = output, tokenizer, score_prompt, name
        self.max_length = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length,
                              cfg.max_position_embeddings - (cfg.pad_token_id + 1 if cfg.family == "roberta" else 0))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        graphdef, state = nnx.split(model)
        self._state = state

        @jax.jit
        def _scores(state, tokens_BT, segment_ids_BT):
            m = nnx.merge(graphdef, state)
            return classifier_scores(m(tokens_BT, segment_ids_BT=segment_ids_BT).logits_BC, self.label, self.output)

        self._scores = _scores

    @classmethod
    def from_folder(cls, path: str, **kw) -> "ClassifierReward":
        """Load a ``transformers`` classifier folder (config.json, model.safetensors, tokenizer)."""
        from transformers import AutoTokenizer

        from jaxrlhf.models.hf import load_hf_folder
        model, _ = load_hf_folder(path)
        return cls(model, AutoTokenizer.from_pretrained(path), **kw)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ``(tokens, segment_ids)`` int32 ``[B, L]`` as ``tokenizer(texts, truncation=True)``."""
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        L = _bucket(max(len(x) for x in ids), self.max_length)
        tokens = np.full((len(ids), L), self.pad_id, np.int32)
        seg = np.zeros((len(ids), L), np.int32)
        for i, x in enumerate(ids):
            tokens[i, :len(x)] = x
            seg[i, :len(x)] = 1
        return tokens, seg

    def __call__(self, c: Completions) -> np.ndarray:
        tokens, seg = self.encode(c.scored_texts(self.score_prompt))
        return np.asarray(jax.device_get(self._scores(self._state, tokens, seg)), np.float32)


class RewardModelReward:
    """A trained reward model (``jaxrlhf.models.reward_model.RewardModel``: decoder or encoder + head;
    classifiers give the log-odds of their ``score_label``), normalised with its stored statistics and
    then ``(r - mean) / std``.

    Args:
      model: the ``RewardModel``.
      tokenizer: its tokenizer (texts are re-encoded with it, with EOS for decoders as in training).
      max_length: tokens per text.
      score_prompt: score prompt + completion (True) or the completion alone.
      mean / std: extra normalisation on top of the model's own.
      on_tokens: score the rollout's own tokens on the device (no decoding). Only valid when the reward
        model shares the policy's tokenizer; completions that end without EOS are scored as they are.
    """

    def __init__(self, model: nnx.Module, tokenizer: Any = None, *, max_length: int = 512, score_prompt: bool = True,
                 mean: float = 0.0, std: float = 1.0, on_tokens: bool = False, name: str = "reward_model"):
        from jaxrlhf.models.reward_model import make_scorer

        if not std > 0:
            raise ValueError(f"reward model std must be > 0, got {std}")
        if not on_tokens and tokenizer is None:
            raise ValueError("RewardModelReward needs the reward model's tokenizer (or on_tokens=True)")
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.score_prompt, self.mean, self.std, self.name = score_prompt, mean, std, name
        self.on_device = on_tokens
        self._scorer = make_scorer(model, normalized=True)

    @classmethod
    def from_folder(cls, path: str, **kw) -> "RewardModelReward":
        """Load a reward model folder: one written by ``jaxrlhf.models.reward_model.save_reward_model``
        (``reward_model.json`` + head), or a Hugging Face decoder ``*ForSequenceClassification`` folder
        (``LlamaForSequenceClassification`` with ``num_labels=1``, e.g. a TRL reward model or
        ``export_hf_reward_model``'s output; read by ``load_hf_reward_model``, whose score is the
        ``transformers`` logit plus ``config.json``'s ``jaxrlhf_reward_offset`` when present). ``kw`` go to
        the constructor.

        Raises:
          FileNotFoundError / ValueError: from the loaders (neither kind of folder, unsupported model).
        """
        from jaxrlhf.models.reward_model import is_hf_reward_folder, load_hf_reward_model, load_reward_model
        model, tok = (load_hf_reward_model if is_hf_reward_folder(path) else load_reward_model)(path)
        return cls(model, tok, **kw)

    def __call__(self, c: Completions):
        if self.on_device:
            if not self.score_prompt:
                raise ValueError("RewardModelReward(on_tokens=True) scores prompt + completion tokens")
            r = self._scorer(c.tokens_BS, c.positions_BS, c.segment_ids_BS)
            return (r - self.mean) / self.std
        from jaxrlhf.data.batching import build_lm_batch
        from jaxrlhf.data.tokenize import encode_text, pad_id_for

        texts = c.scored_texts(self.score_prompt)
        add_eos = bool(self.model.is_decoder and getattr(self.tokenizer, "eos_token_id", None) is not None)
        pad = pad_id_for(self.tokenizer)
        ids = [encode_text(self.tokenizer, t, max_length=self.max_length, add_eos=add_eos) for t in texts]
        ids = [np.asarray([pad], np.int32) if x is None else x for x in ids]
        L = _bucket(max(len(x) for x in ids), self.max_length)
        b = build_lm_batch([((), x) for x in ids], L, pad)
        r = self._scorer(jnp.asarray(b["tokens"]), jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"]))
        return (np.asarray(jax.device_get(r), np.float32) - self.mean) / self.std


# ------------------------------------------------------------------------------------------- combination

class WeightedSum:
    """``Σ_i w_i · reward_i(c)``; on the device only when every part is.

    :meth:`parts` returns the total and each part (for the ``reward/<name>`` metrics).
    """

    def __init__(self, terms: Sequence[tuple[RewardFn, float]], name: str = "score"):
        if not terms:
            raise ValueError("WeightedSum needs at least one (reward, weight) term")
        self.terms = [(r, float(w)) for r, w in terms]
        self.name = name
        self.on_device = all(r.on_device for r, _ in self.terms)

    def parts(self, c: Completions) -> tuple[Any, dict[str, Any]]:
        parts, names = {}, set()
        total = None
        for r, w in self.terms:
            s = r(c)
            if not self.on_device:
                s = np.asarray(jax.device_get(s), np.float32)
            name = r.name
            while name in names:
                name += "_"
            names.add(name)
            parts[name] = s
            total = w * s if total is None else total + w * s
        return total, parts

    def __call__(self, c: Completions):
        return self.parts(c)[0]


def reward_parts(reward: RewardFn, c: Completions) -> tuple[Any, dict[str, Any]]:
    """``(scores_B, {name: scores_B})`` of any reward (a single reward is its own only part)."""
    if isinstance(reward, WeightedSum):
        return reward.parts(c)
    s = reward(c)
    return s, {reward.name: s}


def build_reward(spec) -> RewardFn:
    """A reward from a :class:`jaxrlhf.config.RewardSpec` (functions, classifier, reward model, weighted).

    ``spec.reward_model`` is a folder of either kind :meth:`RewardModelReward.from_folder` reads (a jaxrlhf
    reward model or a Hugging Face decoder ``*ForSequenceClassification``).

    Raises:
      ValueError: an unknown function path, classifier label, or a spec with no source.
    """
    spec.validate()
    weights = spec.function_weights or (1.0,) * len(spec.functions)
    terms: list[tuple[RewardFn, float]] = []
    for path, w in zip(spec.functions, weights):
        terms.append((FunctionReward(load_function(path), name=path.split(":")[-1]), w))
    if spec.classifier:
        terms.append((ClassifierReward.from_folder(spec.classifier, label=spec.classifier_label,
                                                   output=spec.classifier_output,
                                                   max_length=spec.classifier_max_length,
                                                   score_prompt=spec.score_prompt), spec.classifier_weight))
    if spec.reward_model:
        terms.append((RewardModelReward.from_folder(spec.reward_model, score_prompt=spec.score_prompt,
                                                    mean=spec.reward_model_mean, std=spec.reward_model_std),
                      spec.reward_model_weight))
    return WeightedSum(terms)
