"""Runs that never lose finished work: the NaN guard, SIGTERM at a step boundary, and a checkpoint that dies
while being written. (Resume after a real SIGTERM equals the uninterrupted run for every driver in
``test_drivers.py``.)"""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf.checkpoint import Checkpointer
from jaxrlhf.errors import NonFiniteError, Preempted
from jaxrlhf.loop import Hooks, RunDir, train_loop
from jaxrlhf.train_state import TrainState


def toy_run(tmp_path, poison_step=0, metric="loss", sigterm_step=0, steps=8):
    """A least-squares fit by SGD through the real loop and checkpointer (save every step). The step
    function is an honest gradient step; at ``poison_step`` its ``metric`` is nan (as an overflowing loss
    would be), at ``sigterm_step`` this process sends itself SIGTERM right after dispatching the step."""
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    y = 3.0 * x + 1.0
    tx = optax.sgd(0.1)
    params = {"w": jnp.zeros(()), "b": jnp.zeros(())}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    @jax.jit
    def update(state, batch):
        def loss_fn(p):
            return jnp.mean((p["w"] * batch["x"] + p["b"] - batch["y"]) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state)
        new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def step_fn(state, batch, *, step):
        state, metrics = update(state, batch)
        if step == poison_step:
            metrics = dict(metrics, **{metric: jnp.float32(np.nan)})
        return state, metrics

    def after_step(step, state, metrics, aux):
        if step == sigterm_step:
            os.kill(os.getpid(), signal.SIGTERM)

    position = {"i": 0}

    def batches():
        while True:
            position["i"] += 1
            yield {"x": x, "y": y}

    run = RunDir(tmp_path, "toy", tensorboard=False)
    ckpt = Checkpointer(run.checkpoints, keep=100)
    try:
        return train_loop(state=state, step_fn=step_fn, batches=batches(), place=lambda b: b, total_steps=steps,
                          run=run, checkpointer=ckpt, data_position=lambda: dict(position), save_every=1,
                          hooks=Hooks(after_step=after_step), pass_step=True, progress=False), ckpt, run
    finally:
        ckpt.close()


@pytest.mark.parametrize("metric", ["loss", "grad_norm"])
def test_nan_at_step_k_stops_there_and_the_latest_checkpoint_is_the_step_before(tmp_path, metric):
    k = random.Random(metric).randint(2, 7)
    with pytest.raises(NonFiniteError) as err:
        toy_run(tmp_path, poison_step=k, metric=metric)
    assert (err.value.step, err.value.metric, err.value.latest_checkpoint) == (k, metric, k - 1)
    assert f"non-finite {metric} = nan at step {k}" in str(err.value)
    assert f"latest checkpoint is step {k - 1}" in str(err.value)
    ckpt = Checkpointer(tmp_path / "toy" / "checkpoints")
    assert ckpt.all_steps() == list(range(1, k))  # nothing at or after k was written
    logged = [json.loads(line)["step"] for line in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, k))


def test_sigterm_saves_the_step_in_flight_and_resume_finishes_like_a_straight_run(tmp_path):
    straight, _, _ = toy_run(tmp_path / "a")
    k = random.Random(0).randint(1, 6)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stopped:
        toy_run(tmp_path / "b", sigterm_step=k)
    assert stopped.value.step == k and "SIGTERM received" in str(stopped.value) and "--resume" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) is previous  # the loop put the old handler back
    ckpt = Checkpointer(tmp_path / "b" / "toy" / "checkpoints")
    assert ckpt.latest_step() == k
    # An SGD fit is deterministic: the step-k checkpoint equals the straight run's step-k parameters.
    ref = Checkpointer(tmp_path / "a" / "toy" / "checkpoints")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), straight)
    got, data, _ = ckpt.restore(abstract)
    want, _, _ = ref.restore(abstract, step=k)
    np.testing.assert_allclose(float(got.params["w"]), float(want.params["w"]), rtol=1e-6)
    assert data == {"i": k}


CHILD = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    from jaxrlhf.checkpoint import Checkpointer

    class DiesWhileWritten(dict):  # the data-position item kills the process in the middle of the save
        def items(self):
            os._exit(9)

    ckpt = Checkpointer(sys.argv[1])
    state = {"w": jnp.arange(4.0)}
    ckpt.save(1, state, {"position": 1}, {})
    ckpt.save(2, {"w": jnp.arange(4.0) + 1}, DiesWhileWritten(position=2), {})
""")


def test_a_checkpoint_that_dies_while_written_is_never_the_latest(tmp_path):
    directory = tmp_path / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(directory)], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert [p.name for p in directory.iterdir() if p.name.startswith("2.")]  # the partial step-2 folder (orbax tmp)
    ckpt = Checkpointer(directory)
    assert ckpt.latest_step() == 1
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    state, data, _ = ckpt.restore(abstract)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(4.0))
    assert data == {"position": 1}
    # The resumed run redoes step 2 and can save it over the debris.
    ckpt.save(2, {"w": jnp.arange(4.0) + 1}, {"position": 2}, {})
    assert ckpt.latest_step() == 2
    ckpt.close()


SFT_EXPERIMENT = '''
from jaxrlhf import config as C


def get_config(arg=None):
    return C.ExperimentConfig(
        name="preempted", model=C.ModelSpec(name={model!r}),
        optim=C.OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
        data=C.DataConfig(source={data!r}, batch_size=8, max_length=48, max_prompt_length=24, eval_size=8,
                          use_chat_template=False),
        train=C.TrainConfig(steps=40, save_every=0, eval_every=0, num_samples=0, run_dir={runs!r}),
        algo=C.SFTConfig())
'''


@pytest.mark.slow
def test_jaxrlhf_run_stops_cleanly_on_sigterm_and_resumes(tiny_llama_folder, shared_assets, tmp_path):
    """The command as a scheduler sees it: SIGTERM from outside while it trains -> exit 143 with one line and
    no traceback, a checkpoint at the step it stopped; the same command with --resume finishes the run."""
    import time

    exp = tmp_path / "exp.py"
    exp.write_text(SFT_EXPERIMENT.format(model=str(tiny_llama_folder), runs=str(tmp_path / "runs"),
                                         data=str(shared_assets / "alpaca-seed-tasks" / "seed_tasks.jsonl")))
    cmd = [sys.executable, "-m", "jaxrlhf.cli", "run", str(exp)]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    metrics = tmp_path / "runs" / "preempted" / "metrics.jsonl"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 900
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # eval row 0 + train step 1
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "preempted: SIGTERM received: saved checkpoint step" in err and "--resume" in err
    assert "Traceback" not in err
    saved = Checkpointer(tmp_path / "runs" / "preempted" / "checkpoints").latest_step()
    assert 2 <= saved < 40
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(1, 41))
