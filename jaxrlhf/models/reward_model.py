"""Reward models: a backbone (Llama-family decoder or BERT-family encoder) plus a head.

``RewardModel(backbone, num_outputs=1)`` reads one pooled hidden state per sequence and maps it to a
scalar reward (:class:`~jaxrlhf.models.heads.ScalarHead`, Ziegler et al. 2019; Ouyang et al. 2022) or,
with ``num_outputs = C > 1``, to ``C`` class logits (a sentiment classifier used as a reward). Pooling:

* ``last``  -- the hidden state at the last real token (``segment_ids != 0``); the default for
  decoders, where only the last position has seen the whole sequence. Invariant to padding on either side.
* ``mean``  -- the mean over real tokens (sentence-transformers pooling; the default for encoders).
* ``first`` -- the first real token (BERT's ``[CLS]``).

The *reward* of a sequence (:meth:`RewardModel.raw_reward`) is the scalar head's value, or for a
classifier the log-odds of class ``score_label``: ``log p(c) - log(1 - p(c))`` (for two classes the logit
difference). :meth:`RewardModel.score` standardises it with the normalisation statistics stored in the
model (``reward_mean``, ``reward_std``: :class:`RewardStat` variables, not trained; set by the
normalisation pass of ``jaxrlhf.algos.reward`` so scores have mean 0 and std 1 on a reference set).

Inputs take any leading dims (``[B, T]``, preference pairs ``[B, 2, T]``, rankings ``[B, N, T]``); they are
flattened to rows for the backbone and the outputs reshaped back (a local reshape: the rows of one
example stay together, so a batch sharded on its leading axis keeps them on one device).

The backbone is called like every model, ``backbone(tokens_BT, positions_BT, segment_ids_BT)``, whatever
its family (encoders turn the batch positions into their own position ids).

Saving: :func:`save_reward_model` writes a Hugging Face folder of the backbone (``config.json`` +
``model.safetensors`` + tokenizer, loadable by ``transformers`` as the plain backbone) plus
``reward_head.safetensors`` and ``reward_model.json`` (pooling, head size, labels, normalisation
statistics). :func:`load_reward_model` reads it back; :func:`make_scorer` / :func:`score_texts` turn it
into a jitted reward function (e.g. for PPO).

Hugging Face reward models (other tools): :func:`export_hf_reward_model` writes a scalar decoder reward
model as a ``transformers`` ``*ForSequenceClassification`` folder with ``num_labels = 1``
(``LlamaForSequenceClassification``, ``Qwen2...``, ``GPT2...``) that
``AutoModelForSequenceClassification.from_pretrained`` and TRL load; :func:`load_hf_reward_model` reads such
a folder (ours or one trained elsewhere) back as a :class:`RewardModel`. ``transformers``' ``score`` layer
has no bias, so the normalised reward ``(h.w + b - mean) / std`` is exported as ``h.(w / std)`` and the
constant ``(b - mean) / std`` is stored in ``config.json`` as :data:`HF_OFFSET_KEY`
(``jaxrlhf_reward_offset``): ``transformers`` logit + offset = our score. Rankings, pairwise
(Bradley-Terry) probabilities and group-relative advantages (GRPO/RLOO) do not depend on the offset;
:func:`load_hf_reward_model` adds it back as the head's bias.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.heads import ScalarHead, gather_last, last_token_index
from jaxrlhf.models.hf import (is_decoder_sequence_classifier, load_hf_sequence_classifier, save_hf_folder,
                               save_hf_sequence_classifier)
from jaxrlhf.models.hub import load_pretrained
from jaxrlhf.models.tensors import read_safetensors, write_safetensors

__all__ = [
    "RewardModel", "POOLINGS", "save_reward_model", "load_reward_model", "make_scorer", "score_texts",
    "split_reward_model", "with_stats", "stats_of", "log_odds",
    "export_hf_reward_model", "load_hf_reward_model", "is_hf_reward_folder", "HF_OFFSET_KEY", "HF_PAD_TOKEN",
]

Array = jax.Array

FORMAT_VERSION = 1
POOLINGS = ("last", "mean", "first")
HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"
HF_OFFSET_KEY = "jaxrlhf_reward_offset"
"""``config.json`` field of an exported Hugging Face reward model: the constant to add to the
``transformers`` logit to get jaxrlhf's normalised score (absent = 0)."""
HF_PAD_TOKEN = "<|jaxrlhf_pad|>"
"""The padding token added to a tokenizer whose only candidates for padding are EOS ids
(:func:`export_hf_reward_model`)."""


