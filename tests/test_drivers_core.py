"""The shared driver core: the limit/split rule, the loop hooks the drivers use, the one pad/EOS helper."""

import json
import types

import numpy as np

from jaxrlhf import config as C
from jaxrlhf.data.iterator import train_eval_split
from jaxrlhf.drivers import core


def sorted_prompt_file(tmp_path, n=40):
    """Label-sorted prompts (first half label 0 "bad film", second half label 1 "good film"), as IMDB."""
    rows = [{"prompt": f"{'bad' if i < n // 2 else 'good'} film {i:02d}", "label": int(i >= n // 2)}
            for i in range(n)]
    path = tmp_path / "sorted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_split_rows_is_the_hash_split_then_a_seeded_sample(tmp_path):
    data = C.DataConfig(source=sorted_prompt_file(tmp_path), eval_size=8, limit=10, seed=3)
    train_rows, eval_rows = core.split_rows(data)
    # Independent re-derivation: eval = train_eval_split indices; train = seeded permutation of the rest.
    train_idx, eval_idx = train_eval_split(40, 8, seed=3)
    pick = np.sort(np.random.default_rng(3).permutation(len(train_idx))[:10])
    assert [r["prompt"] for r in eval_rows] == [f"{'bad' if i < 20 else 'good'} film {i:02d}" for i in eval_idx]
    assert [r["prompt"] for r in train_rows] == [f"{'bad' if i < 20 else 'good'} film {i:02d}"
                                                 for i in train_idx[pick]]
    assert len(train_rows) == 10 and set(train_idx[pick]).isdisjoint(eval_idx)
    # No limit: every non-held-out row.
    all_rows, _ = core.split_rows(dataclasses_replace(data, limit=0))
    assert len(all_rows) == 32


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_limit_draws_both_labels_of_a_sorted_prompt_file(tmp_path, shared_assets):
    """The RL prompt loader (PPO, GRPO and RLOO share it): ``data.limit=10`` of a label-sorted file gives
    prompts of both labels for training AND for evaluation (the first 10 rows would all be label 0)."""
    from transformers import AutoTokenizer

    from jaxrlhf.drivers.rl import load_prompts

    tok = AutoTokenizer.from_pretrained(str(shared_assets / "gpt2-tokenizer"))
    data = C.DataConfig(source=sorted_prompt_file(tmp_path), eval_size=8, limit=10, max_prompt_length=8,
                        use_chat_template=False)
    train, held_out = load_prompts(data, tok)
    assert len(train) == 10 and len(held_out) == 8
    for prompts in (train, held_out):
        words = {tok.decode(p).split()[0] for p in prompts}
        assert words == {"bad", "good"}, words


def test_loop_passes_step_numbers_aux_and_finalizes_before_the_last_checkpoint(tmp_path):
    """``pass_step`` gives the step its number; ``after_step`` sees the step's aux; ``finalize`` runs once
    on the last step, before its checkpoint (so the checkpoint holds what finalize returned)."""
    import jax.numpy as jnp

    from jaxrlhf.loop import Hooks, RunDir, train_loop

    State = types.SimpleNamespace
    saved, seen, finals = [], [], []

    class Ckpt:
        def save(self, step, state, position, meta):
            saved.append((step, state.value))

    def step_fn(state, batch, *, step):
        return State(step=jnp.asarray(step), value=state.value + batch), {"loss": jnp.float32(step)}, f"aux{step}"

    def finalize(state):
        finals.append(state.value)
        return State(step=state.step, value=-1)

    run = RunDir(tmp_path, "loop", tensorboard=False)
    out = train_loop(state=State(step=jnp.asarray(0), value=0), step_fn=step_fn, batches=iter([1, 2, 3]),
                     place=lambda b: b * 10, total_steps=3, run=run, checkpointer=Ckpt(), save_every=2,
                     pass_step=True, hooks=Hooks(after_step=lambda s, st, m, aux: seen.append((s, aux)),
                                                 finalize=finalize), progress=False)
    assert seen == [(1, "aux1"), (2, "aux2"), (3, "aux3")]
    assert finals == [60] and out.value == -1
    assert saved == [(2, 30), (3, -1)]
    assert [m["loss"] for m in run.read_metrics()] == [1.0, 2.0, 3.0]


def test_pad_and_eos_ids_have_one_rule():
    from jaxrlhf.data.tokenize import eos_ids_for, pad_id_for

    tok = types.SimpleNamespace(pad_token_id=None, eos_token_id=[7, 9])
    model = types.SimpleNamespace(eos_token_ids=(9, 3), pad_token_id=None)
    assert eos_ids_for(tok, model) == (9, 3, 7)
    assert pad_id_for(tok, model) == 9                                   # first EOS id
    assert pad_id_for(types.SimpleNamespace(pad_token_id=5, eos_token_id=1)) == 5
    assert pad_id_for(types.SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert pad_id_for(tok, types.SimpleNamespace(eos_token_ids=(), pad_token_id=4)) == 4


def test_state_shardings_of_a_train_state_follow_the_parameters():
    """The one ``state_shardings``: optimizer moments of a TrainState get their parameter's sharding."""
    import jax
    import optax
    from flax import nnx

    from jaxrlhf.models.config import ModelConfig
    from jaxrlhf.models.llama import Llama
    from jaxrlhf.sharding import MeshConfig, make_mesh, state_shardings
    from jaxrlhf.train_state import create_train_state

    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=32)
    _, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    tx = optax.adam(1e-3)
    state = jax.eval_shape(lambda p: create_train_state(p, tx), params)
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=1))
    sh = state_shardings(state, mesh)
    param_specs = [s.spec for s in jax.tree.leaves(state_shardings(params, mesh))]
    assert [s.spec for s in jax.tree.leaves(sh.params)] == param_specs
    adam = sh.opt_state[0]
    assert [s.spec for s in jax.tree.leaves(adam.mu)] == param_specs
    assert [s.spec for s in jax.tree.leaves(adam.nu)] == param_specs
    assert adam.count.spec == jax.sharding.PartitionSpec() and sh.step.spec == jax.sharding.PartitionSpec()
    assert any(spec != jax.sharding.PartitionSpec() for spec in param_specs)  # fsdp really shards something
