"""Pure, jittable array maths shared by the trainers: log-probs, masked reductions, GAE, KL estimators,
group advantages."""
from jaxrlhf.ops.advantages import grpo_advantages, rloo_advantages
from jaxrlhf.ops.gae import gae
from jaxrlhf.ops.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3, kl_penalty
from jaxrlhf.ops.logprobs import entropy_from_logits, next_token_logprobs, sequence_logprobs, token_logprobs
from jaxrlhf.ops.masked import AGGREGATIONS, masked_aggregate, masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "entropy_from_logits",
    "gae",
    "grpo_advantages",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "masked_aggregate",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "next_token_logprobs",
    "rloo_advantages",
    "sequence_logprobs",
    "token_logprobs",
]
