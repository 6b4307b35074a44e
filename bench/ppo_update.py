"""`pipeline bench --ppo`: PPO's time per update and peak memory, full fine-tuning and LoRA, in each precision asked.

Each mode runs in a fresh process, so its peak resident memory is its own:
    python -m bench.ppo_update '{"mode": "lora"|"full", "model": DIR_OR_GGUF, "steps": N, "precision": "fp32"}'

prints `RESULT {json}`: seconds per PPO update (the optimisation phase of a step, median over steps),
seconds of generation per step, peak RSS, in total and above the process's footprint once the
libraries are imported, and the dtype the model's weights were loaded in. The reward is exact match, so no reward
model is loaded.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from datasets import load_dataset

from bench.workloads import DATA, build_model
from pipeline.algorithms.ppo_trainer.config import PPOConfig
from pipeline.algorithms.ppo_trainer.trainer import PPOTrainer
from pipeline.config.specs import PeftSpec
from pipeline.models.loading import load_tokenizer, recipe_precision
from pipeline.models.reward_functions import exact_match_reward
from pipeline.stages.ppo import PPOSpec, build_models

PPO_ARGS = {"rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 2, "max_new_tokens": 16,
            "learning_rate": 1e-5, "logging_steps": 1}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(mode: str, model: str, steps: int, precision: str = "auto") -> dict[str, Any]:
    """`steps` PPO steps of `mode` on `model`, its weights loaded and its updates computed in `precision` (a
    recipe's `precision`)."""
    baseline = peak_rss_mb()
    with tempfile.TemporaryDirectory() as out, recipe_precision(precision):
        config = PPOConfig(max_steps=steps, output_dir=out, **PPO_ARGS)
        spec = PPOSpec(name="bench", type="ppo", model=model, dataset=None,
                       peft=PeftSpec(lora={"r": 16, "lora_alpha": 32}) if mode == "lora" else None)
        actor_critic, reference = build_models(spec, model, 0.0)
        prompts = load_dataset("json", data_files=str(DATA / "prompts.jsonl"), split="train")
        trainer = PPOTrainer(config, actor_critic, load_tokenizer(model), prompts, [exact_match_reward()], [1.0],
                             ["exact_match"], ref_model=reference)
        history = trainer.train()
        weights_dtype = str(actor_critic.policy.get_output_embeddings().weight.dtype).removeprefix("torch.")
    later = history[1:] or history  # the first step pays for warming up kernels and allocator
    return {"update_s": statistics.median(h["time/optimisation_s"] for h in later),
            "generation_s": statistics.median(h["time/generation_s"] for h in later),
            "peak_rss_mb": peak_rss_mb(), "peak_rise_mb": peak_rss_mb() - baseline, "weights_dtype": weights_dtype}


def run_ppo_bench(model: str | None, size: str, steps: int, log: Callable[[str], None],
                  modes: tuple[str, ...] = ("full", "lora"),
                  precisions: tuple[str, ...] = ("auto",)) -> dict[str, dict[str, Any]]:
    """Each mode in each precision, each in its own process, on `model` (a folder or GGUF file) or a fresh Llama of
    `size`. Keyed by mode, or by "mode precision" when more than one precision is asked."""

    if model is None:
        model = str(build_model(Path(tempfile.gettempdir()) / "pipeline-bench" / f"model-{size}", size))
    results = {}
    for mode in modes:
        for precision in precisions:
            key = mode if len(precisions) == 1 else f"{mode} {precision}"
            log(f"ppo {key}: {steps} steps on {model}")
            job = json.dumps({"mode": mode, "model": model, "steps": steps, "precision": precision})
            done = subprocess.run([sys.executable, "-m", "bench.ppo_update", job], capture_output=True, text=True,
                                  env={**os.environ, "TQDM_DISABLE": "1"})
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"bench ppo {key} failed:\n{done.stderr[-3000:]}")
            results[key] = json.loads(lines[-1][len("RESULT "):])
    return results


def ppo_table(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| mode | weights | s per update | s generation per step | peak RSS MB | peak rise MB |",
            "|---|---|---|---|---|---|"]
    for mode, r in results.items():
        rows.append(f"| {mode} | {r['weights_dtype']} | {r['update_s']:.3f} | {r['generation_s']:.3f} | "
                    f"{r['peak_rss_mb']:.0f} | {r['peak_rise_mb']:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    print("RESULT " + json.dumps(measure(job["mode"], job["model"], job["steps"], job["precision"])), flush=True)
