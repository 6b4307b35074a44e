"""Benchmark: PPO step time and peak memory next to GRPO's, same policy, reward model, prompts and LoRA.

    python bench/ppo_vs_grpo.py --run-dir runs/quickstart [--steps 10] [--json]

`--run-dir` is a finished run with `sft` and `rm` stages (the quickstart's). Each trainer runs
in its own process so peak memory is its own. Both generate the same number of completions
per step (PPO: `completions` prompts x 1; GRPO: `completions / 8` prompts x 8) with LoRA r=16.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from datasets import load_dataset
from trl import GRPOConfig, GRPOTrainer

from pipeline.algorithms.ppo_trainer.config import PPOConfig
from pipeline.algorithms.ppo_trainer.trainer import PPOTrainer
from pipeline.config.specs import PeftSpec, TrainStageSpec
from pipeline.models.loading import load_causal_lm, load_tokenizer, use_bf16
from pipeline.models.reward_functions import RewardModelScorer
from pipeline.stages.ppo import build_models

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "data" / "quickstart" / "prompts.jsonl"
LORA = PeftSpec(lora={"r": 16, "lora_alpha": 32})


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_ppo(run_dir: Path, steps: int, completions: int, max_new_tokens: int) -> dict:
    sft = str(run_dir / "sft" / "output")
    spec = TrainStageSpec(name="bench", type="ppo", model=sft, dataset=None, peft=LORA)
    config = PPOConfig(max_steps=steps, rollout_batch_size=completions, mini_batch_size=8, ppo_epochs=2,
                       max_new_tokens=max_new_tokens, output_dir="/tmp/bench-ppo")
    model, reference = build_models(spec, sft, 0.0)
    prompts = load_dataset("json", data_files=str(PROMPTS), split="train")
    trainer = PPOTrainer(config, model, load_tokenizer(sft), prompts, [RewardModelScorer(str(run_dir / "rm" / "output"))],
                         [1.0], ["rm"], ref_model=reference)
    started = time.time()
    history = trainer.train()
    seconds = (time.time() - started) / steps
    generated = sum(h["response_length"] for h in history) / len(history) * completions
    generation = sum(h["time/generation_s"] for h in history) / len(history)
    return {"step_s": seconds, "peak_mem_mb": peak_memory_mb(), "generation_tokens_per_s": generated / generation}


def measure_grpo(run_dir: Path, steps: int, completions: int, max_new_tokens: int) -> dict:
    sft = str(run_dir / "sft" / "output")
    args = GRPOConfig(output_dir="/tmp/bench-grpo", max_steps=steps, per_device_train_batch_size=completions,
                      num_generations=8, max_completion_length=max_new_tokens, logging_steps=1, save_strategy="no",
                      report_to="none", bf16=use_bf16(), activation_checkpointing=False)
    prompts = load_dataset("json", data_files=str(PROMPTS), split="train")
    trainer = GRPOTrainer(model=load_causal_lm(sft), reward_funcs=[RewardModelScorer(str(run_dir / "rm" / "output"))],
                          args=args, train_dataset=prompts, processing_class=load_tokenizer(sft),
                          peft_config=LORA.lora_config("CAUSAL_LM"))
    started = time.time()
    trainer.train()
    seconds = (time.time() - started) / steps
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_s": seconds, "peak_mem_mb": peak_memory_mb(),
            "generated_tokens_per_step": sum(lengths) / max(len(lengths), 1) * completions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "quickstart")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--completions", type=int, default=32, help="completions generated per step")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=["ppo", "grpo"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure = measure_ppo if args.child == "ppo" else measure_grpo
        print("RESULT " + json.dumps(measure(args.run_dir.resolve(), args.steps, args.completions,
                                             args.max_new_tokens)))
        return
    results = {}
    for trainer in ("ppo", "grpo"):
        out = subprocess.run([sys.executable, __file__, "--child", trainer, "--run-dir", str(args.run_dir),
                              "--steps", str(args.steps), "--completions", str(args.completions),
                              "--max-new-tokens", str(args.max_new_tokens)],
                             capture_output=True, text=True, check=True, cwd=REPO)
        results[trainer] = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
    if args.json:
        print(json.dumps(results))
        return
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.steps} steps, {args.completions} completions/step, <= {args.max_new_tokens} new tokens, LoRA r=16, {device}")
    print(f"{'trainer':8} {'step time (s)':>14} {'peak memory (MB)':>17}")
    for trainer, r in results.items():
        print(f"{trainer:8} {r['step_s']:>14.3f} {r['peak_mem_mb']:>17.0f}")


if __name__ == "__main__":
    main()
