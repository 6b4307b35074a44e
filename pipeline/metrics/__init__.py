"""Metrics as local `evaluate` modules, loaded by path: `evaluate.load("accuracy")` would fetch from the Hub,
which is unreachable offline. Each folder holds one module script named after it."""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).resolve().parent


def load_metric(name: str):
    """An `evaluate.EvaluationModule` shipped in this package (exact_match, win_rate, sequence_kl, perplexity, pass_at_k)."""
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        names = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"no metric module '{name}' in {METRICS_DIR}; available: {', '.join(names)}")
    return evaluate.load(str(folder), keep_in_memory=True)  # in memory: no cache files or locks on disk
