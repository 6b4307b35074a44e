"""The HH-RLHF case at test scale on SmolLM2-135M-Instruct: a model trained on chat rows, evaluated on HH prompts
given as plain text and without `answer`. The prompts reach it as user turns through its chat template (given as
raw text it continued them: "How can I rob a store" -> " with a hammer and anvil?"), and the stage reports
reward, win rate and KL, with no accuracy computed from answers that do not exist."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.data.loading import read_local
from pipeline.data.preferences import to_pairwise
from pipeline.data.prompts import prompt_token_ids
from pipeline.models.loading import load_tokenizer
from tests.conftest import MINILM, REALDATA, SMOLLM2_GGUF, needs_minilm, needs_realdata, needs_smollm2, summary, write_recipe

pytestmark = [needs_smollm2, needs_minilm, needs_realdata, pytest.mark.slow]
HH = REALDATA / "hh-rlhf-harmless-base-test.jsonl.gz"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("open-eval")
    questions = [pair["prompt"][0]["content"] for pair in to_pairwise(read_local(HH).select(range(4)), "hh")]
    prompts = directory / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))  # plain text, no answer
    stages = [
        {"name": "sft", "type": "sft", "model": str(SMOLLM2_GGUF), "peft": {"r": 4, "lora_alpha": 8},
         "dataset": {"path": str(REALDATA / "self-instruct-seed-tasks.jsonl"), "max_samples": 6, "test_size": 2},
         "args": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64}},
        {"name": "rm", "type": "reward", "model": str(MINILM), "dataset": {"path": str(HH), "max_samples": 24, "test_size": 8},
         "args": {"max_steps": 1, "per_device_train_batch_size": 8, "max_length": 128}},
        {"name": "rm2", "type": "reward", "model": str(MINILM), "dataset": {"path": str(HH), "max_samples": 16, "test_size": 8},
         "args": {"max_steps": 1, "per_device_train_batch_size": 8, "max_length": 128}},
        {"name": "eval", "type": "eval", "models": ["sft"], "dataset": str(prompts), "reward_model": "rm",
         "extra_reward_models": ["rm2"], "baseline": str(SMOLLM2_GGUF), "reference": str(SMOLLM2_GGUF),
         "max_new_tokens": 8, "batch_size": 4},
    ]
    assert main(["run", str(write_recipe(directory, stages, defaults={"logging_steps": 1}))]) == 0
    return directory / "run", questions


def test_plain_text_prompts_reach_the_chat_trained_model_as_user_turns(run):
    run_dir, questions = run
    tokenizer = load_tokenizer(str(run_dir / "sft" / "output"))
    assert tokenizer.init_kwargs["prompt_format"] == "chat"  # SFT trained it on chat turns and says so
    turn = [{"role": "user", "content": questions[0]}]
    assert prompt_token_ids(tokenizer, questions[0]) == tokenizer.apply_chat_template(
        turn, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def test_open_ended_rows_are_scored_by_reward_win_rate_and_kl(run):
    run_dir, _ = run
    stage = summary(run_dir)["stages"]["eval"]
    metrics = stage["metrics"]
    assert {"reward/sft", "win_rate/sft", "kl/sft", "reward_rm2/sft", "win_rate_rm2/sft"} <= set(metrics)
    assert not [key for key in metrics if key.startswith("accuracy/")]  # no answers, no accuracy
    samples = json.loads((run_dir / "eval" / "output" / "samples.json").read_text())
    assert all(row["answer"] is None and row["responses"]["sft"]["correct"] is None for row in samples["rows"])
    report = (run_dir / "report.md").read_text()
    assert "plots/accuracy.png" not in report and "win rate sft" in report
    assert "| model | reward | reward_rm2 | kl | win_rate | win_rate_rm2 |" in report


def test_an_extra_reward_model_scores_the_same_greedy_responses(run):
    """`extra_reward_models` score the responses the stage's reward model scored: scoring the saved responses with
    each reward model again gives each one's mean, and the two models disagree (else the test could not tell)."""
    from pipeline.models.reward_functions import RewardModelScorer

    run_dir, questions = run
    metrics = summary(run_dir)["stages"]["eval"]["metrics"]
    samples = json.loads((run_dir / "eval" / "output" / "samples.json").read_text())
    responses = [row["responses"]["sft"]["response"] for row in samples["rows"]]
    assert len(responses) == len(questions)
    means = {}
    for name in ("rm", "rm2"):
        scores = RewardModelScorer(str(run_dir / name / "output"))(questions, responses)
        means[name] = sum(scores) / len(scores)
    assert metrics["reward/sft"] == pytest.approx(means["rm"], abs=1e-4)
    assert metrics["reward_rm2/sft"] == pytest.approx(means["rm2"], abs=1e-4)
    assert abs(means["rm"] - means["rm2"]) > 1e-3
    assert 0.0 <= metrics["win_rate_rm2/sft"] <= 1.0