class RewardStat(nnx.Variable):
    """A non-trained statistic stored with the model (reward normalisation mean / std)."""


class LinearHead(nnx.Module):
    """Linear ``D -> C``: ``logits = pooled . kernel + bias`` (float32 matmul).

    ``kernel`` ``[D, C]`` (logical axes ``("embed", "classes")``) is drawn from ``normal(0, 1/sqrt(D + 1))``
    like :class:`ScalarHead`; the bias starts at 0.
    """

    def __init__(self, hidden_size: int, num_outputs: int, *, rngs: nnx.Rngs, param_dtype: str = "float32"):
        if hidden_size < 1 or num_outputs < 2:
            raise ValueError(f"LinearHead needs hidden_size >= 1 and num_outputs >= 2, got {hidden_size}, {num_outputs}")
        init = nnx.initializers.normal(1.0 / math.sqrt(hidden_size + 1))
        self.kernel = nnx.Param(init(rngs.params(), (hidden_size, num_outputs), jnp.dtype(param_dtype)),
                                logical_axes=("embed", "classes"))
        self.bias = nnx.Param(jnp.zeros((num_outputs,), jnp.dtype(param_dtype)), logical_axes=("classes",))

    def __call__(self, x_BD: Array) -> Array:
        return (jnp.einsum("...d,dc->...c", x_BD.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
                + self.bias[...].astype(jnp.float32))


def resolve_pooling(pooling: str, is_decoder: bool) -> str:
    """``auto`` -> ``last`` for decoders, ``mean`` for encoders; other names pass through.

    Raises:
      ValueError: an unknown pooling name.
    """
    if pooling == "auto":
        return "last" if is_decoder else "mean"
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be auto, {', '.join(POOLINGS)}; got {pooling!r}")
    return pooling


def pool_hidden(hidden_BTD: Array, segment_ids_BT: Array, pooling: str) -> Array:
    """One hidden state per row, float32 ``[B, D]``: ``last`` / ``first`` real token or ``mean`` over real
    tokens (``segment_ids != 0``). Rows with no real token give the slot-0 state (``last``/``first``) or 0."""
    if pooling == "last":
        return gather_last(hidden_BTD, last_token_index(segment_ids_BT)).astype(jnp.float32)
    valid = segment_ids_BT != 0
    if pooling == "first":
        T = segment_ids_BT.shape[-1]
        first = jnp.min(jnp.where(valid, jnp.arange(T), T), axis=-1)
        return gather_last(hidden_BTD, jnp.where(first == T, 0, first).astype(jnp.int32)).astype(jnp.float32)
    if pooling == "mean":
        m = valid.astype(jnp.float32)[..., None]
        return jnp.sum(hidden_BTD.astype(jnp.float32) * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1.0)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class RewardModel(nnx.Module):
    """Backbone + reward (or classification) head.

    Args:
      backbone: a decoder (``Llama``/``GPT2``) or an encoder (``jaxrlhf.models.bert.Encoder``), both called
        as ``backbone(tokens_BT, positions_BT, segment_ids_BT).hidden_BTD``; its ``cfg`` must have
        ``hidden_size``.
      num_outputs: 1 (scalar reward, :class:`ScalarHead`) or ``C >= 2`` class logits (:class:`LinearHead`).
      pooling: ``auto``, ``last``, ``mean`` or ``first`` (see the module docstring).
      score_label: the class whose log-odds is the reward (``num_outputs >= 2`` only).
      labels: optional class names (``num_outputs`` of them).
      pool_ignore_id: a token id that pooling treats as padding even inside a segment (``None``: off).
        Set for models read from ``transformers`` (:func:`load_hf_reward_model`), which pool at the
        rightmost token that is not ``config.pad_token_id`` (a trailing EOS equal to the pad id is skipped).
      rngs: initialises the head.

    Call: ``model(tokens, positions, segment_ids) -> float32 [...]`` rewards (1 output) or ``[..., C]``
    logits, for int32 inputs of shape ``[..., T]``.

    Raises:
      ValueError: bad ``num_outputs`` / ``score_label`` / ``pooling`` / ``labels``.
    """

    def __init__(self, backbone: nnx.Module, *, num_outputs: int = 1, pooling: str = "auto", score_label: int = 1,
                 labels: Sequence[str] = (), pool_ignore_id: int | None = None, rngs: nnx.Rngs):
        cfg = backbone.cfg
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        if num_outputs > 1 and not 0 <= score_label < num_outputs:
            raise ValueError(f"score_label must be in [0, {num_outputs}), got {score_label}")
        if labels and len(labels) != num_outputs:
            raise ValueError(f"labels has {len(labels)} names for num_outputs={num_outputs}")
        self.backbone = backbone
        self.is_decoder = bool(cfg.is_decoder)
        self.pooling = resolve_pooling(pooling, self.is_decoder)
        self.num_outputs = int(num_outputs)
        self.score_label = int(score_label) if num_outputs > 1 else 0
        self.labels = tuple(labels)
        self.pool_ignore_id = None if pool_ignore_id is None else int(pool_ignore_id)
        D = cfg.hidden_size
        self.head = ScalarHead(D, rngs=rngs) if num_outputs == 1 else LinearHead(D, num_outputs, rngs=rngs)
        self.reward_mean = RewardStat(jnp.zeros((), jnp.float32))
        self.reward_std = RewardStat(jnp.ones((), jnp.float32))

    # -- forward ---------------------------------------------------------------------------------
    def features(self, tokens: Array, positions: Array | None, segment_ids: Array) -> Array:
        """Pooled hidden states ``float32 [..., D]`` for inputs ``[..., T]``."""
        lead, T = tokens.shape[:-1], tokens.shape[-1]
        tok = tokens.reshape(-1, T)
        seg = segment_ids.reshape(-1, T)
        pos = None if positions is None else positions.reshape(-1, T)
        hidden = self.backbone(tok, pos, seg).hidden_BTD  # decoders and encoders take the same call
        if self.pool_ignore_id is not None:  # transformers' pooling: skip tokens equal to the pad id
            seg = jnp.where(tok == self.pool_ignore_id, 0, seg)
        pooled = pool_hidden(hidden, seg, self.pooling)
        return pooled.reshape(lead + pooled.shape[-1:])

    def __call__(self, tokens: Array, positions: Array | None, segment_ids: Array) -> Array:
        return self.head(self.features(tokens, positions, segment_ids))

    def reward_from_outputs(self, out: Array) -> Array:
        """Raw reward from :meth:`__call__` outputs: the scalar, or the log-odds of ``score_label``."""
        if self.num_outputs == 1:
            return out.astype(jnp.float32)
        return log_odds(out, self.score_label)

    def raw_reward(self, tokens: Array, positions: Array | None, segment_ids: Array) -> Array:
        """Unnormalised reward ``float32 [...]``."""
        return self.reward_from_outputs(self(tokens, positions, segment_ids))

    def score(self, tokens: Array, positions: Array | None, segment_ids: Array) -> Array:
        """Normalised reward ``(raw - reward_mean) / reward_std``, float32 ``[...]``."""
        raw = self.raw_reward(tokens, positions, segment_ids)
        return (raw - self.reward_mean[...]) / self.reward_std[...]


def log_odds(logits_BC: Array, label: int) -> Array:
    """``log p(label) - log(1 - p(label))`` under ``softmax(logits)``, float32 ``[B]``; for two classes this
    is ``logits[:, label] - logits[:, 1 - label]``."""
    z = logits_BC.astype(jnp.float32)
    others = jnp.concatenate([z[..., :label], z[..., label + 1:]], axis=-1)
    return z[..., label] - jax.nn.logsumexp(others, axis=-1)


def split_reward_model(model: RewardModel) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, params, stats)``: trainable ``nnx.Param`` leaves and everything else (the
    :class:`RewardStat` normalisation statistics); ``nnx.merge(graphdef, params, stats)`` rebuilds it."""
    return nnx.split(model, nnx.Param, ...)


def with_stats(stats: nnx.State, mean: float, std: float) -> nnx.State:
    """A copy of ``stats`` with ``reward_mean``/``reward_std`` set (std must be > 0)."""
    if not std > 0 or not math.isfinite(std) or not math.isfinite(mean):
        raise ValueError(f"reward normalisation needs a finite mean and std > 0, got mean={mean}, std={std}")
    out = jax.tree.map(lambda x: x, stats)
    out["reward_mean"].set_value(jnp.asarray(mean, jnp.float32))
    out["reward_std"].set_value(jnp.asarray(std, jnp.float32))
    return out


def stats_of(stats: nnx.State) -> tuple[float, float]:
    """``(mean, std)`` floats stored in a stats state."""
    return float(jax.device_get(stats["reward_mean"][...])), float(jax.device_get(stats["reward_std"][...]))


# ------------------------------------------------------------------------------------------ save / load

def save_reward_model(model: RewardModel, path: str | pathlib.Path, tokenizer: Any = None) -> pathlib.Path:
    """Write ``model`` to folder ``path``.

    Layout: the backbone as a Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer; via
    :func:`jaxrlhf.models.hf.save_hf_folder`), the head in ``reward_head.safetensors`` (``kernel [D, C]``,
    ``bias [C]``, float32) and ``reward_model.json``: ``{format_version, num_outputs, pooling, score_label,
    labels, reward_mean, reward_std[, pool_ignore_id]}``. Returns the folder.
    """
    path = pathlib.Path(path)
    save_hf_folder(model.backbone, model.backbone.cfg, path, tokenizer)
    kernel = np.asarray(jax.device_get(model.head.kernel[...]), np.float32)
    bias = np.asarray(jax.device_get(model.head.bias[...]), np.float32)
    write_safetensors({"kernel": kernel, "bias": bias}, path / HEAD_FILE, {"format": "jaxrlhf"})
    mean, std = stats_of(nnx.state(model, RewardStat))
    meta = {"format_version": FORMAT_VERSION, "num_outputs": model.num_outputs, "pooling": model.pooling,
            "score_label": model.score_label, "labels": list(model.labels), "reward_mean": mean, "reward_std": std}
    if model.pool_ignore_id is not None:
        meta["pool_ignore_id"] = model.pool_ignore_id
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_reward_model(path: str | pathlib.Path, *, dtype: str = "float32") -> tuple[RewardModel, Any]:
    """Load a folder written by :func:`save_reward_model`: ``(RewardModel, tokenizer or None)``.

    This is the entry point for using a trained reward model or classifier elsewhere (e.g. as the PPO
    reward): ``rm, tok = load_reward_model(folder); rewards = score_texts(rm, tok, texts)``.

    Raises:
      FileNotFoundError: no ``reward_model.json`` / head file in ``path``.
      ValueError: an unknown format version or a head that does not match the backbone width.
    """
    path = pathlib.Path(path)
    for f in (META_FILE, HEAD_FILE):
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path} has no {f}; is it a folder written by save_reward_model?")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}/{META_FILE} has format_version {meta.get('format_version')}, "
                         f"this jaxrlhf reads {FORMAT_VERSION}")
    pre = load_pretrained(path, dtype=dtype)
    rm = RewardModel(pre.model, num_outputs=meta["num_outputs"], pooling=meta["pooling"],
                     score_label=meta["score_label"], labels=tuple(meta.get("labels") or ()),
                     pool_ignore_id=meta.get("pool_ignore_id"), rngs=nnx.Rngs(0))
    head = read_safetensors(path / HEAD_FILE)
    for name in ("kernel", "bias"):
        var = getattr(rm.head, name)
        value = np.asarray(head[name], np.float32)
        if value.shape != var[...].shape:
            raise ValueError(f"{path}/{HEAD_FILE}: {name} has shape {value.shape}, the model expects {var[...].shape}")
        var.set_value(jnp.asarray(value))
    rm.reward_mean.set_value(jnp.asarray(meta["reward_mean"], jnp.float32))
    rm.reward_std.set_value(jnp.asarray(meta["reward_std"], jnp.float32))
    return rm, pre.tokenizer


# ------------------------------------------------------------------------ Hugging Face reward models

def _hf_padding(model: RewardModel, tokenizer: Any, pad_token_id: int | None) -> tuple[int, Any, int]:
    """``(pad id, tokenizer to save, vocab size)`` for :func:`export_hf_reward_model` (see its docstring)."""
    from jaxrlhf.data.tokenize import eos_ids_for

    cfg = model.backbone.cfg
    V = cfg.vocab_size
    eos = set(eos_ids_for(tokenizer, cfg))
    if pad_token_id is not None:
        pad = int(pad_token_id)
        if pad in eos and pad != model.pool_ignore_id:
            raise ValueError(f"pad_token_id={pad} is an EOS id: transformers would skip the trailing EOS this "
                             "model reads its reward at; leave pad_token_id=None to pick a safe one")
    elif model.pool_ignore_id is not None:
        pad = model.pool_ignore_id  # the model already pools like transformers with this id
    else:
        cands = ((getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "unk_token_id", None))
                 if tokenizer is not None else (cfg.pad_token_id,))
        pad = next((int(c) for c in cands if c is not None and int(c) not in eos and 0 <= int(c) < V), None)
    if tokenizer is None:
        if pad is None:
            raise ValueError("export_hf_reward_model: the model config has no pad_token_id distinct from EOS; "
                             "pass the tokenizer (a padding token is then added) or pad_token_id")
        return pad, None, V
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "right"  # transformers numbers positions from the first slot: right padding matches ours
    if pad is None:
        tok.add_special_tokens({"pad_token": HF_PAD_TOKEN})
        pad = int(tok.pad_token_id)
    elif tok.pad_token_id != pad:
        name = tok.convert_ids_to_tokens(pad)
        if name is None:
            raise ValueError(f"pad_token_id={pad} is not a token of the tokenizer ({len(tok)} tokens)")
        tok.pad_token = name
    return pad, tok, max(V, pad + 1)


def export_hf_reward_model(model: RewardModel, path: str | pathlib.Path, tokenizer: Any = None, *,
                           pad_token_id: int | None = None, dtype: str | None = None) -> pathlib.Path:
    """Write a scalar decoder reward model as a Hugging Face ``*ForSequenceClassification`` folder with
    ``num_labels = 1`` (``LlamaForSequenceClassification`` for Llama backbones, ``Qwen2...`` for q/k/v-bias
    ones, ``GPT2ForSequenceClassification`` for GPT-2), loadable by
    ``transformers.AutoModelForSequenceClassification.from_pretrained(path)`` and by TRL as a reward model.

    Scores: ``transformers``' ``score`` is a bias-free ``Linear`` ``[1, D]`` on the final hidden state
    ``h`` (float32 ``[D]``) of the pooled token. Our normalised score is ``(h.w + b - mean) / std``; the
    folder holds ``score.weight = w / std`` and ``config.json`` field ``jaxrlhf_reward_offset = (b - mean) /
    std`` (:data:`HF_OFFSET_KEY`), so ``transformers logit + jaxrlhf_reward_offset == model.score`` (float32
    rounding aside). The offset is the same for every text: rankings, Bradley-Terry preference
    probabilities ``sigmoid(r_a - r_b)`` and group-relative advantages do not see it; an absolute use (a PPO
    reward, a threshold) should add it (:func:`load_hf_reward_model` does).

    Pooling: ``transformers`` reads the rightmost token that is not ``config.pad_token_id``; ours reads the
    last real token (the EOS our decoder reward models are trained with). So the exported
    ``pad_token_id`` must not be an EOS id. It is, in order: ``pad_token_id`` if given; the model's
    ``pool_ignore_id`` (a model read from ``transformers``); the tokenizer's pad, then unk token if not an
    EOS id; else a new special token ``<|jaxrlhf_pad|>`` is added to the saved tokenizer (its id is
    ``len(tokenizer)``; when that is past the embedding, the embedding gets zero rows: padding never reaches
    a real token under causal attention). The saved tokenizer pads with that id, on the right
    (``transformers`` numbers positions from slot 0 even under left padding, which would shift RoPE/learned
    positions relative to ours). The caller's tokenizer is not modified.

    Args:
      model: a :class:`RewardModel` with ``num_outputs == 1``, a decoder backbone and ``last`` pooling.
      path: the folder (created; ``config.json``, ``model.safetensors``, tokenizer files).
      tokenizer: the backbone's ``transformers`` tokenizer (recommended: makes the folder self-contained).
      pad_token_id: force the padding id (must not be an EOS id).
      dtype: storage dtype (default: the parameters' own).
    Returns:
      the folder path.
    Raises:
      ValueError: a classifier head, an encoder backbone, a pooling other than ``last``, an EOS
        ``pad_token_id``, no usable padding id without a tokenizer, or a family with no
        sequence-classification class.
    """
    if model.num_outputs != 1:
        raise ValueError(f"export_hf_reward_model exports scalar reward models; this one has "
                         f"num_outputs={model.num_outputs} (a classifier head has per-class biases a bias-free "
                         "score layer cannot hold)")
    if not model.is_decoder or model.pooling != "last":
        raise ValueError(f"export_hf_reward_model needs a decoder with pooling='last' (transformers' decoder "
                         f"sequence classifiers), got is_decoder={model.is_decoder}, pooling={model.pooling!r}")
    mean, std = stats_of(nnx.state(model, RewardStat))
    w = np.asarray(jax.device_get(model.head.kernel[...]), np.float64)[:, 0]
    b = float(np.asarray(jax.device_get(model.head.bias[...]), np.float64)[0])
    pad, tok, vocab = _hf_padding(model, tokenizer, pad_token_id)
    weight = (w / std)[None, :].astype(np.float32)
    return save_hf_sequence_classifier(model.backbone, model.backbone.cfg, path, weight, tok, pad_token_id=pad,
                                       vocab_size=vocab, extra_config={HF_OFFSET_KEY: (b - mean) / std},
                                       dtype=dtype)


def is_hf_reward_folder(path: str | pathlib.Path) -> bool:
    """Whether ``path`` is a Hugging Face decoder ``*ForSequenceClassification`` folder (read by
    :func:`load_hf_reward_model`) rather than a :func:`save_reward_model` folder."""
    path = pathlib.Path(path)
    if (path / META_FILE).is_file() or not (path / "config.json").is_file():
        return False
    try:
        return is_decoder_sequence_classifier(json.loads((path / "config.json").read_text()))
    except (ValueError, OSError):
        return False


def load_hf_reward_model(path: str | pathlib.Path, *, dtype: str = "float32", param_dtype: str = "float32",
                         allow_pickle: bool = False, score_label: int = 1) -> tuple[RewardModel, Any]:
    """Load a Hugging Face decoder ``*ForSequenceClassification`` folder (``LlamaForSequenceClassification``,
    ``Qwen2``/``Mistral``/``GPT2ForSequenceClassification``; e.g. a TRL reward model, or
    :func:`export_hf_reward_model`'s output) as ``(RewardModel, tokenizer or None)``.

    The backbone goes through the family converters; ``score.weight`` ``[C, D]`` becomes the head's kernel
    ``[D, C]``. With ``num_labels == 1`` the head's bias is ``config.json``'s ``jaxrlhf_reward_offset``
    (0 when absent, i.e. for models from elsewhere), so ``model.score`` equals the ``transformers`` logit
    plus that offset; normalisation statistics are ``mean 0, std 1``. With ``num_labels >= 2`` the model is
    a classifier (reward = log-odds of ``score_label``; labels from ``id2label``). Pooling copies
    ``transformers``: the last token that is not ``config.pad_token_id`` (``pool_ignore_id``), so texts
    ending in an EOS that equals the pad id are scored at the token before it, as there.

    Raises:
      FileNotFoundError: no config.json or weights.
      ValueError: not a decoder sequence classifier, an unsupported architecture, mismatched tensors, or
        ``score_label`` out of range for a classifier.
    """
    path = pathlib.Path(path)
    backbone, _, w_CD, hf_config = load_hf_sequence_classifier(path, dtype=dtype, allow_pickle=allow_pickle,
                                                                param_dtype=param_dtype)
    C = int(w_CD.shape[0])
    labels: tuple[str, ...] = ()
    if C > 1:
        id2label = {str(k): str(v) for k, v in (hf_config.get("id2label") or {}).items()}
        labels = tuple(id2label.get(str(i), f"LABEL_{i}") for i in range(C))
    rm = RewardModel(backbone, num_outputs=C, pooling="last", score_label=score_label, labels=labels,
                     pool_ignore_id=hf_config.get("pad_token_id"), rngs=nnx.Rngs(0))
    rm.head.kernel.set_value(jnp.asarray(w_CD.T, rm.head.kernel[...].dtype))
    bias = np.zeros((C,), np.float32)
    if C == 1:
        bias[0] = float(hf_config.get(HF_OFFSET_KEY) or 0.0)
    rm.head.bias.set_value(jnp.asarray(bias, rm.head.bias[...].dtype))
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return rm, tokenizer


# ------------------------------------------------------------------------------------------ scoring

@functools.partial(jax.jit, static_argnames=("graphdef", "normalized"))
def _score(graphdef, state, tokens, positions, segment_ids, normalized: bool):
    m = nnx.merge(graphdef, state)
    return (m.score if normalized else m.raw_reward)(tokens, positions, segment_ids)


def make_scorer(model: RewardModel, normalized: bool = True):
    """A jitted ``fn(tokens, positions, segment_ids) -> float32 [...]`` of the model's (normalised) reward.

    One module-level jit keyed on the model's graph (static) and input shapes, with the parameters passed
    as arrays: scorers made again for the same model (e.g. by every :func:`score_texts` call of a PPO run)
    reuse the compilation instead of tracing anew.
    """
    graphdef, state = nnx.split(model)
    return functools.partial(_score, graphdef, state, normalized=normalized)


def score_texts(model: RewardModel, tokenizer: Any, texts: Sequence[str], *, max_length: int = 256,
                batch_size: int = 32, normalized: bool = True, add_eos: bool | None = None) -> np.ndarray:
    """Rewards ``float32 [len(texts)]`` of plain texts (host helper; e.g. decoded PPO completions).

    Texts are encoded with the tokenizer's special tokens (``encode_text``; truncated to ``max_length``,
    keeping the start), plus EOS for decoders whose tokenizer has one (``add_eos=None``), right-padded into
    fixed ``[batch_size, max_length]`` batches (one compilation), and scored with :func:`make_scorer`.
    """
    from jaxrlhf.data.batching import build_lm_batch
    from jaxrlhf.data.tokenize import encode_text, pad_id_for

    if add_eos is None:
        add_eos = model.is_decoder and getattr(tokenizer, "eos_token_id", None) is not None
    pad = pad_id_for(tokenizer) if (tokenizer.pad_token_id is not None or tokenizer.eos_token_id is not None) else 0
    ids = [encode_text(tokenizer, t, max_length=max_length, add_eos=add_eos) for t in texts]
    ids = [np.asarray([pad], np.int32) if x is None else x for x in ids]  # empty text: score one pad token
    scorer = make_scorer(model, normalized)
    out = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        b = build_lm_batch([((), x) for x in chunk], max_length, pad, batch_size=batch_size)
        r = scorer(jnp.asarray(b["tokens"]), jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"]))
        out.append(np.asarray(jax.device_get(r))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
