"""Where the real datasets come from: ``../shared/assets`` when present, else the Hugging Face hub.

The package never needs ``../shared``; experiments use these helpers so the same file runs offline on
the project's machines and online elsewhere. ``JAXRLHF_ASSETS`` overrides the folder.
"""

from __future__ import annotations

import os
import pathlib

_REPO = pathlib.Path(__file__).resolve().parents[1]


def assets_dir() -> pathlib.Path | None:
    env = os.environ.get("JAXRLHF_ASSETS")
    for p in ([pathlib.Path(env)] if env else []) + [_REPO.parent / "shared" / "assets", _REPO / "assets"]:
        if p.is_dir():
            return p
    return None


def asset_or_hub(relative: str, hub_id: str) -> str:
    """The local file ``<assets>/<relative>`` if it exists, else ``hub_id``."""
    root = assets_dir()
    if root is not None and (root / relative).exists():
        return str(root / relative)
    return hub_id


# Real datasets used by the experiments.
SELF_INSTRUCT_SEED = lambda: asset_or_hub("alpaca-seed-tasks/seed_tasks.jsonl", "yizhongw/self_instruct")  # noqa: E731
HH_RLHF_HARMLESS = lambda: asset_or_hub("hh-rlhf-harmless-base-test/test.jsonl.gz", "Anthropic/hh-rlhf")  # noqa: E731
IMDB_TRAIN = lambda: asset_or_hub("imdb-reviews-subset/train.jsonl.gz", "stanfordnlp/imdb")  # noqa: E731
IMDB_TEST = lambda: asset_or_hub("imdb-reviews-subset/test.jsonl.gz", "stanfordnlp/imdb")  # noqa: E731
