"""Compare runs side by side: a markdown table of final / best metrics and one plot per metric.

``write_report(["runs/a", "runs/b"], "runs/report")`` reads each run's ``config.json`` and
``metrics.jsonl`` and writes ``report.md`` plus ``<split>_<metric>.png`` curves (all runs on one axis).
Runs that differ only in a few config fields are labelled by those fields (e.g. ``algo.beta=0.3``).
"""

from __future__ import annotations

import json
import math
import pathlib

from jaxrlhf.errors import DataFileNotFoundError
from collections.abc import Sequence
from typing import Any

__all__ = ["load_run", "run_labels", "summarize", "write_report"]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_run(path: str | pathlib.Path) -> dict:
    """``{"name", "config" (flat dict), "metrics" (list of dicts)}``; raises FileNotFoundError."""
    path = pathlib.Path(path)
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.exists():
        raise DataFileNotFoundError(f"{metrics_file} not found: is {path} a run directory (runs/<name>)?")
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return {"name": path.name, "config": _flatten(config), "metrics": metrics}


def run_labels(runs: list[dict]) -> list[str]:
    """Label each run by the config fields that differ between runs (else its directory name)."""
    keys = sorted({k for r in runs for k in r["config"]})
    differing = [k for k in keys if k not in ("name", "train.run_dir")
                 and len({json.dumps(r["config"].get(k), default=str) for r in runs}) > 1]
    labels = []
    for r in runs:
        parts = [f"{k}={r['config'].get(k)}" for k in differing[:3]]
        labels.append(", ".join(parts) if parts else r["name"])
    if len(set(labels)) < len(labels):
        labels = [f"{r['name']} ({lab})" if lab != r["name"] else lab for r, lab in zip(runs, labels)]
    return labels


def summarize(run: dict) -> dict[str, dict[str, float]]:
    """``{split: {metric: last value}}`` over numeric metrics."""
    out: dict[str, dict[str, float]] = {}
    for m in run["metrics"]:
        split = m.get("split", "train")
        for k, v in m.items():
            if k in ("step", "split") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            out.setdefault(split, {})[k] = float(v)
    return out


def write_report(run_paths: Sequence[str | pathlib.Path], out_dir: str | pathlib.Path,
                 metrics: Sequence[str] | None = None) -> pathlib.Path:
    """Write ``report.md`` and plots comparing ``run_paths``; returns the report path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(p) for p in run_paths]
    labels = run_labels(runs)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(r) for r in runs]
    splits = sorted({s for summ in summaries for s in summ})
    lines = ["# Run comparison", "", "| run | " + " | ".join(labels) + " |",
             "|---|" + "---|" * len(labels)]
    skip = {"step_time_s"}
    for split in splits:
        names = sorted({k for summ in summaries for k in summ.get(split, {})} - skip)
        if metrics:
            names = [n for n in names if n in metrics]
        for name in names:
            vals = []
            for summ in summaries:
                v = summ.get(split, {}).get(name)
                vals.append("" if v is None or not math.isfinite(v) else f"{v:.4g}")
            lines.append(f"| {split}/{name} (last) | " + " | ".join(vals) + " |")
    lines.append("")
    plots = []
    for split in splits:
        names = sorted({k for summ in summaries for k in summ.get(split, {})} - skip)
        if metrics:
            names = [n for n in names if n in metrics]
        for name in names:
            fig, ax = plt.subplots(figsize=(5, 3.2))
            for r, lab in zip(runs, labels):
                pts = [(m["step"], m[name]) for m in r["metrics"] if m.get("split", "train") == split
                       and isinstance(m.get(name), (int, float))]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=3, label=lab)
            ax.set_xlabel("step")
            ax.set_title(f"{split}/{name}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fname = f"{split}_{name.replace('/', '_')}.png"
            fig.savefig(out / fname, dpi=110)
            plt.close(fig)
            plots.append(fname)
    lines += [f"![{p}]({p})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
