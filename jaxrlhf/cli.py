"""Command line: ``jaxrlhf study``, ``jaxrlhf run``, ``jaxrlhf generate``, ``jaxrlhf report``.

    jaxrlhf study experiments/imdb_sentiment_study.py [--arg full] [--only 'dpo-*'] [--dry-run] [--report-only]
    jaxrlhf run experiments/sft_smollm2_seed_tasks.py --config.optim.lr=1e-5 [--resume] [--arg ARG]
    jaxrlhf generate smollm2-135m-instruct --prompt "What is the capital of France?"
    jaxrlhf report runs/a runs/b --out runs/report
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main"]


def quiet_logs() -> None:
    """INFO-level run logs; third-party libraries only warnings."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("absl", "orbax", "jax._src", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxrlhf import config as C
    from jaxrlhf.drivers import run_experiment

    quiet_logs()
    try:
        cfg = C.load_config(args.experiment, overrides, arg=args.arg)
    except C.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    summary = run_experiment(cfg, resume=args.resume)
    _print_summary(summary)
    return 0


def load_study(path: str, arg: str | None):
    """The :class:`jaxrlhf.study.Study` of a study file (it defines ``get_study(arg=None)``).

    Raises:
      ConfigError: the file does not exist or defines no ``get_study``.
    """
    from jaxrlhf import config as C

    module = C.load_experiment_module(path, require="get_study")
    return module.get_study(arg)


def _study(argv: list[str]) -> int:
    from jaxrlhf import config as C
    from jaxrlhf.drivers import run_experiment
    from jaxrlhf.study import study_main

    quiet_logs()
    return study_main(argv, load_study, run_experiment, to_dict=C.to_dict)


def _print_summary(summary: dict) -> None:
    print(f"\nrun directory: {summary.get('run_dir')}")
    for key in ("train_loss_first", "train_loss_last"):
        if summary.get(key) is not None:
            print(f"{key}: {summary[key]:.4f}")
    for key in ("eval_before", "eval_after"):
        if summary.get(key):
            vals = {k: round(v, 4) for k, v in summary[key].items() if isinstance(v, float)}
            print(f"{key}: {vals}")
    before = summary.get("samples_before") or []
    after = summary.get("samples_after") or []
    for i, s in enumerate(after):
        print(f"\n--- sample {i} prompt:\n{s['prompt'].strip()[-400:]}")
        if i < len(before):
            print(f"--- before:\n{before[i]['completion'].strip()}")
        print(f"--- after:\n{s['completion'].strip()}")


def _generate(args: argparse.Namespace) -> int:
    from jaxrlhf.generate import generate_text
    from jaxrlhf.models.hub import load_pretrained

    quiet_logs()
    pre = load_pretrained(args.model)
    texts = generate_text(pre, pre.tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          use_chat_template=not args.no_chat_template)
    for prompt, text in zip(args.prompt, texts):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(text.strip())
    return 0


def _report(args: argparse.Namespace) -> int:
    from jaxrlhf.report import write_report

    path = write_report(args.runs, args.out)
    print(f"report written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``jaxrlhf`` command (see the module docstring); ``argv`` defaults to ``sys.argv[1:]``.

    Returns:
      The process exit status (0 = success).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    from jaxrlhf.host_memory import reuse_host_memory

    reuse_host_memory()  # before JAX starts its CPU backend: XLA's step buffers stay resident (host_memory.py)
    if argv[:1] == ["study"]:  # its own front end: jaxrlhf.study.study_main
        return _study(argv[1:])
    parser = argparse.ArgumentParser(prog="jaxrlhf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("study", help="run a comparison study: stages, then arms x seeds, one report "
                                 "(jaxrlhf study FILE --help)")
    p_run = sub.add_parser("run", help="run an experiment file (overrides: --config.a.b=value)")
    p_run.add_argument("experiment")
    p_run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p_run.add_argument("--arg", default=None, help="passed to get_config(arg)")
    p_gen = sub.add_parser("generate", help="sample text from a model")
    p_gen.add_argument("model", help="short name, HF folder, .gguf file or hub id")
    p_gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p_gen.add_argument("--max-new-tokens", type=int, default=64)
    p_gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p_gen.add_argument("--top-k", type=int, default=0)
    p_gen.add_argument("--top-p", type=float, default=1.0)
    p_gen.add_argument("--seed", type=int, default=0)
    p_gen.add_argument("--no-chat-template", action="store_true")
    p_rep = sub.add_parser("report", help="compare runs side by side (table + plots)")
    p_rep.add_argument("runs", nargs="+")
    p_rep.add_argument("--out", default="runs/report")

    args, rest = parser.parse_known_args(argv)
    if args.command == "run":
        return _run(args, rest)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.command == "generate":
        return _generate(args)
    return _report(args)


if __name__ == "__main__":
    sys.exit(main())
