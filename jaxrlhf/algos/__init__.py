"""Pure algorithm code: each algorithm's loss, step and jittable evaluation, one module each.

* :mod:`jaxrlhf.algos.sft` -- ``sft_step``; :mod:`jaxrlhf.algos.reward` -- ``reward_step``;
* :mod:`jaxrlhf.algos.dpo` -- ``dpo_step`` / ``dpo_extra`` over :mod:`jaxrlhf.algos.dpo_losses`;
* :mod:`jaxrlhf.algos.ppo` and :mod:`jaxrlhf.algos.grpo` (GRPO, RLOO) over :mod:`jaxrlhf.algos.rollout`.

The package itself exports nothing; import from the modules (or from :mod:`jaxrlhf`).
"""

__all__: list[str] = []
