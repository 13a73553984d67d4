"""The catalogue of bad inputs (docs/errors.md), each tried at the command line, in-process.

Every entry runs ``jaxrlhf.cli.main([...])`` and checks what a user sees: the exit status (2 for a known
error), the one line ``<kind> error: <message>`` on stderr with the part of the message that names the
field or file and the fix, and no traceback. The expected texts are written out here by hand (the
reference), not read from the code. About half of the entries fail before a model is loaded; the others
load the tiny Llama of ``tests/conftest.py`` (well under a second each).

Also: ``--debug`` prints the traceback of a known error; an unexpected error keeps its traceback.
"""

import json
import pathlib
import re
import sys

import numpy as np
import pytest

from jaxrlhf.cli import main
from jaxrlhf.errors import EXIT_USER_ERROR

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


# ------------------------------------------------------------------------------------------ set-up

@pytest.fixture(autouse=True)
def _no_root_stream_handler(monkeypatch):
    """``jaxrlhf.cli.quiet_logs`` calls ``logging.basicConfig``, whose handler would keep this test's
    (captured, soon closed) stderr for every later test; pytest's own log capture is enough here."""
    import logging

    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)


EXPERIMENT = '''
from jaxrlhf import config as C


def get_config(arg=None):
    algo = {{"sft": C.SFTConfig(), "dpo": C.DPOConfig()}}[arg or "sft"]
    return C.ExperimentConfig(
        name="tiny", model=C.ModelSpec(name={model!r}), mesh=C.MeshConfig(data=-1, fsdp=1, tensor=1),
        optim=C.OptimConfig(lr=1e-3, warmup_steps=0),
        data=C.DataConfig(source={data!r}, batch_size=8, max_length=64, max_prompt_length=32,
                          use_chat_template=False),
        train=C.TrainConfig(steps=2, save_every=0, eval_every=0, num_samples=0, run_dir={runs!r}),
        algo=algo)
'''


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _small_vocab_copy(folder, source, vocab_size):
    """``source`` (the tiny Llama with GPT-2's tokenizer) with only the first ``vocab_size`` embedding rows
    (``config.json`` says so too): a model whose vocabulary is smaller than its tokenizer's."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:vocab_size].copy()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _q8_1_gguf(path):
    """A GGUF file whose one tensor is stored as Q8_1, a type the gguf package cannot dequantise."""
    import gguf

    _, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, type_size), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _checkpoint_of_another_model(run_dir, folder):
    """``run_dir/checkpoints/1``: the train state of the model in ``folder`` (1000-token vocabulary), as an
    SFT run of ``EXPERIMENT`` would save it (same optimizer, so only the shapes differ)."""
    from flax import nnx

    from jaxrlhf import config as C
    from jaxrlhf.checkpoint import Checkpointer
    from jaxrlhf.models.hf import load_hf_folder
    from jaxrlhf.train_state import create_train_state, make_optimizer

    model, _ = load_hf_folder(folder)
    state = create_train_state(nnx.split(model)[1], make_optimizer(C.OptimConfig(lr=1e-3, warmup_steps=0), 2))
    ckpt = Checkpointer(run_dir / "checkpoints")
    ckpt.save(1, state, {"epoch": 0, "index": 1}, {})
    ckpt.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llama_folder):
    """Files for the catalogue: experiment files, data files, odd models, a checkpoint of another model."""
    d = tmp_path_factory.mktemp("cli_errors")
    sft = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(16)]
    pairs = [{"prompt": f"Say {i}.", "chosen": f"{i}.", "rejected": f"{i + 1}."} for i in range(16)]
    files = {
        "sft": _jsonl(d / "sft.jsonl", sft),
        "few": _jsonl(d / "few.jsonl", sft[:4]),
        # GPT-2 BPE: "word" and each " word" are one token: a prompt of 40 tokens, a response of 10 (+ EOS)
        "long": _jsonl(d / "long.jsonl",
                       [{"prompt": " ".join(["word"] * 40), "response": " ".join(["answer"] * 10)}] * 16),
        "no_prompt": _jsonl(d / "no_prompt.jsonl", [{"question": "q", "answer": "a"}] * 16),
        "pairs_missing": _jsonl(d / "pairs_missing.jsonl",
                                [pairs[0], {"prompt": "p", "chosen": "c"}] + pairs[2:]),
        "pairs_empty_chosen": _jsonl(d / "pairs_empty_chosen.jsonl",
                                     pairs[:2] + [dict(pairs[2], chosen="")] + pairs[3:]),
        "pairs_empty_prompt": _jsonl(d / "pairs_empty_prompt.jsonl", [dict(pairs[0], prompt="  ")] + pairs[1:]),
        "bad": d / "bad.jsonl",
        "empty": d / "empty.jsonl",
        "blank": d / "blank.jsonl",
        "header": d / "header.csv",
        "txt": d / "data.txt",
        "bin": d / "weights.bin",
        "missing": d / "nope.jsonl",
    }
    files["bad"].write_text(json.dumps(sft[0]) + "\n" + json.dumps(sft[1]) + "\n" + '{"prompt": "x", "response"\n')
    files["empty"].write_text("")
    files["blank"].write_text("\n\n")
    files["header"].write_text("prompt,response\n")
    files["txt"].write_text("some text\n")
    files["bin"].write_bytes(b"\0" * 16)
    exp = d / "tiny.py"
    exp.write_text(EXPERIMENT.format(model=str(tiny_llama_folder), data=str(files["sft"]), runs=str(d / "runs")))
    small_vocab = _small_vocab_copy(d / "llama_vocab1000", tiny_llama_folder, vocab_size=1000)
    _checkpoint_of_another_model(d / "runs" / "has_ckpt", small_vocab)
    return {"dir": d, "exp": str(exp), "tiny": str(tiny_llama_folder), "vocab1000": str(small_vocab),
            "q8_1": str(_q8_1_gguf(d / "q8_1.gguf")), **{k: str(v) for k, v in files.items()}}


# ------------------------------------------------------------------------------------------ the catalogue

RUN = ["run", "{exp}"]
SFT = str(EXPERIMENTS / "sft_smollm2_seed_tasks.py")
GRPO = str(EXPERIMENTS / "grpo_imdb_smollm2.py")
STUDY = str(EXPERIMENTS / "imdb_sentiment_study.py")

# (id, argv (formatted with env), kind, the key parts of the message). The ids are docs/errors.md's.
CATALOGUE = [
    # ---- the command line and the config (no model is loaded)
    ("unknown-field", ["run", SFT, "--config.optim.lrr=1e-5"], "config",
     ["--config.optim.lrr: optim has no field 'lrr'; valid fields: [", "'lr'"]),
    ("wrong-type", ["run", SFT, "--config.train.steps=1.5"], "config",
     ["--config.train.steps='1.5': expected an integer"]),
    ("not-a-choice", ["run", SFT, "--config.optim.schedule=step"], "config",
     ["--config.optim.schedule='step': must be one of ['cosine', 'linear', 'constant']"]),
    ("not-a-bool", ["run", SFT, "--config.data.packing=maybe"], "config",
     ["--config.data.packing='maybe': expected true or false"]),
    ("not-an-override", ["run", SFT, "--lr=1e-5"], "config",
     ["unrecognised argument '--lr=1e-5'; overrides look like --config.optim.lr=1e-5"]),
    ("no-experiment-file", ["run", "{dir}/nope.py"], "config", ["experiment file '", "nope.py' does not exist"]),
    ("study-file-to-run", ["run", STUDY], "config",
     ["must define get_config(arg=None) (it defines get_study: run it with `jaxrlhf study`)"]),
    ("invalid-value", ["run", SFT, "--config.optim.lr=0"], "config", ["optim.lr must be > 0, got 0.0"]),
    ("reward-not-importable", ["run", GRPO, "--config.algo.reward.functions=no_such_module:score"], "config",
     ["algo.reward.functions entry 'no_such_module:score' does not import (ModuleNotFoundError",
      "give 'package.module:callable'"]),
    ("reward-not-callable", ["run", GRPO, "--config.algo.reward.functions=jaxrlhf.rewards:no_such_reward"], "config",
     ["algo.reward.functions entry 'jaxrlhf.rewards:no_such_reward' names no callable"]),
    # ---- the mesh (checked when the run starts, before the model is loaded)
    ("more-devices-than-present", RUN + ["--config.mesh.data=16"], "mesh",
     ["mesh asks for 16 devices (data=16 x fsdp=1 x tensor=1) but only 8 are present"]),
    ("two-free-mesh-axes", RUN + ["--config.mesh.fsdp=-1"], "mesh", ["mesh: at most one axis may be -1"]),
    ("mesh-does-not-divide-batch", RUN + ["--config.data.batch_size=6"], "config",
     [("data.batch_size=6 (micro-batch 6 after optim.grad_accum_steps=1) is not divisible by mesh data*fsdp=8; "
       "use a multiple of 8")]),
    # ---- the model (4 heads, 2 kv heads, 256 positions, GPT-2's 50257 tokens)
    ("mesh-does-not-divide-heads", RUN + ["--config.mesh.data=2", "--config.mesh.tensor=4"], "mesh",
     ["mesh.tensor=4 does not divide the model's num_kv_heads=2", "use mesh.tensor in [1, 2]"]),
    ("unknown-model-offline", RUN + ["--config.model.name=someorg/no-such-model"], "model",
     ["'someorg/no-such-model' is not a local folder or .gguf file, not a registered name", "HF_HUB_OFFLINE"]),
    ("model-path-missing", RUN + ["--config.model.name={dir}/no_model"], "model",
     ["no_model' does not exist (and is not a registered name"]),
    ("not-a-gguf-file", RUN + ["--config.model.name={bin}"], "model", ["weights.bin is a file but not a .gguf file"]),
    ("gguf-unsupported-quantisation", RUN + ["--config.model.name={q8_1}"], "model",
     [("holds tensors quantised as Q8_1 (e.g. tensor 'token_embd.weight'), which the gguf package cannot "
       "dequantise; supported: ['F32', 'F16', "), "'Q8_0'"]),
    ("tokenizer-model-vocab-mismatch", RUN + ["--config.model.name={vocab1000}"], "model",
     ["the tokenizer has 50257 tokens but the model's vocab_size is 1000"]),
    ("context-longer-than-model", RUN + ["--config.data.max_length=512"], "config",
     ["data.max_length = 512 exceeds the model's max_position_embeddings=256; lower it"]),
    ("generate-no-room-for-prompt", ["generate", "{tiny}", "--prompt", "hi", "--max-new-tokens", "300"], "config",
     ["--max-new-tokens=300 leaves no room for a prompt within the model's max_position_embeddings=256"]),
    # ---- the data (read after the model)
    ("data-file-missing", RUN + ["--config.data.source={missing}"], "data",
     ["local data path '", "nope.jsonl' does not exist"]),
    ("broken-jsonl-line", RUN + ["--config.data.source={bad}"], "data",
     ["bad.jsonl, line 3: not valid JSON (Expecting ':' delimiter"]),
    ("empty-file", RUN + ["--config.data.source={empty}"], "data", ["empty.jsonl' is empty"]),
    ("blank-file", RUN + ["--config.data.source={blank}"], "data", ["blank.jsonl' holds no rows"]),
    ("csv-header-only", RUN + ["--config.data.source={header}"], "data", ["header.csv' holds no rows"]),
    ("unknown-file-type", RUN + ["--config.data.source={txt}"], "data", ["unknown file type for '", "data.txt'"]),
    ("eval-holds-out-everything", RUN + ["--config.data.eval_size=16"], "data",
     ["data.eval_size=16 holds out every row of data.source=", "(16 rows)"]),
    ("sft-row-without-prompt", RUN + ["--config.data.source={no_prompt}"], "data",
     ["row 0 has none of 'prompt', 'instruction' or 'messages'", "(row keys: ['answer', 'question'])"]),
    ("preference-row-without-rejected", RUN + ["--arg", "dpo", "--config.data.source={pairs_missing}"], "data",
     ["row 1 has no 'rejected'; preference rows need {prompt, chosen, rejected}"]),
    ("preference-empty-chosen", RUN + ["--arg", "dpo", "--config.data.source={pairs_empty_chosen}"], "data",
     ["row 2: 'chosen' is empty; fill it in or remove the row"]),
    ("preference-empty-prompt", RUN + ["--arg", "dpo", "--config.data.source={pairs_empty_prompt}"], "data",
     ["row 0: 'prompt' is empty"]),
    ("row-needs-truncation", RUN + ["--config.data.source={long}", "--config.data.on_overflow=error"], "data",
     ["row 0 needs truncation: prompt 40 tokens (max_prompt_length=32), longest response 11 tokens, max_length=64",
      "on_overflow='truncate' or 'drop'"]),
    ("all-rows-dropped-by-truncation", RUN + ["--config.data.source={long}", "--config.data.on_overflow=drop"],
     "data", ["all 16 SFT rows were dropped by truncation {'prompt_too_long': 16}",
              "set data.on_overflow='truncate'"]),
    ("too-few-rows-for-a-batch", RUN + ["--config.data.source={few}"], "data",
     ["4 examples give no batch of batch_size=8", "data.batch_size"]),
    # ---- checkpoints
    ("run-folder-holds-checkpoints", RUN + ["--config.name=has_ckpt"], "checkpoint",
     ["has_ckpt/checkpoints already holds checkpoints; pass --resume to continue"]),
    ("checkpoint-of-another-shape", RUN + ["--config.name=has_ckpt", "--resume"], "checkpoint",
     ["has shape (1000, 32) but the model expects (50257, 32)", "model.name"]),
    # ---- other commands
    ("report-not-a-run", ["report", "{dir}/not_a_run"], "data",
     ["not_a_run/metrics.jsonl not found: is ", "a run directory"]),
    ("study-only-matches-nothing", ["study", STUDY, "--only", "nothing*"], "study",
     ["--only 'nothing*' matches no arm; arms: "]),
    ("study-file-missing", ["study", "{dir}/no_study.py"], "config",
     ["experiment file '", "no_study.py' does not exist"]),
]


def test_catalogue_has_at_least_25_entries_with_distinct_ids():
    ids = [c[0] for c in CATALOGUE]
    assert len(ids) >= 25 and len(set(ids)) == len(ids)


def test_docs_list_every_catalogue_entry():
    """docs/errors.md shows every entry of the catalogue (by its id)."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    missing = [c[0] for c in CATALOGUE if f"`{c[0]}`" not in text]
    assert not missing, f"docs/errors.md lacks {missing}"


