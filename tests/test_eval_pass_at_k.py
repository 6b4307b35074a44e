"""pass@k in the eval stage: sampled through the stage's answer check, bounded by the per-sample accuracy."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from tests.conftest import summary, tiny_stages, write_recipe

ROWS = 6


def length_parity(response: str) -> str:
    """An answer extractor (`tests.test_eval_pass_at_k:length_parity`) that an untrained model's random samples
    satisfy about half the time, so pass@k is neither 0 nor 1 without training anything."""
    return str(len(response) % 2)


def test_pass_at_k_covers_the_per_sample_accuracy(tmp_path):
    data = tmp_path / "odd.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": "1"})
                            + "\n" for i in range(ROWS)))

    def evaluation(name: str, pass_at_k: dict) -> dict:
        return {"name": name, "type": "eval", "models": ["base"], "dataset": str(data), "max_new_tokens": 6,
                "answer_extractor": {"function": "tests.test_eval_pass_at_k:length_parity"}, "pass_at_k": pass_at_k}

    # Both stages start from the recipe's seed and sample 4 responses per prompt the same way: the same samples,
    # c correct of them per prompt. pass@1 of 4 is the mean of c / 4; pass@4 of 4, the share of prompts with c > 0.
    stages = tiny_stages(pretrain_steps=3)[:2] + [evaluation("one", {"k": 1, "n": 4}), evaluation("four", {"k": 4})]
    assert main(["run", str(write_recipe(tmp_path, stages))]) == 0
    metrics = {name: summary(tmp_path / "run")["stages"][name]["metrics"] for name in ("one", "four")}
    assert set(metrics["one"]) == {"accuracy/base", "accuracy/base@pass1"}
    assert set(metrics["four"]) == {"accuracy/base", "accuracy/base@pass4"}
    assert metrics["one"]["accuracy/base"] == metrics["four"]["accuracy/base"]
    per_sample, any_of_four = metrics["one"]["accuracy/base@pass1"], metrics["four"]["accuracy/base@pass4"]
    assert 0.0 < per_sample < any_of_four <= 1.0
    assert per_sample * 4 * ROWS == pytest.approx(round(per_sample * 4 * ROWS))  # a count of correct samples
    assert any_of_four * ROWS == pytest.approx(round(any_of_four * ROWS))  # a count of prompts
