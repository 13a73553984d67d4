"""End-to-end runs through the experiment machinery: resume equals uninterrupted, run dir contents,
report."""

import json

import numpy as np
import pytest

from jaxrlhf import config as C
from jaxrlhf.drivers import run_experiment


def tiny_sft_config(folder, source, run_dir, name, steps=4, **train):
    return C.ExperimentConfig(
        name=name,
        model=C.ModelSpec(name=str(folder)),
        mesh=C.MeshConfig(data=-1, fsdp=2, tensor=1),
        optim=C.OptimConfig(lr=1e-3, warmup_steps=1, schedule="cosine"),
        data=C.DataConfig(source=source, batch_size=8, max_length=64, max_prompt_length=32, eval_size=4,
                          use_chat_template=False, limit=40),
        train=C.TrainConfig(steps=steps, save_every=2, eval_every=0, num_samples=2, sample_max_new_tokens=4,
                            run_dir=str(run_dir), **train),
        algo=C.SFTConfig())


def train_lines(run_dir, name):
    lines = [json.loads(x) for x in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in ("step_time_s", "tokens_per_s", "split")}
            for m in lines if m["split"] == "train"]


def test_resume_continues_to_the_same_metrics(tiny_llama_folder, shared_assets, tmp_path, monkeypatch):
    source = str(shared_assets / "alpaca-seed-tasks" / "seed_tasks.jsonl")
    summary = run_experiment(tiny_sft_config(tiny_llama_folder, source, tmp_path, "straight"))
    # Interrupted after step 3 (the last checkpoint is step 2), then resumed to the end.
    run_experiment(tiny_sft_config(tiny_llama_folder, source, tmp_path, "resumed", stop_after=3))
    assert [m["step"] for m in train_lines(tmp_path, "resumed")] == [1, 2, 3]
    run_experiment(tiny_sft_config(tiny_llama_folder, source, tmp_path, "resumed"), resume=True)
    straight, resumed = train_lines(tmp_path, "straight"), train_lines(tmp_path, "resumed")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert a == pytest.approx(b, rel=1e-6), (a, b)
    # Loss moved: the run really trained.
    assert straight[-1]["loss"] != straight[0]["loss"]
    # An attempt that stopped before its first checkpoint left log lines; the resumed run starts from
    # scratch and its files hold each step once, as the straight run's.
    run_experiment(tiny_sft_config(tiny_llama_folder, source, tmp_path, "early", stop_after=1))
    assert [m["step"] for m in train_lines(tmp_path, "early")] == [1]
    run_experiment(tiny_sft_config(tiny_llama_folder, source, tmp_path, "early"), resume=True)
    lines = lambda n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [(m["step"], m["split"]) for m in lines("early")] == [(m["step"], m["split"]) for m in lines("straight")]
    for a, b in zip(train_lines(tmp_path, "straight"), train_lines(tmp_path, "early")):
        assert a == pytest.approx(b, rel=1e-6), (a, b)
    tags = [json.loads(x)["tag"] for x in (tmp_path / "early" / "samples.jsonl").read_text().splitlines()]
    assert tags == ["before", "before", "after", "after"]
    run = tmp_path / "straight"
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 1e-3
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["tag"] for s in samples} == {"before", "after"}
    assert any((run / "tb").iterdir())
    # The finished policy is exported as a Hugging Face folder that reloads to the trained weights.
    from flax import nnx

    from jaxrlhf.models.hf import load_hf_folder

    model, _ = load_hf_folder(run / "hf")
    trained = nnx.state(model)
    assert (run / "hf" / "tokenizer.json").exists() and (run / "hf" / "config.json").exists()
    for name in ("embed", "final_norm"):
        np.testing.assert_array_equal(np.asarray(trained[name][...]),
                                      np.asarray(summary["state"].params[name][...]))
    np.testing.assert_array_equal(np.asarray(trained["layers"]["q"][...]),
                                  np.asarray(summary["state"].params["layers"]["q"][...]))


def test_refuses_to_overwrite_finished_checkpoints(tiny_llama_folder, shared_assets, tmp_path):
    source = str(shared_assets / "alpaca-seed-tasks" / "seed_tasks.jsonl")
    cfg = tiny_sft_config(tiny_llama_folder, source, tmp_path, "once", steps=2)
    run_experiment(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        run_experiment(tiny_sft_config(tiny_llama_folder, source, tmp_path, "once", steps=2))
    assert (tmp_path / "once" / "checkpoints" / "2").is_dir()


def test_report_compares_runs(tmp_path):
    from jaxrlhf.report import write_report

    for name, lr, losses in (("a", 0.1, [3.0, 2.0]), ("b", 0.3, [3.0, 1.5])):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"name": name, "optim": {"lr": lr}}))
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "split": "train", "loss": v}) + "\n" for i, v in enumerate(losses)))
    path = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "rep")
    text = path.read_text()
    assert "optim.lr=0.1" in text and "optim.lr=0.3" in text
    row = next(line for line in text.splitlines() if line.startswith("| train/loss"))
    assert row.split("|")[2].strip() == "2" and row.split("|")[3].strip() == "1.5"
    assert (tmp_path / "rep" / "train_loss.png").stat().st_size > 1000
