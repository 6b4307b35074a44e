"""The benchmarked work: tiny Llama models built from scratch, quickstart data, and per stage type the same
training done two ways, through the pipeline (a one-stage recipe run by `Runner`) and as a minimal TRL script."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import set_seed

from pipeline.models.loading import load_tokenizer, use_bf16
from pipeline.run.runner import Runner
from pipeline.stages.pretrain import fresh_model
from pipeline.validation.recipe_checks import load_recipe

DATA = Path(__file__).resolve().parents[1] / "data" / "quickstart"
SEED = 42
EVAL_ROWS = 32  # held-out rows: the pipeline's extra evaluations run on these
# Llama-style shapes (GQA, SwiGLU); hidden and intermediate sizes are multiples of 64, as 4-bit QLoRA needs.
SIZES: dict[str, dict[str, int]] = {
    name: dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=heads // 2 or 1)
    for name, (hidden, intermediate, layers, heads) in {
        "tiny": (64, 192, 2, 2), "small": (128, 384, 4, 4), "medium": (256, 704, 6, 4), "base": (512, 1408, 8, 8),
    }.items()
}


@dataclass
class Workload:
    data: str  # quickstart file the rows come from
    args: dict[str, Any]  # the trainer config's fields, identical on both paths (plus max_steps)
    stage: dict[str, Any] = field(default_factory=dict)  # further recipe keys of the stage (pipeline path)

    @property
    def samples_per_step(self) -> int:
        return self.args.get("per_device_train_batch_size") or self.args["rollout_batch_size"]


RULE_REWARD = {"rewards": [{"function": "exact_match", "weight": 1.0}]}
WORKLOADS: dict[str, Workload] = {
    "pretrain": Workload("pretrain.jsonl", {"per_device_train_batch_size": 8, "learning_rate": 1e-3}, {"block_size": 128}),
    "sft": Workload("sft.jsonl", {"per_device_train_batch_size": 16, "learning_rate": 1e-3, "max_length": 64}),
    "reward": Workload("prefs.jsonl", {"per_device_train_batch_size": 16, "learning_rate": 3e-4, "max_length": 64}),
    "dpo": Workload("prefs.jsonl", {"per_device_train_batch_size": 16, "learning_rate": 5e-4, "max_length": 64,
                                    "beta": 0.1, "truncation_mode": "keep_end"}),
    "grpo": Workload("prompts.jsonl", {"per_device_train_batch_size": 16, "learning_rate": 5e-4, "num_generations": 4,
                                       "max_completion_length": 8, "temperature": 1.0}, RULE_REWARD),
    "ppo": Workload("prompts.jsonl", {"rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 1,
                                      "learning_rate": 1e-4, "max_new_tokens": 8}, RULE_REWARD),
}


def hardware_args() -> dict[str, Any]:
    """What a hand-written script on this machine must set: TRL's defaults (bf16, gradient checkpointing)
    fail or crawl on CPU, and trackers would log elsewhere."""

    return {"bf16": use_bf16(), "activation_checkpointing": False, "report_to": "none", "seed": SEED}


def build_model(folder: Path, size: str) -> Path:
    """A freshly initialised Llama of `size` with a byte-level BPE tokenizer made by the tokenizer stage."""

    if (folder / "config.json").is_file():
        return folder
    recipe = write_recipe(folder.parent / f"tok-{size}", {"name": "tok", "type": "tokenizer", "vocab_size": 512,
                                                          "dataset": str(DATA / "pretrain.jsonl")})
    Runner(load_recipe(str(recipe)), recipe.parent / "run", log=lambda *_: None).run()
    tokenizer = load_tokenizer(str(recipe.parent / "run" / "tok" / "output"))
    set_seed(SEED)
    model = fresh_model({"architecture": "llama", **SIZES[size]}, tokenizer, block_size=512)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def split_data(folder: Path, name: str, train_rows: int) -> tuple[Path, Path]:
    """train.jsonl (the first `train_rows` rows) and eval.jsonl (the next EVAL_ROWS) of a quickstart file.

    A file too short for both keeps its last EVAL_ROWS for eval; training then runs over its rows more than once.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines = (DATA / name).read_text().splitlines()
    train_rows = min(train_rows, len(lines) - EVAL_ROWS)
    train, held_out = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("\n".join(lines[:train_rows]) + "\n")
    held_out.write_text("\n".join(lines[train_rows:train_rows + EVAL_ROWS]) + "\n")
    return train, held_out


def write_recipe(folder: Path, stage: dict[str, Any]) -> Path:
    """A one-stage recipe (JSON is YAML) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(json.dumps({"name": "bench", "seed": SEED, "stages": [stage]}))
    return path

