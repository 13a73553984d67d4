"""Host drivers: everything that reads files, builds the mesh, loops and writes a run directory.

``jaxrlhf/algos/`` holds only pure code (each algorithm's loss, step and jittable evaluation); the drivers
compose it with data and the loop. Layout:

* :mod:`jaxrlhf.drivers.core` -- the ONE shared driver core: validate + mesh + run dir
  (:func:`~jaxrlhf.drivers.core.start_run`), model loading (``load_policy``), the limit/split rule for
  rows (``split_rows``: ``data.limit`` is a seeded sample, never the first N rows), init-or-restore,
  and :func:`~jaxrlhf.drivers.core.drive`: eval at step 0 and at the end, before/after samples, the
  loop (:func:`jaxrlhf.loop.train_loop`) with its hooks, export, the summary.
* :mod:`jaxrlhf.drivers.sft` -- SFT (``algos/sft.py``); exports a Hugging Face folder.
* :mod:`jaxrlhf.drivers.reward` -- reward models: pairwise, ranking, classifier (``algos/reward.py``);
  normalisation pass before the final checkpoint; exports the reward model folder.
* :mod:`jaxrlhf.drivers.dpo` -- the DPO family (``algos/dpo.py``), with the precomputed-reference glue.
* :mod:`jaxrlhf.drivers.rl` -- PPO, GRPO, RLOO (``algos/ppo.py``, ``algos/grpo.py``, ``algos/rollout.py``):
  the jitted rollout pieces, one RL iteration per loop step, held-out evaluation.

:func:`run_experiment` dispatches on the *type* of ``cfg.algo`` through :data:`DRIVERS`.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxrlhf import config as C
from jaxrlhf.drivers import dpo, reward, rl, sft

__all__ = ["DRIVERS", "run_experiment"]

# algo config class -> driver ``train(cfg, resume) -> summary``.
DRIVERS: dict[type, Callable[..., dict]] = {
    C.SFTConfig: sft.train,
    C.RewardConfig: reward.train,
    C.DPOConfig: dpo.train,
    C.PPOConfig: rl.train,
    C.GRPOConfig: rl.train,
    C.RLOOConfig: rl.train,
}


def run_experiment(cfg: C.ExperimentConfig, resume: bool = False) -> dict:
    """Run ``cfg`` with the driver of ``type(cfg.algo)``; returns its summary dict.

    Raises:
      ConfigError: ``cfg.algo`` is not one of the algorithm configs in :data:`DRIVERS`.
    """
    driver = DRIVERS.get(type(cfg.algo))
    if driver is None:
        raise C.ConfigError(f"algo: {type(cfg.algo).__name__} has no driver; known: "
                            f"{sorted(t.__name__ for t in DRIVERS)}")
    return driver(cfg, resume=resume)
