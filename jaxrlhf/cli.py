"""Command line: ``jaxrlhf study``, ``jaxrlhf run``, ``jaxrlhf generate``, ``jaxrlhf report``.

    jaxrlhf study experiments/imdb_sentiment_study.py [--arg full] [--only 'dpo-*'] [--dry-run] [--report-only]
    jaxrlhf run experiments/sft_smollm2_seed_tasks.py --config.optim.lr=1e-5 [--resume] [--arg ARG]
    jaxrlhf generate smollm2-135m-instruct --prompt "What is the capital of France?"
    jaxrlhf report runs/a runs/b --out runs/report
    jaxrlhf label pairs.jsonl --out labelled.jsonl [--judge smollm2-135m-instruct] [--limit 500]

Errors: a known bad input (a :class:`jaxrlhf.errors.JaxrlhfError`: config, data, model, checkpoint, mesh,
study, non-finite loss) prints one line ``<kind> error: <message>`` to stderr and exits with status 2
(a preempted run: ``preempted: <message>``, status 143); ``--debug`` (anywhere on the line) prints the
traceback as well. Any other exception is a bug and keeps its traceback. The catalogue: docs/errors.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jaxrlhf.errors import JaxrlhfError, report_error

__all__ = ["main"]


def quiet_logs() -> None:
    """INFO-level run logs; third-party libraries only warnings.

    ``force=True``: by the time a command runs, ``absl.logging`` (imported by orbax) has already called
    ``logging.basicConfig()`` once (a WARNING-level root with the default format), which would make a plain
    ``basicConfig`` a no-op and hide every INFO line of the run.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    for name in ("absl", "orbax", "jax._src", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxrlhf import config as C
    from jaxrlhf.drivers import run_experiment

    quiet_logs()
    cfg = C.load_config(args.experiment, overrides, arg=args.arg)
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


def _study(argv: list[str], debug: bool) -> int:
    from jaxrlhf import config as C
    from jaxrlhf.drivers import run_experiment
    from jaxrlhf.study import study_main

    quiet_logs()
    return study_main(argv, load_study, run_experiment, to_dict=C.to_dict, debug=debug)


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
    from jaxrlhf import config as C
    from jaxrlhf.generate import generate_text
    from jaxrlhf.models.hub import load_pretrained

    quiet_logs()
    pre = load_pretrained(args.model)
    limit = pre.cfg.max_position_embeddings
    if args.max_new_tokens >= limit:
        raise C.ConfigError(f"--max-new-tokens={args.max_new_tokens} leaves no room for a prompt within the "
                            f"model's max_position_embeddings={limit}; use at most {limit - 1}")
    texts = generate_text(pre, pre.tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          use_chat_template=not args.no_chat_template)
    for prompt, text in zip(args.prompt, texts):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(text.strip())
    return 0


def _label(args: argparse.Namespace) -> int:
    from jaxrlhf.judge import label_file

    quiet_logs()
    report = label_file(args.source, args.out, judge=args.judge, split=args.split, limit=args.limit, seed=args.seed,
                        dtype=args.dtype, batch_size=args.batch_size, max_prompt_tokens=args.max_prompt_tokens,
                        max_reply_tokens=args.max_reply_tokens)
    print(f"{report['n']} pairs judged by {args.judge} -> {report['out']} (report: {report['out']}.report.json)")
    print(f"position-bias rate (verdict flips with the order): {report['position_bias_rate']:.3f} "
          f"± {report['position_bias_rate_sem']:.3f}")
    if "agreement" in report:
        print(f"agreement with the human labels ({report['n_human']} pairs): {report['agreement']:.3f} "
              f"± {report['agreement_sem']:.3f}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from jaxrlhf.report import write_report

    path = write_report(args.runs, args.out)
    print(f"report written to {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrlhf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of a known error too (also accepted after the sub-command)")
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
    p_lab = sub.add_parser("label", help="RLAIF: label preference pairs with a model judge (jaxrlhf.judge)")
    p_lab.add_argument("source", help="pairs (HH dialogues, {prompt, chosen, rejected}) or {prompt, completions}")
    p_lab.add_argument("--out", required=True, help="output JSONL ({prompt, chosen, rejected, judge_prob, ...})")
    p_lab.add_argument("--judge", default="smollm2-135m-instruct",
                       help="any decoder: short name, folder, .gguf or hub id")
    p_lab.add_argument("--split", default="train")
    p_lab.add_argument("--limit", type=int, default=0, help="judge a seeded sample of this many rows (0 = all)")
    p_lab.add_argument("--seed", type=int, default=0)
    p_lab.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p_lab.add_argument("--batch-size", type=int, default=8)
    p_lab.add_argument("--max-prompt-tokens", type=int, default=192, help="conversation tokens kept (the end)")
    p_lab.add_argument("--max-reply-tokens", type=int, default=96, help="tokens kept of each reply (the start)")
    p_rep = sub.add_parser("report", help="compare runs side by side (table + plots)")
    p_rep.add_argument("runs", nargs="+")
    p_rep.add_argument("--out", default="runs/report")
    return parser


def _dispatch(argv: list[str], debug: bool) -> int:
    if argv[:1] == ["study"]:  # its own front end: jaxrlhf.study.study_main
        return _study(argv[1:], debug)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "run":
        return _run(args, rest)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.command == "generate":
        return _generate(args)
    if args.command == "label":
        return _label(args)
    return _report(args)


def main(argv: list[str] | None = None) -> int:
    """The ``jaxrlhf`` command (see the module docstring); ``argv`` defaults to ``sys.argv[1:]``.

    ``--debug`` may stand anywhere (before or after the sub-command); it is removed before the
    sub-command parses its arguments.

    Returns:
      The process exit status: 0 = success, 1 = a study with a failed arm, 2 = a known bad input
      (:data:`~jaxrlhf.errors.EXIT_USER_ERROR`; also argparse's usage errors), 143 = preempted
      (:data:`~jaxrlhf.errors.EXIT_PREEMPTED`).
    Raises:
      Any exception that is not a :class:`~jaxrlhf.errors.JaxrlhfError` (a bug: its traceback is kept).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    from jaxrlhf.host_memory import reuse_host_memory

    reuse_host_memory()  # before JAX starts its CPU backend: XLA's step buffers stay resident (host_memory.py)
    try:
        from jaxrlhf.distributed import initialize_from_env

        initialize_from_env()  # a multi-process launch (TPU pod, srun, JAXRLHF_* env) joins jax.distributed here
        return _dispatch(argv, debug)
    except JaxrlhfError as e:
        return report_error(e, debug)


if __name__ == "__main__":
    sys.exit(main())