def _error_line(err: str, kind: str) -> str:
    """The one line of ``err`` from ``<kind> error: `` to its end (a progress bar that the run left open
    may stand before it on the same line)."""
    lines = [ln[ln.index(f"{kind} error: "):] for ln in re.split(r"[\r\n]+", err) if f"{kind} error: " in ln]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv, kind, expected", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_bad_input_prints_one_line(env, argv, kind, expected, capsys):
    status = main([a.format(**env) for a in argv])
    err = capsys.readouterr().err
    assert status == EXIT_USER_ERROR == 2, err
    assert "Traceback" not in err, err
    line = _error_line(err, kind)
    for part in expected:
        assert part in line, (part, line)


@pytest.mark.slow  # compiles the SFT step (~15 s on 2 cores); the loop's own tests cover the guard
def test_non_finite_loss_stops_the_run_with_one_line(env, capsys):
    """The NaN guard: lr=1e30 makes the first Adam update ~1e30 per weight, so step 2's squares overflow
    float32; the run stops at step 2 (no checkpoint yet: save_every=0) and says what to lower."""
    status = main(["run", env["exp"], "--config.name=nan", "--config.optim.lr=1e30"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    line = _error_line(err, "training")
    assert re.search(r"non-finite (loss|grad_norm) = (nan|inf|-inf) at step 2; ", line), line
    assert "no checkpoint was written before it. Lower optim.lr" in line, line


def test_debug_prints_the_traceback_too(env, capsys):
    """``--debug`` before or after the sub-command: the traceback, then the same one line; status 2."""
    for argv in (["--debug", "run", SFT, "--config.optim.lrr=1"], ["run", SFT, "--debug", "--config.optim.lrr=1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):"), err
        assert "jaxrlhf.config.ConfigError: --config.optim.lrr: optim has no field 'lrr'" in err
        assert err.strip().splitlines()[-1].startswith("config error: --config.optim.lrr: optim has no field 'lrr'")


def test_unexpected_error_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """A bug (here: a report writer that divides by zero) is not a known error: ``main`` lets the very
    exception through with its traceback (Python prints it and exits with 1), and prints no one-liner."""
    import jaxrlhf.report

    def broken(runs, out):
        return 1 / 0

    monkeypatch.setattr(jaxrlhf.report, "write_report", broken)
    with pytest.raises(ZeroDivisionError) as info:
        main(["report", str(tmp_path)])
    assert info.traceback[-1].name == "broken"  # raised where it happened, not re-wrapped
    assert " error: " not in capsys.readouterr().err


def test_cli_logs_show_info_lines_after_absl_configured_the_root():
    """``absl.logging`` (imported by orbax) calls ``logging.basicConfig()`` on its first log call: the root
    logger is then WARNING with a handler, and a plain ``basicConfig(level=INFO)`` is a no-op. The CLI's
    ``quiet_logs`` must still show the run's INFO lines and keep third-party INFO quiet."""
    import subprocess

    code = ("import logging\n"
            "from absl import logging as absl_logging\n"
            "absl_logging.vlog(1, 'absl configures the root here')\n"
            "assert logging.getLogger().handlers, 'absl did not configure the root: the test has no premise'\n"
            "from jaxrlhf.cli import quiet_logs\n"
            "quiet_logs()\n"
            "logging.getLogger('jaxrlhf.loop').info('run line')\n"
            "logging.getLogger('orbax').info('orbax line')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "run line" in out.stderr.splitlines(), out.stderr
    assert "orbax line" not in out.stderr, out.stderr
