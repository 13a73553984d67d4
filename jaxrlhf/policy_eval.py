"""The study's one evaluation of a policy: sample held-out prompts, judge, compare with the reference.

Every arm of a comparison study (PPO, DPO, ... ) is evaluated by the same :class:`PolicyEvaluator`, at
several points of its training, so each arm traces a path on the reward-KL frontier (Rafailov et al.
2023, §6.1 and Fig. 2 left). One call:

1. samples one completion per held-out prompt from the policy (temperature 1, no truncation) with ONE
   fixed key: every arm, at every evaluation point, draws with the same random numbers (common random
   numbers), so differences between points and arms are the policies', not the sampling noise's;
2. scores prompt + completion with every judge (e.g. ``gold``: the sentiment classifier the RL arms
   optimise; ``proxy``: the reward model trained on π_ref's ranked samples; ``vader``: a rule-based judge
   nothing optimises);
3. estimates the sequence-level KL(π‖π_ref) on the policy's own samples: ``Σ_t log π(y_t) − log π_ref(y_t)``
   over the completion tokens (the sampler returns ``log π``; one reference forward gives ``log π_ref``);
4. the gold win rate against π_ref's own completions of the same prompts (ties count 1/2), the mean
   completion length and distinct-1/2 (Li et al. 2016).

Metrics (floats): ``<judge>`` (mean score of each judge) and ``<judge>_sem`` (its standard error over the
prompts: the evaluation's own sampling noise), ``kl`` (nats, mean over samples) and
``kl_sem`` (its standard error), ``win_rate`` (+ ``win_rate_sem``) when reference scores are given,
``length`` (completion tokens), ``distinct_1``, ``distinct_2``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.errors import DataError
from jaxrlhf.evaluate import distinct_n, sequence_kl, win_rate
from jaxrlhf.ops import next_token_logprobs
from jaxrlhf.rewards import Completions, RewardFn
from jaxrlhf.sampling import SampleOutput, SamplingConfig, sample

__all__ = ["PolicyEvaluator", "build_policy_evaluator", "reference_token_logps"]


@jax.jit
def _completion_logps(graphdef_and_params, tokens_BS, positions_BS, segment_ids_BS, completion_mask_BS):
    graphdef, params = graphdef_and_params
    model = nnx.merge(graphdef, params)
    out = model(tokens_BS, positions_BS, segment_ids_BS)
    logps = next_token_logprobs(out.logits_BTV, tokens_BS)
    return jnp.where(completion_mask_BS > 0, logps, 0.0)


def reference_token_logps(graphdef: nnx.GraphDef, ref_params: Any, out: SampleOutput) -> np.ndarray:
    """``log π_ref(y_t | x, y_<t)`` of each sampled completion token, aligned with
    ``out.completion_tokens_BN``: float32 ``[B, N]`` (nats; 0 after a row's EOS).

    One jitted forward of the reference model over ``out``'s prompt + completion tokens ``[B, S]``.
    """
    logps_BS = _completion_logps((graphdef, ref_params), out.tokens_BS, out.positions_BS, out.segment_ids_BS,
                                 out.completion_mask_BS)
    N = out.completion_tokens_BN.shape[1]
    return np.asarray(jax.device_get(logps_BS))[:, -N:]


@dataclasses.dataclass
class PolicyEvaluator:
    """Evaluate any policy with the reference's architecture on fixed held-out prompts.

    Attributes:
      graphdef: the policy's (= the reference's) graph definition.
      ref_params: π_ref's parameters (frozen).
      tokenizer: the policy's tokenizer (decodes completions for the text judges).
      prompt_batches: host batches ``{"prompt_tokens", "prompt_mask"}`` int32 ``[B, P]``, left-padded.
      judges: name -> reward (``jaxrlhf.rewards`` signature ``reward(Completions) -> float [B]``).
      sampling: :class:`SamplingConfig` (``temperature`` should be 1 with no top-k/top-p, so the
        sampler's ``policy_logps_BN`` are ``log π`` and the KL estimate is unbiased).
      reference_scores: ``{judge: float [num_prompts]}`` scores of π_ref's own completions of the same
        prompts; gives ``win_rate`` for the judge named ``win_judge``.
      win_judge: the judge of the win rate (the gold reward).
      seed: the sampling key ``key(seed)`` of every evaluation.
      num_samples: completions kept for ``samples.jsonl`` per evaluation.
      num_prompts: real prompts (the rows of the last batch beyond it are padding repeats, dropped);
        None = every row.
    """

    graphdef: nnx.GraphDef
    ref_params: Any
    tokenizer: Any
    prompt_batches: Sequence[Mapping[str, np.ndarray]]
    judges: Mapping[str, RewardFn]
    sampling: SamplingConfig
    reference_scores: Mapping[str, np.ndarray] | None = None
    win_judge: str = "gold"
    seed: int = 0
    num_samples: int = 4
    num_prompts: int | None = None

    def sample_all(self, params: Any, key: jax.Array) -> list[SampleOutput]:
        """One completion per held-out prompt (batch by batch, key folded with the batch index)."""
        return [sample((self.graphdef, params), b["prompt_tokens"], b["prompt_mask"], jax.random.fold_in(key, i),
                       self.sampling) for i, b in enumerate(self.prompt_batches)]

    def __call__(self, policy_params: Any) -> tuple[dict[str, float], list[dict]]:
        """Metrics of ``policy_params`` (see the module doc) and a few ``{prompt, completion, <judge>}``
        samples."""
        key = jax.random.key(self.seed)
        scores: dict[str, list[np.ndarray]] = {name: [] for name in self.judges}
        pol, ref, masks, lengths, tokens, texts = [], [], [], [], [], []
        for out in self.sample_all(policy_params, key):
            comp = Completions.from_sample(out, self.tokenizer)
            for name, judge in self.judges.items():
                scores[name].append(np.asarray(jax.device_get(judge(comp)), np.float64))
            mask = np.asarray(jax.device_get(out.completion_mask_BN))
            pol.append(np.asarray(jax.device_get(out.policy_logps_BN)))
            masks.append(mask)
            ref.append(reference_token_logps(self.graphdef, self.ref_params, out))
            lengths.append(mask.sum(-1))
            ct = np.asarray(jax.device_get(out.completion_tokens_BN))
            tokens += [row[m > 0].tolist() for row, m in zip(ct, mask)]
            p, c = comp.texts()
            texts += list(zip(p, c))
        n = self.num_prompts
        all_scores = {k: np.concatenate(v)[:n] for k, v in scores.items()}
        kl = sequence_kl(np.concatenate(pol)[:n], np.concatenate(ref)[:n], np.concatenate(masks)[:n])
        metrics = {name: float(v.mean()) for name, v in all_scores.items()}
        # The evaluation's own sampling noise: the standard error of each judge's mean over the prompts.
        metrics.update({f"{name}_sem": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
                        for name, v in all_scores.items()})
        tokens = tokens[:n]
        metrics.update(kl=float(kl.mean), kl_sem=float(kl.stderr), length=float(np.concatenate(lengths)[:n].mean()),
                       distinct_1=distinct_n(tokens, 1), distinct_2=distinct_n(tokens, 2))
        if self.reference_scores is not None and self.win_judge in self.reference_scores:
            ref_scores = np.asarray(self.reference_scores[self.win_judge], np.float64)
            mine = all_scores[self.win_judge][:len(ref_scores)]
            metrics["win_rate"], metrics["win_rate_sem"] = win_rate(mine, ref_scores[:len(mine)])
        samples = [{"prompt": p, "completion": c, **{k: float(v[i]) for k, v in all_scores.items()}}
                   for i, (p, c) in enumerate(texts[:self.num_samples])]
        return metrics, samples


def build_policy_evaluator(spec, *, graphdef: nnx.GraphDef, ref_params: Any, tokenizer: Any, model_cfg: Any
                           ) -> PolicyEvaluator:
    """A :class:`PolicyEvaluator` from a :class:`jaxrlhf.config.PolicyEvalSpec`.

    Args:
      spec: the ``policy_eval`` section of the experiment config.
      graphdef, ref_params: π_ref (the driver passes the loaded initial policy, or loads
        ``spec.reference`` when it names another model).
      tokenizer, model_cfg: the policy's tokenizer and model config (EOS and pad ids).

    Raises:
      ValueError: the prompts file has no rows, a row without ``prompt``, or a prompt that encodes to no
        tokens; a judge that cannot be built (see :func:`jaxrlhf.rewards.build_reward`).
    """
    from jaxrlhf.data.batching import build_prompt_batch
    from jaxrlhf.data.sources import load_rows
    from jaxrlhf.data.tokenize import encode_prompt, eos_ids_for, pad_id_for
    from jaxrlhf.rewards import build_reward

    rows = list(load_rows(spec.prompts, split="test"))
    if spec.num_prompts:
        rows = rows[:spec.num_prompts]
    if not rows:
        raise DataError(f"policy_eval.prompts={spec.prompts!r} has no rows")
    for i, r in enumerate(rows):
        if not r.get("prompt"):
            raise DataError(f"policy_eval.prompts={spec.prompts!r}: row {i} has no 'prompt'")
    ids = [encode_prompt(tokenizer, r["prompt"])[-spec.max_prompt_length:] for r in rows]
    pad = pad_id_for(tokenizer)
    batches = []
    for start in range(0, len(ids), spec.batch_size):
        chunk = ids[start:start + spec.batch_size]
        chunk = chunk + [chunk[-1]] * (spec.batch_size - len(chunk))  # fixed shape; repeats are dropped
        batches.append(build_prompt_batch(chunk, spec.max_prompt_length, pad))
    reference_scores = None
    if all(r.get("reference_gold") is not None for r in rows):
        reference_scores = {spec.win_judge: np.asarray([r["reference_gold"] for r in rows], np.float64)}
    sampling = SamplingConfig(max_new_tokens=spec.max_new_tokens, temperature=1.0,
                              eos_token_ids=eos_ids_for(tokenizer, model_cfg), pad_token_id=pad)
    judges = {name: build_reward(rs) for name, rs in spec.judges}
    return PolicyEvaluator(graphdef=graphdef, ref_params=ref_params, tokenizer=tokenizer, prompt_batches=batches,
                           judges=judges, sampling=sampling, reference_scores=reference_scores,
                           win_judge=spec.win_judge, seed=spec.seed, num_samples=spec.num_samples,
                           num_prompts=len(rows))
