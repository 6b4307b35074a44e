"""Dynamic sampling (DAPO) in the `grpo` and `rloo` stages: TRL's trainers with `pipeline.algorithms.dynamic_sampling`,
on a tiny random model (its samples are random tokens, so their lengths differ) and the quickstart's prompts."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import GRPOConfig, GRPOTrainer

from pipeline.algorithms.dynamic_sampling import concatenate, select_rows, with_dynamic_sampling, zero_variance_groups
from pipeline.cli import main
from pipeline.models.loading import load_tokenizer
from pipeline.models.decoding import completion_text
from tests.conftest import DATA, write_recipe
from tests.test_ppo_onpolicy import make_tokenizer
from tests.test_validate import validate

ARGS = {"max_steps": 2, "learning_rate": 1e-3, "num_generations": 4, "per_device_train_batch_size": 16,
        "max_completion_length": 8, "logging_steps": 1}


def length_on_arithmetic(completions: list, kind: list, **_) -> list[float]:
    """Pays for length on "What is a +/- b?" (2 of the 5 question kinds) and 1 on the rest: most groups are flat."""
    return [len(completion_text(c)) / 10 if k in ("add", "sub") else 1.0 for c, k in zip(completions, kind)]


def constant(completions: list, **_) -> list[float]:
    return [1.0] * len(completions)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dynamic_sampling")
    make_tokenizer("quickstart", directory)
    tokenizer = load_tokenizer(str(directory))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).save_pretrained(directory)
    return directory


def rl_stage(name: str, model_dir, reward: str, max_draws: int, stage_type: str = "grpo") -> dict:
    return {"name": name, "type": stage_type, "model": str(model_dir),
            "dataset": {"path": str(DATA / "prompts.jsonl"), "test_size": 8},
            "rewards": [{"function": f"tests.test_dynamic_sampling:{reward}"}],
            "dynamic_sampling": {"max_draws": max_draws}, "args": dict(ARGS)}


@pytest.fixture(scope="module")
def run_dir(model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("dynamic_sampling_run")
    stages = [rl_stage("grpo", model_dir, "length_on_arithmetic", 12),
              rl_stage("rloo", model_dir, "length_on_arithmetic", 12, stage_type="rloo"),
              rl_stage("flat", model_dir, "constant", 3)]
    assert main(["run", str(write_recipe(directory, stages))]) == 0
    return directory / "run"


def logged(run_dir, stage: str) -> list[dict]:
    rows = json.loads((run_dir / stage / "log_history.json").read_text())
    return [row for row in rows if "dynamic_sampling/draws" in row]


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_trained_batches_hold_only_groups_with_reward_variance(run_dir, stage):
    rows = logged(run_dir, stage)
    assert len(rows) == ARGS["max_steps"]  # one generation batch per logged step
    for row in rows:
        assert row["dynamic_sampling/filled_fraction"] == 1.0, row
        assert 0.0 < row["zero_variance_fraction"] < 1.0, row
        if stage == "grpo":  # TRL's sampling metrics are the first draw's: flat groups there, not in the batch
            assert row["frac_reward_zero_std"] > 0.0, row  # (RLOO's reward holds the KL penalty: never flat)
    assert max(row["dynamic_sampling/draws"] for row in rows) > 1


def test_a_constant_reward_stops_at_the_cap(run_dir):
    rows = logged(run_dir, "flat")
    assert len(rows) == ARGS["max_steps"]
    for row in rows:
        assert row["dynamic_sampling/draws"] == 3.0 and row["dynamic_sampling/filled_fraction"] == 0.0, row
        assert row["zero_variance_fraction"] == 1.0 and row["reward"] == 1.0, row


def trainer_for(model_dir, reward, max_draws: int):
    rows = [json.loads(line) for line in (DATA / "prompts.jsonl").read_text().splitlines()[:100]]
    args = GRPOConfig(output_dir=str(model_dir / "out"), report_to=[], seed=3, use_cpu=True,
                      **{k: v for k, v in ARGS.items() if k != "logging_steps"})
    trainer = with_dynamic_sampling(GRPOTrainer, max_draws)(
        model=str(model_dir), reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows),
        processing_class=load_tokenizer(str(model_dir)))
    trainer.model.train()
    inputs = [dict(rows[i]) for i in range(4) for _ in range(4)]  # 4 groups of 4: next, sub, sub, letter
    return trainer, inputs


@pytest.mark.parametrize("reward, max_draws", [(length_on_arithmetic, 12), (constant, 2)], ids=["fills", "capped"])
def test_the_merged_batch_is_full_size_and_padded_on_the_right_sides(model_dir, reward, max_draws):
    trainer, inputs = trainer_for(model_dir, reward, max_draws)
    batch = trainer._generate_and_score_completions(inputs)
    pad = trainer.processing_class.pad_token_id
    assert {len(value) for key, value in batch.items() if key != "num_items_in_batch"} == {16}
    prompt_mask, completion_mask = batch["prompt_mask"].bool(), batch["completion_mask"].bool()
    assert (prompt_mask[:, -1]).all() and (batch["prompt_ids"][~prompt_mask] == pad).all()  # left-padded
    assert (completion_mask[:, 0]).all() and (batch["completion_ids"][~completion_mask] == pad).all()  # right
    assert torch.equal(prompt_mask.int().sort(1).values, prompt_mask.int())  # pads only before the prompt
    assert torch.equal(completion_mask.int().sort(1, descending=True).values, completion_mask.int())
    assert batch["num_items_in_batch"] == completion_mask.sum()
    prompts = trainer.processing_class.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    flat = zero_variance_groups(batch["advantages"], 4)  # a flat group's advantages are all 0
    if reward is constant:
        assert flat.all() and trainer._metrics["train"]["dynamic_sampling/draws"] == [2.0]
    else:  # only arithmetic questions carry reward variance (2 of the first 4 groups), and only they are left
        assert trainer._metrics["train"]["dynamic_sampling/draws"][0] > 1
        assert not flat.any() and all(" + " in p or " - " in p for p in prompts), prompts
    assert len(trainer._metrics["train"]["reward"]) == 1  # TRL's sampling metrics: the first draw's only


def test_rollouts_of_different_widths_merge():
    short = {"prompt_ids": torch.tensor([[5, 6]]), "prompt_mask": torch.tensor([[1, 1]]),
             "completion_ids": torch.tensor([[7]]), "completion_mask": torch.tensor([[1]]),
             "advantages": torch.tensor([0.5]), "num_items_in_batch": torch.tensor(1)}
    wide = {"prompt_ids": torch.tensor([[0, 0, 5], [0, 5, 6]]), "prompt_mask": torch.tensor([[0, 0, 1], [0, 1, 1]]),
            "completion_ids": torch.tensor([[7, 8], [7, 0]]), "completion_mask": torch.tensor([[1, 1], [1, 0]]),
            "advantages": torch.tensor([1.0, 2.0]), "num_items_in_batch": torch.tensor(3)}
    merged = concatenate([select_rows(short, torch.tensor([True])), select_rows(wide, torch.tensor([False, True]))],
                         pad_token_id=0)
    assert merged["prompt_ids"].tolist() == [[0, 5, 6], [0, 5, 6]]
    assert merged["prompt_mask"].tolist() == [[0, 1, 1], [0, 1, 1]]
    assert merged["completion_ids"].tolist() == [[7, 0], [7, 0]]
    assert merged["completion_mask"].tolist() == [[1, 0], [1, 0]]
    assert merged["advantages"].tolist() == [0.5, 2.0] and "num_items_in_batch" not in merged
    with pytest.raises(ValueError, match="text rollouts only"):
        select_rows({**short, "pixel_values": torch.zeros(1, 3)}, torch.tensor([True]))


def test_zero_variance_groups():
    nan = float("nan")
    rewards = torch.tensor([1.0, 1.0, 1.0, 2.0, 3.0, 3.0, nan, 3.0, nan, nan])
    assert zero_variance_groups(rewards, 2).tolist() == [True, False, True, True, True]


@pytest.mark.parametrize("changes, expected", [
    ({"dynamic_sampling": {"max_draws": 0}}, "dynamic_sampling.max_draws: must be >= 1, got 0"),
    ({"dynamic_sampling": {"max_draws": 2}, "args": {"num_generations": 1}},
     "dynamic_sampling: needs args.num_generations >= 2"),
    ({"dynamic_sampling": {"max_draw": 2}}, "did you mean 'max_draws'"),
], ids=["cap", "group", "typo"])
@pytest.mark.parametrize("stage_type", ["grpo", "rloo"])
def test_bad_dynamic_sampling_is_refused(model_dir, tmp_path, capsys, changes, expected, stage_type):
    stage = {**rl_stage("rl", model_dir, "constant", 1, stage_type), **changes}
    code, out = validate(tmp_path, capsys, [stage])
    assert code != 0 and "stage 'rl'" in out and expected in out, out
