"""A custom DPO-style loss written in your own script: DPO-Positive (DPOP), next to the library's DPO.

Shows: how to train with a preference loss the library does not ship. The step is the library's
``gradient_step``; the per-sequence log-probs come from ``jaxrlhf.algos.dpo.sequence_logps`` (policy) and
``reference_sums`` (frozen reference, no gradient); only the loss (:func:`dpop_loss`) is new.

The one change: DPO's logit ``β[(π_c - ref_c) - (π_r - ref_r)]`` gets a penalty ``- λ·max(0, ref_c - π_c)``
inside it (Pal et al. 2024, "Smaug", eq. 3), so the loss also rises when the chosen completion becomes
*less* likely than under the reference (plain DPO can lower both). ``λ = 0`` is exactly DPO; the library's
``dpo_loss`` is computed alongside for comparison. β and λ live in ``TrainState.extra`` (traced: a sweep
over them reuses one compiled step).

    python examples/dpo_custom_loss.py --model smollm2-135m-instruct --steps 5 --lam 50
"""
import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.algos.dpo import reference_sums, sequence_logps
from jaxrlhf.config import OptimConfig
from jaxrlhf.data import (
    PreferenceExample,
    build_preference_batch,
    pad_id_for,
    tokenize_preference_dataset,
)
from jaxrlhf.losses import dpo_loss
from jaxrlhf.models.hub import load_pretrained
from jaxrlhf.sharding import MeshConfig, check_batch_divisible, make_mesh, place_batch
from jaxrlhf.train_state import (
    gradient_step,
    init_sharded_state,
    jit_step,
    make_optimizer,
)

PAIRS = [  # (prompt, chosen, rejected); 8 rows, a multiple of the device count
    ("What is the capital of France?", " Paris.", " I think it might be Lyon."),
    ("What is 2 + 2?", " 4.", " 5."),
    ("Say hello in Spanish.", " Hola.", " Bonjour."),
    ("Suggest a name for a cat.", " Whiskers.", " Cat."),
    ("How do I boil an egg?", " Simmer it for about nine minutes.", " Eggs are laid by hens."),
    ("Describe the sky.", " Blue and clear today.", " Sky."),
    ("Is the earth flat?", " No, it is roughly a sphere.", " Yes."),
    ("Recommend a book.", " Try 'Middlemarch' by George Eliot.", " Books are good."),
]


def dpop_loss(pc_B, pr_B, rc_B, rr_B, beta, lam):
    """DPOP: ``mean_b -log σ(β[(π_c - ref_c) - (π_r - ref_r) - λ·max(0, ref_c - π_c)])`` on summed
    sequence log-probs ``[B]`` (policy chosen/rejected, reference chosen/rejected). Returns ``(loss, metrics)``."""
    penalty_B = jnp.maximum(0.0, rc_B - pc_B)
    logits_B = beta * ((pc_B - rc_B) - (pr_B - rr_B) - lam * penalty_B)
    loss = -jnp.mean(jax.nn.log_sigmoid(logits_B))
    return loss, {"loss": loss, "penalty": jnp.mean(penalty_B)}


def dpop_step(state, batch, ref_params, *, graphdef, tx):
    """One optimizer step of :func:`dpop_loss` (pure; jit it with ``jit_step``)."""
    def loss_fn(params, mb):
        pol_B2 = sequence_logps(graphdef, params, mb).sums        # [B, 2]: 0 = chosen, 1 = rejected
        ref_B2 = reference_sums(graphdef, ref_params, mb)         # [B, 2], stop_gradient inside
        args = (pol_B2[:, 0], pol_B2[:, 1], ref_B2[:, 0], ref_B2[:, 1], state.extra["beta"])
        loss, metrics = dpop_loss(*args, state.extra["lam"])
        metrics["library_dpo_loss"] = dpo_loss(*args)[0]         # what plain DPO would report
        n = jnp.asarray(mb["tokens"].shape[0], jnp.float32)       # a sum over pairs + their count:
        return loss * n, (n, metrics)                             # exact gradient accumulation
    return gradient_step(state, batch, loss_fn=loss_fn, tx=tx)


def main(model: str = "smollm2-135m-instruct", steps: int = 5, seq_len: int = 64, lr: float = 1e-6,
         beta: float = 0.1, lam: float = 50.0) -> list[float]:
    mesh = make_mesh(MeshConfig(data=-1))
    check_batch_divisible(len(PAIRS), mesh, "len(PAIRS)")
    pre = load_pretrained(model)
    tok = pre.tokenizer
    pairs, _ = tokenize_preference_dataset([PreferenceExample(*p) for p in PAIRS], tok, max_length=seq_len)
    batch = place_batch(build_preference_batch(pairs, seq_len, pad_id_for(tok, pre.cfg)), mesh)

    graphdef, params = nnx.split(pre.model)
    tx = make_optimizer(OptimConfig(lr=lr, schedule="constant"), total_steps=steps)
    extra = {"beta": jnp.float32(beta), "lam": jnp.float32(lam)}
    state, sharding = init_sharded_state(params, tx, mesh, extra)
    ref = jax.tree.map(jnp.copy, state.params)                   # the frozen reference (own buffers)
    step = jit_step(dpop_step, mesh, sharding, static_kwargs=dict(graphdef=graphdef, tx=tx))
    losses = []
    for i in range(steps):
        state, metrics = step(state, batch, ref)
        losses.append(float(metrics["loss"]))
        print(f"step {i}: dpop {losses[-1]:.4f}  dpo {float(metrics['library_dpo_loss']):.4f}  "
              f"penalty {float(metrics['penalty']):.4f}")
    return losses


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name, HF folder or .gguf")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lam", type=float, default=50.0, help="0 = plain DPO")
    a = ap.parse_args()
    main(a.model, a.steps, a.seq_len, a.lr, a.beta, a.lam)
