"""Pairwise (Bradley–Terry) reward model in your own loop, with one change: a per-pair margin.

Shows: wrap a loaded decoder in a :class:`jaxrlhf.models.reward_model.RewardModel` (scalar head on the
last real token), build preference pairs ``[B, 2, T]`` by hand and call the library's jitted
``jaxrlhf.algos.reward.reward_step`` in a plain ``for`` loop.

The one change: each pair carries how confident the annotator was (0..3), and the loss asks the chosen
reward to beat the rejected one by a margin that grows with it, ``-log σ(r_c - r_r - m)`` (Llama 2, eq. 2).
``reward_step`` adds a batch key ``margin`` float32 ``[B]`` to ``RewardConfig.margin``, so the change is
one line on the batch.

    python examples/reward_model_loop.py --model smollm2-135m-instruct --steps 5
"""
import argparse

import numpy as np
from flax import nnx

from jaxrlhf.algos.reward import reward_step
from jaxrlhf.config import OptimConfig, RewardConfig
from jaxrlhf.data import (
    PreferenceExample,
    build_preference_batch,
    pad_id_for,
    tokenize_preference_dataset,
)
from jaxrlhf.models.hub import load_pretrained
from jaxrlhf.models.reward_model import RewardModel, split_reward_model
from jaxrlhf.sharding import MeshConfig, check_batch_divisible, make_mesh, place_batch
from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer

# (prompt, chosen, rejected, annotator confidence 0..3); 8 rows, a multiple of the device count.
PAIRS = [
    ("What is the capital of France?", " Paris.", " I think it might be Lyon.", 3),
    ("What is 2 + 2?", " 4.", " 5.", 3),
    ("Say hello in Spanish.", " Hola.", " Bonjour.", 2),
    ("Suggest a name for a cat.", " Whiskers.", " Cat.", 1),
    ("How do I boil an egg?", " Simmer it for about nine minutes.", " Eggs are laid by hens.", 2),
    ("Describe the sky.", " Blue and clear today.", " Sky.", 1),
    ("Is the earth flat?", " No, it is roughly a sphere.", " Yes.", 3),
    ("Recommend a book.", " Try 'Middlemarch' by George Eliot.", " Books are good.", 0),
]


def main(model: str = "smollm2-135m-instruct", steps: int = 5, seq_len: int = 64, lr: float = 1e-5,
         margin_per_level: float = 0.5) -> list[float]:
    mesh = make_mesh(MeshConfig(data=-1))
    check_batch_divisible(len(PAIRS), mesh, "len(PAIRS)")
    pre = load_pretrained(model)
    tok = pre.tokenizer
    rows = [PreferenceExample(p, c, r) for p, c, r, _ in PAIRS]
    pairs, _ = tokenize_preference_dataset(rows, tok, max_length=seq_len)   # completions end with EOS
    batch = build_preference_batch(pairs, seq_len, pad_id_for(tok, pre.cfg))
    batch["margin"] = margin_per_level * np.array([c for *_, c in PAIRS], np.float32)   # <- the one change

    rm = RewardModel(pre.model, num_outputs=1, rngs=nnx.Rngs(0))           # backbone + scalar head
    graphdef, params, stats = split_reward_model(rm)                       # stats: reward mean/std (not trained)
    tx = make_optimizer(OptimConfig(lr=lr, schedule="constant"), total_steps=steps)
    state, sharding = init_sharded_state(params, tx, mesh, extra=stats)
    step = jit_step(reward_step, mesh, sharding, static_kwargs=dict(graphdef=graphdef, tx=tx, cfg=RewardConfig()))
    batch = place_batch(batch, mesh)
    losses = []
    for i in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        print(f"step {i}: loss {losses[-1]:.4f}  accuracy {float(metrics['rewards/accuracy']):.2f}  "
              f"margin {float(metrics['rewards/margin']):.3f}")
    return losses


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name, HF folder or .gguf")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--margin-per-level", type=float, default=0.5, help="0 = plain Bradley-Terry")
    a = ap.parse_args()
    main(a.model, a.steps, a.seq_len, a.lr, a.margin_per_level)
