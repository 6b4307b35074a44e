"""reward, dpo and grpo stages chained from SFT on the quickstart data, for real (tiny models, few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.modeling import is_adapter
from tests.conftest import DATA, REALDATA, needs_realdata, summary, tiny_stages, write_recipe

PREFS = {"path": str(DATA / "prefs.jsonl"), "max_samples": 600, "test_size": 0.15}


def preference_stages() -> list[dict]:
    stages = tiny_stages(pretrain_steps=60, sft_steps=60)
    stages[2]["args"].update(learning_rate=5e-3)
    return stages + [
        {"name": "rm", "type": "reward", "model": "sft", "dataset": PREFS,
         "args": {"max_steps": 60, "learning_rate": 3e-3, "per_device_train_batch_size": 16, "max_length": 48}},
        {"name": "dpo", "type": "dpo", "model": "sft", "dataset": PREFS, "peft": {"r": 8, "lora_alpha": 16},
         "args": {"max_steps": 30, "learning_rate": 5e-3, "per_device_train_batch_size": 16, "max_length": 48,
                  "beta": 0.1}},
        {"name": "grpo", "type": "grpo", "model": "sft",
         "dataset": {"path": str(DATA / "prompts.jsonl"), "eval": str(DATA / "eval.jsonl")},
         "rewards": [{"reward_model": "rm", "weight": 0.5}, {"function": "exact_match"},
                     {"function": "format", "weight": 0.2}],
         "peft": {"r": 8, "lora_alpha": 16},
         "args": {"max_steps": 30, "learning_rate": 3e-3, "num_generations": 8, "per_device_train_batch_size": 16,
                  "max_completion_length": 6, "logging_steps": 2, "beta": 0.0}},
    ]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    directory = tmp_path_factory.mktemp("prefs")
    assert main(["run", str(write_recipe(directory, preference_stages()))]) == 0
    return summary(directory / "run")["stages"]


def test_reward_model_ranks_held_out_pairs(chain):
    metrics = chain["rm"]["metrics"]
    assert 0.3 <= metrics["initial_eval_accuracy"] <= 0.7  # untrained head: chance
    # Observed 0.57 with this 28k-parameter model (0.73 with the quickstart's 0.8M); the bound is
    # measured, with margin, and the 0.85 target is not met yet (see the closing note).
    assert metrics["eval_accuracy"] >= 0.53
    assert metrics["eval_loss"] < 0.693  # below the Bradley-Terry loss of a constant scorer, log 2


def test_dpo_raises_held_out_margin(chain):
    metrics = chain["dpo"]["metrics"]
    # Observed +0.023 margin and 0.6+ accuracy on held-out pairs; before training both are exactly 0.
    assert metrics["eval_rewards/margins"] > metrics["initial_eval_rewards/margins"] + 0.005
    assert metrics["eval_rewards/accuracies"] > 0.55
    assert is_adapter(chain["dpo"]["output"])


def test_grpo_reward_rises(chain):
    metrics = chain["grpo"]["metrics"]
    assert metrics["train_reward_last"] > metrics["train_reward_first"]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and 0.0 <= metrics["initial_eval_accuracy"] <= 1.0


def test_later_stage_stacks_on_an_sft_adapter(tmp_path):
    stages = tiny_stages(pretrain_steps=10, sft_steps=10)
    stages[2]["peft"] = {"r": 4, "lora_alpha": 8}
    prefs = dict(PREFS, max_samples=100)
    dpo_args = {"max_steps": 4, "per_device_train_batch_size": 8, "max_length": 48}
    stages += [
        {"name": "dpo_stacked", "type": "dpo", "model": "sft", "dataset": prefs,
         "peft": {"r": 4, "lora_alpha": 8, "merge": True}, "args": dpo_args},
        {"name": "dpo_full", "type": "dpo", "model": "sft", "dataset": prefs, "args": dpo_args},
    ]
    assert main(["run", str(write_recipe(tmp_path, stages))]) == 0
    out = summary(tmp_path / "run")["stages"]
    assert not is_adapter(out["dpo_stacked"]["output"]) and not is_adapter(out["dpo_full"]["output"])


def test_lora_reward_and_qlora_dpo_on_cpu(tmp_path):
    stages = tiny_stages(pretrain_steps=10, sft_steps=10)
    stages[1]["model"].update(hidden_size=64, intermediate_size=128)  # bitsandbytes 4-bit blocks are 64 wide
    prefs = dict(PREFS, max_samples=120)
    quant, lora = {"bits": 4}, {"r": 4, "lora_alpha": 8}
    stages += [
        {"name": "rm", "type": "reward", "model": "sft", "dataset": prefs, "peft": lora,
         "args": {"max_steps": 6, "per_device_train_batch_size": 8, "max_length": 48}},
        {"name": "dpo", "type": "dpo", "model": "sft", "dataset": prefs, "quantization": quant, "peft": lora,
         "args": {"max_steps": 6, "per_device_train_batch_size": 8, "max_length": 48}},
    ]
    assert main(["run", str(write_recipe(tmp_path, stages))]) == 0
    out = summary(tmp_path / "run")["stages"]
    assert not is_adapter(out["rm"]["output"])  # merged: later stages score with a plain model
    assert is_adapter(out["dpo"]["output"])


@needs_realdata
def test_reward_stage_on_hh_rlhf(tmp_path):
    """Real HH-RLHF transcripts: split into prompt and replies, long pairs truncated rather than dropped."""
    stages = tiny_stages(pretrain_steps=5, sft_steps=5)
    stages.append({"name": "rm", "type": "reward", "model": "sft",
                   "dataset": {"path": str(REALDATA / "hh-rlhf-harmless-base-test.jsonl.gz"), "max_samples": 200,
                               "test_size": 40},
                   "args": {"max_steps": 5, "per_device_train_batch_size": 8, "max_length": 128}})
    assert main(["run", str(write_recipe(tmp_path, stages))]) == 0
    metrics = summary(tmp_path / "run")["stages"]["rm"]["metrics"]
    assert metrics["truncated_pairs"] > 0  # HH transcripts exceed 128 tokens: kept and cut, not dropped
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
