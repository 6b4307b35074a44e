"""The tool-use demonstration (`recipes/tools.yaml`): its data, its digit-splitting tokenizer, and the recipe run
end to end at test scale with the live `calculate` tool."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.stages.specs.tokenizer import TokenizerSpec
from pipeline.stages.tokenizer import train_bpe
from pipeline.training.health import first_and_last_quarter
from tests.conftest import REPO, summary

sys.path.insert(0, str(REPO / "examples" / "tools"))
import tools_datagen  # noqa: E402

RECIPE = REPO / "recipes" / "tools.yaml"
FILES = ("pretrain.jsonl", "sft.jsonl", "prompts.jsonl", "eval.jsonl")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_committed_data_is_the_generators_and_the_pools_share_no_question(tmp_path):
    tools_datagen.main(tmp_path, seed=0)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (REPO / "data" / "tools" / name).read_bytes(), name
    chats = [row["text"] for row in read(tmp_path / "pretrain.jsonl")]
    pretrain = {q for chat in chats for q in re.findall(r"What is \d+ \* \d+\?", chat)}
    assert "chat_template: chatml_compact" in RECIPE.read_text()  # the template the transcripts are rendered with
    assert all(chat.startswith("<|im_start|>system") and "<tool_call>" in chat and "<|im_start|>tool" in chat
               for chat in chats)
    demonstrations = read(tmp_path / "sft.jsonl")
    sft = {row["messages"][0]["content"] for row in demonstrations}
    calling = [row for row in demonstrations if len(row["messages"]) == 4]
    assert 0.25 < len(calling) / len(demonstrations) < 0.35
    estimates = [row["messages"][1]["content"] for row in demonstrations if len(row["messages"]) == 2]
    assert all(e.startswith("About ") for e in estimates)  # never the exact product by the recipe's exact match
    prompts = {row["prompt"] for row in read(tmp_path / "prompts.jsonl")}
    held_out = read(tmp_path / "eval.jsonl")
    pools = [pretrain, sft, prompts, {row["prompt"] for row in held_out}]
    gen = tools_datagen
    assert [len(pool) for pool in pools] == [gen.PRETRAIN_CHATS, gen.SFT_ROWS, gen.PROMPT_ROWS, gen.EVAL_ROWS]
    assert len(set().union(*pools)) == sum(map(len, pools))
    for row in held_out:
        a, b = (int(x) for x in row["prompt"].removeprefix("What is ").removesuffix("?").split(" * "))
        assert row["answer"] == str(a * b)
    tool_turn = calling[0]["messages"][2]
    assert tool_turn["role"] == "tool" and tool_turn["name"] == "calculate"


def test_the_calculator_evaluates_arithmetic_and_nothing_else():
    from examples.tools.calculator import calculate

    assert calculate("417 * 38") == 15846 and calculate("2 + 3 * 4 - 1") == 13
    for code in ("__import__('os').getcwd()", "2 ** 100", "1.5 * 2", "x * 2", "open('f')"):
        with pytest.raises((ValueError, SyntaxError)):
            calculate(code)


@pytest.mark.parametrize("split_digits", [False, True])
def test_split_digits_gives_every_digit_its_own_token_wherever_the_number_stands(split_digits):
    texts = ['What is 417 * 38? {"a": 417, "b": 38} -> 15846. A: 15846'] * 50
    tokenizer = train_bpe(texts, vocab_size=300, min_frequency=2, split_digits=split_digits)
    pieces = [tokenizer.encode(text).tokens for text in ("The answer is 15846.", '"15846"', "(15846)")]
    digits = [[p.removeprefix("Ġ") for p in piece if any(c.isdigit() for c in p)] for piece in pieces]
    if split_digits:
        assert digits == [["1", "5", "8", "4", "6"]] * 3
    else:
        assert any(len(p) > 1 for piece in digits for p in piece)  # BPE merges digits: the same number reads apart
    assert [tokenizer.decode(tokenizer.encode(text).ids) for text in ("x 15846.",)] == ["x 15846."]


def test_split_digits_is_refused_for_a_tokenizer_the_stage_loads():
    spec = TokenizerSpec(name="tok", type="tokenizer", load="some/folder", split_digits=True)
    assert spec.check() == ["split_digits: applies to a tokenizer this stage trains, not to one it loads"]


def test_the_recipe_runs_end_to_end_with_the_live_tool_at_test_scale(tmp_path):
    """recipes/tools.yaml as shipped, with fewer steps and rows: the digit-splitting tokenizer, pretraining, SFT on
    the demonstrations (its held-out loss falls), GRPO calling the live `calculate`, and eval with the tool, which
    reports accuracy and tool-use statistics for both models."""
    sets = ["stages.base.args.max_steps=30", "stages.base.args.per_device_train_batch_size=16",
            "stages.base.dataset.max_samples=400", "stages.sft.args.max_steps=16",
            "stages.sft.args.per_device_train_batch_size=8", "stages.grpo.args.max_steps=2",
            "stages.grpo.args.per_device_train_batch_size=8", "stages.grpo.args.num_generations=4",
            "stages.grpo.dataset.eval.max_samples=4", 'stages.eval.dataset={"path": "data/tools/eval.jsonl", '
            '"max_samples": 6}']
    command = ["run", str(RECIPE), "--output-dir", str(tmp_path / "run")]
    assert main(command + [arg for item in sets for arg in ("--set", item)]) == 0
    stages = summary(tmp_path / "run")["stages"]
    assert all(stage["status"] == "completed" for stage in stages.values())
    sft = stages["sft"]["metrics"]
    assert sft["eval_loss"] < 0.75 * sft["initial_eval_loss"]
    assert stages["grpo"]["metrics"]["tool_errors"] == 0
    evaluated = stages["eval"]["metrics"]
    for model in ("sft", "grpo"):
        assert 0.0 <= evaluated[f"accuracy/{model}"] <= 1.0
        assert {f"tool_calls/{model}", f"tool_malformed/{model}", f"tool_errors/{model}"} <= evaluated.keys()


def answered_by_the_tool(completions: list, **_) -> list[float]:
    """1 for a completion in which the live tool answered a call (a `tool` turn that is not an error), else 0."""
    return [float(isinstance(completion, list) and any(
        message.get("role") == "tool" and not str(message.get("content")).startswith("error") for message in completion))
        for completion in completions]


def quarter_means(history: list[dict], key: str) -> tuple[float, float]:
    trend = first_and_last_quarter(history, (key,))
    return trend[f"train_{key}_first"], trend[f"train_{key}_last"]


def test_grpo_with_the_live_tool_learns_to_call_it_at_test_scale(tmp_path):
    """The recipe's chain at test scale, where GRPO has something to learn: SFT imitates demonstrations that ask
    the calculator for 30% of the questions and estimate the rest, so the model calls it in some samples and not
    in others; GRPO, paid when the live tool answered a call, makes calling the rule. (The recipe itself pays for
    the exact product, which needs the copying that only its full budget teaches; README, "Tools".)"""
    sets = ['stages.base.model={"architecture": "llama", "hidden_size": 64, "num_hidden_layers": 2}',
            "stages.base.args.max_steps=150", "stages.base.args.per_device_train_batch_size=16",
            "stages.sft.args.max_steps=60", "stages.grpo.args.max_steps=16", "stages.grpo.args.learning_rate=1e-4",
            "stages.grpo.args.per_device_train_batch_size=32", "stages.grpo.args.logging_steps=1",
            "stages.grpo.dataset.eval.max_samples=4",
            'stages.grpo.rewards=[{"function": "tests.test_tools_recipe:answered_by_the_tool"}]']
    command = ["run", str(RECIPE), "--output-dir", str(tmp_path / "run"),
               "--stages", "tok,base,sft,grpo"]
    assert main(command + [arg for item in sets for arg in ("--set", item)]) == 0
    history = json.loads((tmp_path / "run" / "grpo" / "log_history.json").read_text())
    calls_first, calls_last = quarter_means(history, "tools/call_frequency")
    answered_first, answered_last = quarter_means(history, "reward")
    assert 0.05 < answered_first < 0.8, "SFT should leave GRPO samples that call and samples that do not"
    assert answered_last > answered_first + 0.2
    assert calls_last > calls_first + 0.2
    assert quarter_means(history, "tools/failure_frequency")[1] == 0  # the calls it learnt run
