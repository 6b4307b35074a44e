"""A LoRA stage started from an unmerged LoRA stage saves a model that plain `peft` loads exactly as trained.

Each stage's trained model is captured in-process just before it is saved; its logits are then compared with
those of the saved output loaded by plain `peft` / `transformers` and by the project's own loader.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.models.loading import base_model_path, is_adapter, load_causal_lm
from pipeline.stages import ppo as ppo_stage
from pipeline.training import trainers as training
from tests.conftest import DATA, summary, tiny_stages, write_recipe

IDS = torch.arange(10, 30).unsqueeze(0)  # 20 ordinary tokens of the tiny vocabulary, no padding
LORA = {"r": 4, "lora_alpha": 16}
PREFS = {"path": str(DATA / "prefs.jsonl"), "max_samples": 64, "test_size": 16}
PROMPTS = {"path": str(DATA / "prompts.jsonl"), "max_samples": 32, "test_size": 8}
RULES = [{"function": "exact_match"}, {"function": "format", "weight": 0.2}]


def stages() -> list[dict]:
    chain = tiny_stages(pretrain_steps=10, sft_steps=15)
    chain[2]["peft"] = dict(LORA)  # an unmerged SFT adapter: the upstream every later stage stacks on
    pairs = {"max_steps": 3, "per_device_train_batch_size": 8, "max_length": 48, "learning_rate": 1e-2}
    grpo_args = {"max_steps": 2, "num_generations": 4, "per_device_train_batch_size": 8,
                 "max_completion_length": 4, "learning_rate": 1e-2}
    return chain + [
        {"name": "dpo", "type": "dpo", "model": "sft", "dataset": PREFS, "peft": dict(LORA), "args": pairs},
        {"name": "dpo_merged", "type": "dpo", "model": "sft", "dataset": PREFS, "peft": {**LORA, "merge": True},
         "args": pairs},
        {"name": "rm", "type": "reward", "model": "sft", "dataset": PREFS, "peft": {**LORA, "merge": False},
         "args": pairs},
        {"name": "grpo", "type": "grpo", "model": "sft", "dataset": PROMPTS, "rewards": RULES, "peft": dict(LORA),
         "args": grpo_args},
        {"name": "ppo", "type": "ppo", "model": "sft", "dataset": PROMPTS, "rewards": RULES, "peft": dict(LORA),
         "args": {"max_steps": 2, "rollout_batch_size": 8, "mini_batch_size": 8, "max_new_tokens": 4,
                  "learning_rate": 1e-2}},
    ]


def scores(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits.float()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(stage records, logits of each stage's model as it was when the stage saved it)."""
    directory = tmp_path_factory.mktemp("stacked")
    captured: dict[str, torch.Tensor] = {}
    save, save_policy = training.save, ppo_stage.save_policy

    def capture_save(trainer, tokenizer, spec, ctx, **kwargs):
        captured[spec.name] = scores(trainer.accelerator.unwrap_model(trainer.model))
        return save(trainer, tokenizer, spec, ctx, **kwargs)

    def capture_policy(model, tokenizer, spec, ctx):
        model.policy.set_adapter("policy")
        captured[spec.name] = scores(model.policy)
        return save_policy(model, tokenizer, spec, ctx)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "save", capture_save)
        patch.setattr(ppo_stage, "save_policy", capture_policy)
        assert main(["run", str(write_recipe(directory, stages()))]) == 0
    return summary(directory / "run")["stages"], captured


@pytest.mark.parametrize("name", ["dpo", "grpo", "ppo"])
def test_stacked_adapter_loads_with_plain_peft(trained, name):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    records, captured = trained
    output = records[name]["output"]
    assert is_adapter(output)
    assert Path(base_model_path(output)) == Path(output).parent / "base"  # the merged SFT model, not the raw base
    assert torch.allclose(scores(AutoPeftModelForCausalLM.from_pretrained(output)), captured[name], atol=1e-4)
    assert torch.allclose(scores(load_causal_lm(output)), captured[name], atol=1e-4)  # eval's loader agrees
    # The bug this guards against: the adapter on the raw pretrained base, without the SFT adapter, differs.
    raw = AutoModelForCausalLM.from_pretrained(records["base"]["output"])
    assert (scores(PeftModel.from_pretrained(raw, output)) - captured[name]).abs().max() > 1e-2


def test_stacked_merge_keeps_the_upstream_adapter(trained):
    from transformers import AutoModelForCausalLM

    records, captured = trained
    output = records["dpo_merged"]["output"]
    assert not is_adapter(output)
    assert torch.allclose(scores(AutoModelForCausalLM.from_pretrained(output)), captured["dpo_merged"], atol=1e-4)


def test_stacked_reward_adapter_loads_with_plain_peft(trained):
    from peft import AutoPeftModelForSequenceClassification

    records, captured = trained
    output = records["rm"]["output"]
    assert is_adapter(output)
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(output, num_labels=1)
    assert torch.allclose(scores(loaded), captured["rm"], atol=1e-4)
