"""The tool-use demonstration (`recipes/tools.yaml`): its data, its digit-splitting tokenizer, and the recipe run
end to end at test scale with the live `multiply` tool."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.stages.specs.tokenizer import TokenizerSpec
from pipeline.stages.tokenizer import train_bpe
from tests.conftest import REPO, summary

sys.path.insert(0, str(REPO / "examples" / "tools"))
import tools_datagen  # noqa: E402

FILES = ("pretrain.jsonl", "sft.jsonl", "prompts.jsonl", "eval.jsonl")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_committed_data_is_the_generators_and_the_pools_share_no_question(tmp_path):
    tools_datagen.main(tmp_path, seed=0)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (REPO / "data" / "tools" / name).read_bytes(), name
    pretrain = {q.split("?")[0] + "?" for row in read(tmp_path / "pretrain.jsonl")
                for q in row["text"].removeprefix("Q: ").split(" Q: ")}
    sft = {row["messages"][0]["content"] for row in read(tmp_path / "sft.jsonl")}
    prompts = {row["prompt"] for row in read(tmp_path / "prompts.jsonl")}
    held_out = read(tmp_path / "eval.jsonl")
    pools = [pretrain, sft, prompts, {row["prompt"] for row in held_out}]
    gen = tools_datagen
    assert [len(pool) for pool in pools] == [gen.PRETRAIN_ROWS * gen.QUESTIONS_PER_TEXT, gen.SFT_ROWS,
                                             gen.PROMPT_ROWS, gen.EVAL_ROWS]
    assert len(set().union(*pools)) == sum(map(len, pools))
    for row in held_out:
        a, b = (int(x) for x in row["prompt"].removeprefix("What is ").removesuffix("?").split(" * "))
        assert row["answer"] == str(a * b)
    tool_turn = read(tmp_path / "sft.jsonl")[0]["messages"][2]
    assert tool_turn["role"] == "tool" and tool_turn["name"] == "multiply"


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
    the demonstrations (its held-out loss falls), GRPO calling the live `multiply`, and eval with the tool, which
    reports accuracy and tool-use statistics for both models."""
    sets = ["stages.base.args.max_steps=30", "stages.base.args.per_device_train_batch_size=16",
            "stages.base.dataset.max_samples=400", "stages.sft.args.max_steps=16",
            "stages.sft.args.per_device_train_batch_size=8", "stages.grpo.args.max_steps=2",
            "stages.grpo.args.per_device_train_batch_size=8", "stages.grpo.args.num_generations=4",
            "stages.grpo.dataset.eval.max_samples=4", 'stages.eval.dataset={"path": "data/tools/eval.jsonl", '
            '"max_samples": 6}']
    command = ["run", str(REPO / "recipes" / "tools.yaml"), "--output-dir", str(tmp_path / "run")]
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
