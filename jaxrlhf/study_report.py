"""The study report: ``runs/<study>/report.md`` with a table over arm groups (seeds pooled) and PNG plots.

``write_study_report(study_dir)`` reads ``study_dir/study.json`` (written by :mod:`jaxrlhf.study`) and each
arm's run folder::

    arms/<arm>/status.json     {"status": "done"|"failed"|"running", "error_type", "error", ...}
    arms/<arm>/metrics.jsonl   one JSON per line: {"step": int, "split": "train"|"eval", <metric>: float, ...}
                               (rows of one split and step are merged; a later line wins)
    arms/<arm>/samples.jsonl   {"step": int, "tag": str, "prompt": str, "completion": str, ...}

and writes next to ``report.md``: ``frontier.png`` (eval ``gold`` against ``kl``, one colour per method,
each group's path over its eval points averaged over seeds, final point starred), ``curves.png`` (train
``loss`` and eval ``gold`` against step, one column per method) and ``hacking.png`` (for reward-hacking
arms: proxy and gold reward minus their step-0 value against sqrt(KL), with the Gao et al. (2022) fit
R(d) = d (alpha - beta log d), d = sqrt(KL(pi || pi_ref)) in nats). The series behind each plot come
from a pure function (:func:`frontier_series`, :func:`curve_series`, :func:`hacking_series`).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_METRICS", "default_is_hacking", "load_arm_records", "summary_table", "frontier_series",
    "curve_series", "hacking_series", "sample_rows", "stage_rows", "write_study_report",
]

DEFAULT_METRICS = ("gold", "proxy", "vader", "kl", "win_rate", "length", "distinct_1", "distinct_2",
                   "safety_expected_max", "safety_flagged_rate")  # jaxrlhf.safety (when an arm logs them)


def default_is_hacking(rec: dict) -> bool:
    """An arm optimises a proxy reward (the reward-hacking arm): method name or an hparam says "proxy"."""
    hp = rec.get("hparams") or {}
    return "proxy" in rec["method"] or "proxy" in hp or hp.get("reward") == "proxy"


def read_jsonl(path: pathlib.Path) -> list[dict]:
    """The JSON objects of a .jsonl file ([] when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rows_by_step(metrics: list[dict], split: str) -> dict[int, dict]:
    """``{step: merged row}`` over rows of ``split`` (a resumed run may log a step twice: the later wins)."""
    out: dict[int, dict] = {}
    for row in metrics:
        if row.get("split", "train") == split:
            out.setdefault(int(row["step"]), {}).update(row)
    return dict(sorted(out.items()))


def load_arm_records(study_dir: str | pathlib.Path, arms: Sequence[Any] | None = None) -> list[dict]:
    """One record per arm: ``{"name", "method", "seed", "hparams", "group", "dir" (absolute Path),
    "status" (status.json or None), "metrics" (list), "samples" (list)}``.

    ``arms``: :class:`jaxrlhf.study.Arm` objects or study.json arm records; None reads study.json.
    """
    study_dir = pathlib.Path(study_dir)
    if arms is None:
        arms = json.loads((study_dir / "study.json").read_text())["arms"]
    records = []
    for a in arms:
        rec = dict(a) if isinstance(a, dict) else {
            "name": a.name, "method": a.method, "seed": a.seed, "hparams": dict(a.hparams),
            "group": a.group_label}
        folder = study_dir / rec.get("dir", f"arms/{rec['name']}")
        status_file = folder / "status.json"
        rec.update(dir=folder, status=json.loads(status_file.read_text()) if status_file.exists() else None,
                   metrics=read_jsonl(folder / "metrics.jsonl"), samples=read_jsonl(folder / "samples.jsonl"))
        rec.setdefault("group", rec["name"])
        records.append(rec)
    return records


def _done(rec: dict) -> bool:
    return (rec["status"] or {}).get("status") == "done"


def group_records(records: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """``[(group label, method, [records])]`` pooling seeds of one method + hparams, in first-seen order."""
    groups: dict[tuple[str, str], tuple[str, str, list[dict]]] = {}
    for rec in records:
        key = (rec["method"], json.dumps(rec["hparams"], sort_keys=True, default=str))
        groups.setdefault(key, (rec.get("group") or rec["name"], rec["method"], []))[2].append(rec)
    return list(groups.values())


def final_eval(rec: dict) -> dict:
    """The eval row with the largest step ({} when the arm logged none)."""
    rows = rows_by_step(rec["metrics"], "eval")
    return rows[max(rows)] if rows else {}


def summary_table(records: list[dict], metrics: Sequence[str] = DEFAULT_METRICS) -> list[dict]:
    """Per group: ``{"group", "method", "n", "failed": [names], "not_run": [names],
    "stats": {metric: (mean, sample std (ddof=1; nan for n=1), n)}}`` over the done seeds' final evals."""
    out = []
    for label, method, recs in group_records(records):
        finals = [final_eval(r) for r in recs if _done(r)]
        stats = {}
        for m in metrics:
            vals = np.array([f[m] for f in finals if isinstance(f.get(m), (int, float))], dtype=np.float64)
            if vals.size:
                stats[m] = (float(vals.mean()), float(vals.std(ddof=1)) if vals.size > 1 else math.nan,
                            int(vals.size))
        out.append({"group": label, "method": method, "n": len(finals), "stats": stats,
                    "failed": [r["name"] for r in recs if (r["status"] or {}).get("status") == "failed"],
                    "not_run": [r["name"] for r in recs if r["status"] is None
                                or r["status"].get("status") == "running"]})
    return out


def _mean_path(recs: list[dict], split: str, keys: Sequence[str]) -> tuple[list[int], dict[str, np.ndarray]]:
    """Steps where every done seed logged all ``keys`` (in ``split``) and the seed-mean of each key."""
    per_seed = [rows_by_step(r["metrics"], split) for r in recs if _done(r)]
    if not per_seed:
        return [], {}
    steps = sorted(set.intersection(*[{s for s, row in rows.items()
                                       if all(isinstance(row.get(k), (int, float)) for k in keys)}
                                      for rows in per_seed]))
    return steps, {k: np.array([np.mean([rows[s][k] for rows in per_seed]) for s in steps]) for k in keys}


def frontier_series(records: list[dict], x: str = "kl", y: str = "gold") -> dict[str, list[dict]]:
    """``{method: [{"group", "steps", "x", "y"}]}``: each group's eval path, seed-mean at each step."""
    out: dict[str, list[dict]] = {}
    for label, method, recs in group_records(records):
        steps, means = _mean_path(recs, "eval", (x, y))
        if steps:
            out.setdefault(method, []).append({"group": label, "steps": steps, "x": means[x], "y": means[y]})
    return out


def curve_series(records: list[dict], split: str, metric: str) -> dict[str, dict[str, tuple]]:
    """``{method: {group: (steps, seed-mean of metric)}}`` for learning curves."""
    out: dict[str, dict[str, tuple]] = {}
    for label, method, recs in group_records(records):
        steps, means = _mean_path(recs, split, (metric,))
        if steps:
            out.setdefault(method, {})[label] = (steps, means[metric])
    return out


def hacking_series(records: list[dict], proxy: str = "proxy", gold: str = "gold", kl: str = "kl",
                   is_hacking: Callable[[dict], bool] = default_is_hacking) -> dict[str, dict[str, np.ndarray]]:
    """``{group: {"d", "proxy", "gold"}}`` over every (done seed, eval step) of reward-hacking groups:
    ``d = sqrt(max(kl, 0))`` and rewards minus the same seed's step-0 (first eval) value, as in Gao et
    al. (2022), where R(d) is the gain over the initial policy."""
    out = {}
    for label, _, recs in group_records([r for r in records if is_hacking(r)]):
        d, p, g = [], [], []
        for r in recs:
            rows = [row for row in rows_by_step(r["metrics"], "eval").values()
                    if all(isinstance(row.get(k), (int, float)) for k in (proxy, gold, kl))] if _done(r) else []
            for row in rows:
                d.append(math.sqrt(max(row[kl], 0.0)))
                p.append(row[proxy] - rows[0][proxy])
                g.append(row[gold] - rows[0][gold])
        if d:
            out[label] = {"d": np.array(d), "proxy": np.array(p), "gold": np.array(g)}
    return out


def _fit_gao(d: np.ndarray, r: np.ndarray):
    """:func:`jaxrlhf.frontier.fit_gao` of reward gains ``r`` against ``d = sqrt(KL)`` (the RL form
    ``R(d) = d(α − β log d)``, Gao et al. 2022); None where the points do not determine the fit."""
    from jaxrlhf.frontier import fit_gao

    try:
        return fit_gao(np.square(d), r)
    except ValueError:
        return None


def sample_rows(records: list[dict], n_prompts: int = 3) -> list[dict]:
    """Before/after samples of one seed (the first done arm) of each method: ``[{"method", "arm",
    "prompt", "before", "after"}]`` for its first ``n_prompts`` prompts. Before/after are the tags
    ``eval_before``/``eval_after``, else ``before``/``after``, else the smallest/largest sample step."""
    out, seen = [], set()
    for rec in records:
        if rec["method"] in seen or not _done(rec) or not rec["samples"]:
            continue
        seen.add(rec["method"])
        samples = rec["samples"]
        tags = {s.get("tag") for s in samples}
        pair = next(((b, a) for b, a in (("eval_before", "eval_after"), ("before", "after"))
                     if b in tags and a in tags), None)
        if pair:
            before = [s for s in samples if s.get("tag") == pair[0]]
            after = [s for s in samples if s.get("tag") == pair[1]]
        else:
            steps = [s["step"] for s in samples]
            before = [s for s in samples if s["step"] == min(steps)]
            after = [s for s in samples if s["step"] == max(steps)]
        after_by_prompt = {s["prompt"]: s["completion"] for s in after}
        for s in before[:n_prompts]:
            out.append({"method": rec["method"], "arm": rec["name"], "prompt": s["prompt"],
                        "before": s["completion"], "after": after_by_prompt.get(s["prompt"], "")})
    return out


def stage_rows(study_dir: str | pathlib.Path, meta: dict) -> list[dict]:
    """Each finished stage of ``meta["stages"]`` (study.json) with its scalar outputs (numbers and
    booleans; paths and nested values are left out) and wall time, from ``stages/<name>/done.json``:
    ``[{"stage", "wall_s", "outputs": {key: value}}]``, in study order. A stage never run is left out."""
    rows = []
    for st in meta.get("stages", []):
        done = pathlib.Path(study_dir) / "stages" / st["name"] / "done.json"
        if not done.exists():
            continue
        rec = json.loads(done.read_text())
        scalars = {k: v for k, v in sorted((rec.get("outputs") or {}).items())
                   if isinstance(v, int) or (isinstance(v, float) and math.isfinite(v))}  # int includes bool
        rows.append({"stage": st["name"], "wall_s": rec.get("wall_s"), "outputs": scalars})
    return rows


def _cell(text: str, limit: int = 300) -> str:
    text = str(text).strip()
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.replace("|", "\\|").replace("\n", "<br>")


def _fmt_stat(mean: float, std: float) -> str:
    return f"{mean:.4g}" if math.isnan(std) else f"{mean:.4g} ± {std:.3g}"


def _plots(records, out_dir, x, y, loss, proxy, is_hacking) -> tuple[list[str], dict[str, dict]]:
    """Draw the PNGs; returns (file names written, {hacking group: {"proxy": fit, "gold": fit}})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files, fits = [], {}
    methods = list(dict.fromkeys(r["method"] for r in records))
    colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    front = frontier_series(records, x, y)
    if front:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for method, paths in front.items():
            for i, p in enumerate(paths):
                ax.plot(p["x"], p["y"], "-o", color=colour[method], ms=3, alpha=0.8,
                        label=method if i == 0 else None)
                ax.plot(p["x"][-1], p["y"][-1], "*", color=colour[method], ms=12, mec="k", mew=0.5)
                ax.annotate(p["group"], (p["x"][-1], p["y"][-1]), fontsize=6, xytext=(4, 4),
                            textcoords="offset points")
        ax.set(xlabel=f"eval {x}", ylabel=f"eval {y}", title=f"{y} vs {x} (final point starred)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "frontier.png", dpi=110)
        plt.close(fig)
        files.append("frontier.png")
    panels = [("train", loss), ("eval", y)]
    series = {p: curve_series(records, *p) for p in panels}
    if any(series.values()):
        fig, axes = plt.subplots(2, len(methods), figsize=(3.6 * len(methods), 5.6), squeeze=False)
        for j, method in enumerate(methods):
            for i, (split, metric) in enumerate(panels):
                ax = axes[i, j]
                for label, (steps, vals) in series[(split, metric)].get(method, {}).items():
                    ax.plot(steps, vals, "-o", ms=2, label=label)
                ax.set(xlabel="step", title=f"{method}: {split} {metric}")
                ax.grid(alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out_dir / "curves.png", dpi=110)
        plt.close(fig)
        files.append("curves.png")
    hack = hacking_series(records, proxy, y, x, is_hacking)
    if hack:
        fig, axes = plt.subplots(1, len(hack), figsize=(5 * len(hack), 3.8), squeeze=False)
        for ax, (label, s) in zip(axes[0], hack.items()):
            grid = np.linspace(max(s["d"].max(), 1e-6) / 200, max(s["d"].max(), 1e-6), 200)
            fits[label] = {}
            for key, c in (("proxy", "tab:orange"), ("gold", "tab:blue")):
                ax.plot(s["d"], s[key], "o", color=c, ms=3, label=f"{key} (eval points)")
                fit = fits[label][key] = _fit_gao(s["d"], s[key])
                if fit is not None:
                    ax.plot(grid, fit.predict(np.square(grid)), "-", color=c,
                            label=f"{key} fit: α={fit.alpha:.3g}±{fit.alpha_se:.2g}, β={fit.beta:.3g}±{fit.beta_se:.2g}")
            ax.set(xlabel=f"sqrt({x}) (nats^½)", ylabel="reward − initial", title=f"{label}: reward hacking")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "hacking.png", dpi=110)
        plt.close(fig)
        files.append("hacking.png")
    return files, fits


def write_study_report(study_dir: str | pathlib.Path, arms: Sequence[Any] | None = None,
                       out: str | pathlib.Path | None = None, *, metrics: Sequence[str] = DEFAULT_METRICS,
                       x: str = "kl", y: str = "gold", proxy: str = "proxy", loss: str = "loss",
                       is_hacking: Callable[[dict], bool] = default_is_hacking, n_prompts: int = 3
                       ) -> pathlib.Path:
    """Write the study report (default ``study_dir/report.md``) and its PNGs beside it; returns its path.

    ``arms``: Arm objects or study.json records (default: study.json's). Metric names are parameters, so
    the report works with whatever the arms log; a metric no arm logged is left out of the table.
    Raises FileNotFoundError when ``arms`` is None and study.json is missing.
    """
    study_dir = pathlib.Path(study_dir)
    out = pathlib.Path(out) if out is not None else study_dir / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    records = load_arm_records(study_dir, arms)
    meta_file = study_dir / "study.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    table = summary_table(records, metrics)
    shown = [m for m in metrics if any(m in row["stats"] for row in table)]
    lines = [f"# Study {meta.get('study', study_dir.name)}", "",
             "Final eval metrics (the eval row with the largest step), mean ± sample std (ddof=1) over "
             "the seeds that finished; n = seeds.", "",
             "| group | method | n | " + " | ".join(shown) + " | failed |",
             "|---|---|---|" + "---|" * len(shown) + "---|"]
    for row in table:
        cells = [_fmt_stat(*row["stats"][m][:2]) if m in row["stats"] else "" for m in shown]
        lines.append(f"| {row['group']} | {row['method']} | {row['n']} | " + " | ".join(cells)
                     + f" | {', '.join(row['failed'])} |")
    stages = stage_rows(study_dir, meta)
    if any(st["outputs"] for st in stages):
        lines += ["", "## Stages", "", "Scalar outputs of each stage (`stages/<name>/done.json`).", "",
                  "| stage | output | value |", "|---|---|---|"]
        for st in stages:
            lines += [f"| {st['stage']} | {k} | {v:.4g} |" if isinstance(v, float) else
                      f"| {st['stage']} | {k} | {v} |" for k, v in st["outputs"].items()]
            if st["wall_s"] is not None:
                lines.append(f"| {st['stage']} | wall time (s) | {st['wall_s']:.0f} |")
    failed = [r for r in records if (r["status"] or {}).get("status") == "failed"]
    not_run = [name for row in table for name in row["not_run"]]
    if failed or not_run:
        lines += ["", "## Arms that did not finish", ""]
        lines += [f"- **{r['name']}** failed: {r['status'].get('error_type')}: "
                  f"{_cell(r['status'].get('error', ''), 200)}" for r in failed]
        lines += [f"- **{n}** not run (or interrupted)" for n in not_run]
    files, fits = _plots(records, out.parent, x, y, loss, proxy, is_hacking)
    if files:
        lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in files]
    if any(fit is not None for f in fits.values() for fit in f.values()):
        lines += ["", "Gao et al. (2022) fits of the reward gain, d = sqrt(KL):", ""]
    for label, f in fits.items():
        for key, fit in f.items():
            if fit is not None:
                lines.append(f"- {label}: {key} ≈ d (α − β log d), α = {fit.alpha:.4g} ± {fit.alpha_se:.2g}, "
                             f"β = {fit.beta:.4g} ± {fit.beta_se:.2g} ({fit.num_points} points)")
    samples = sample_rows(records, n_prompts)
    if samples:
        lines += ["", "## Samples before / after training", "", "| method (arm) | prompt | before | after |",
                  "|---|---|---|---|"]
        lines += [f"| {s['method']} ({s['arm']}) | {_cell(s['prompt'])} | {_cell(s['before'])} | "
                  f"{_cell(s['after'])} |" for s in samples]
    if meta:
        dev = meta.get("device", {})
        lines += ["", "## Environment", "", "```",
                  f"device: {dev.get('kind')} ({dev.get('platform')}) x {dev.get('count')}",
                  f"python {meta.get('python')} on {meta.get('platform')}",
                  *[f"{k} {v}" for k, v in sorted(meta.get("versions", {}).items())], "```"]
    lines += ["", "## Arms", ""]
    for r in records:
        rel = pathlib.Path(os.path.relpath(r["dir"], out.parent))
        state = (r["status"] or {}).get("status", "not run")
        lines.append(f"- {r['name']} ({state}): [config]({(rel / 'config.json').as_posix()}) · "
                     f"[TensorBoard]({(rel / 'tb').as_posix()}) · [status]({(rel / 'status.json').as_posix()})")
    out.write_text("\n".join(lines) + "\n")
    return out
