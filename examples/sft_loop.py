"""SFT in your own loop, with one change: every *sequence* weighs the same in the loss.

Shows: load a model, tokenize a few hard-coded prompt/response pairs, build the LM batch by hand and call
the library's jitted ``jaxrlhf.algos.sft.sft_step`` in a plain Python ``for`` loop.

The one change: ``sft_step`` averages the NLL with the batch's ``completion_mask`` as token weights,
``sum_t m_t nll_t / sum_t m_t`` (every completion token counts the same, so long responses dominate).
Dividing each row's mask by its completion length (:func:`sequence_weights`) turns that into the mean over
sequences of each sequence's mean NLL -- one line on the batch, no new loss code.

    python examples/sft_loop.py --model smollm2-135m-instruct --steps 5
"""
import argparse

import numpy as np
from flax import nnx

from jaxrlhf.algos.sft import sft_step
from jaxrlhf.config import OptimConfig, SFTConfig
from jaxrlhf.data import SFTExample, build_lm_batch, pad_id_for, tokenize_sft_dataset
from jaxrlhf.models.hub import load_pretrained
from jaxrlhf.sharding import MeshConfig, check_batch_divisible, make_mesh, place_batch
from jaxrlhf.train_state import init_sharded_state, jit_step, make_optimizer

# 8 rows: the batch axis is split over the mesh's data axis, so keep it a multiple of the device count.
PAIRS = [
    ("What is the capital of France?", " Paris."),
    ("Name a primary colour.", " Red is a primary colour, and so are blue and yellow."),
    ("What is 2 + 2?", " 4."),
    ("Say hello in Spanish.", " Hola."),
    ("Give an antonym of 'hot'.", " Cold."),
    ("Which planet is known as the red planet?", " Mars, because of the iron oxide on its surface."),
    ("What do bees make?", " Honey."),
    ("How many days are in a week?", " There are seven days in a week."),
]


def sequence_weights(mask_BT: np.ndarray) -> np.ndarray:
    """Completion-mask weights ``[B, T]`` whose rows each sum to 1 (all-zero rows stay zero)."""
    return mask_BT / np.maximum(mask_BT.sum(-1, keepdims=True), 1.0)


def main(model: str = "smollm2-135m-instruct", steps: int = 5, seq_len: int = 64, lr: float = 1e-5,
         per_sequence: bool = True) -> list[float]:
    mesh = make_mesh(MeshConfig(data=-1))                     # all devices on the data axis
    check_batch_divisible(len(PAIRS), mesh, "len(PAIRS)")
    pre = load_pretrained(model)
    tok = pre.tokenizer
    examples, _ = tokenize_sft_dataset([SFTExample(p, r) for p, r in PAIRS], tok, max_length=seq_len)
    batch = build_lm_batch(examples, seq_len, pad_id_for(tok, pre.cfg))
    if per_sequence:
        batch["completion_mask"] = sequence_weights(batch["completion_mask"])   # <- the one change

    graphdef, params = nnx.split(pre.model)
    tx = make_optimizer(OptimConfig(lr=lr, schedule="constant"), total_steps=steps)
    state, sharding = init_sharded_state(params, tx, mesh)
    step = jit_step(sft_step, mesh, sharding, static_kwargs=dict(graphdef=graphdef, tx=tx, cfg=SFTConfig()))
    batch = place_batch(batch, mesh)
    losses = []
    for i in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        print(f"step {i}: loss {losses[-1]:.4f}  grad_norm {float(metrics['grad_norm']):.3f}")
    return losses


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name, HF folder or .gguf")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--per-token", action="store_true", help="the library default (token-weighted mean)")
    a = ap.parse_args()
    main(a.model, a.steps, a.seq_len, a.lr, per_sequence=not a.per_token)
