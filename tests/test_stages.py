"""Stage options on tiny models: mixture-of-experts pretraining, LoRA (saved as adapter or merged), QLoRA."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.cli import main
from pipeline.models.loading import is_adapter, load_causal_lm
from tests.conftest import summary, tiny_stages, write_recipe


def run(tmp_path, stages) -> dict:
    assert main(["run", str(write_recipe(tmp_path, stages))]) == 0
    return summary(tmp_path / "run")["stages"]


def test_mixtral_moe_pretrain(tmp_path):
    stages = tiny_stages(pretrain_steps=10)[:2]
    stages[1]["model"] = {"architecture": "mixtral", "hidden_size": 32, "intermediate_size": 32,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                          "num_local_experts": 4, "num_experts_per_tok": 2}
    out = run(tmp_path, stages)["base"]
    config = json.loads((Path(out["output"]) / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    assert out["metrics"]["eval_loss"] < out["metrics"]["train_loss"] + 1.0

    # Unrouted experts get no gradient: DDP must search for unused parameters there, and only there.
    from transformers import TrainingArguments

    from pipeline.training.trainers import make_config

    def find_unused(model_dir: str) -> bool | None:
        return make_config("transformers.TrainingArguments", {}, output_dir=str(tmp_path / "args"), seed=0,
                           model=load_causal_lm(model_dir)).ddp_find_unused_parameters

    assert find_unused(out["output"]) is True
    (tmp_path / "dense").mkdir()
    dense = run(tmp_path / "dense", tiny_stages(pretrain_steps=1)[:2])["base"]
    assert find_unused(dense["output"]) is False
    assert TrainingArguments(output_dir=str(tmp_path / "args")).ddp_find_unused_parameters is None  # the default


def test_lora_sft_adapter_and_merged(tmp_path):
    stages = tiny_stages(pretrain_steps=20, sft_steps=20)
    stages[2]["peft"] = {"r": 4, "lora_alpha": 8}
    merged = dict(stages[2], name="sft_merged", peft={"r": 4, "lora_alpha": 8, "merge": True})
    out = run(tmp_path, stages + [merged])
    adapter, full = Path(out["sft"]["output"]), Path(out["sft_merged"]["output"])
    assert is_adapter(adapter) and (adapter / "adapter_model.safetensors").is_file()
    assert not is_adapter(full) and (full / "model.safetensors").is_file()
    assert out["sft"]["metrics"]["eval_loss"] < out["sft"]["metrics"]["initial_eval_loss"]
    # The adapter (merged on load) and the merged folder are the same model.
    import torch

    a, b = load_causal_lm(str(adapter)), load_causal_lm(str(full))
    ids = torch.tensor([[1, 5, 9, 20]])
    assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-5)


def test_qlora_4bit_sft_on_cpu(tmp_path):
    stages = tiny_stages(pretrain_steps=20, sft_steps=15)
    # bitsandbytes quantises in blocks of 64 values: rows narrower than that cannot be 4-bit.
    stages[1]["model"].update(hidden_size=64, intermediate_size=128)
    stages[2]["peft"] = {"r": 4, "lora_alpha": 8}
    stages[2]["quantization"] = {"bits": 4}
    out = run(tmp_path, stages)["sft"]
    assert is_adapter(out["output"])
    assert out["metrics"]["eval_loss"] < out["metrics"]["initial_eval_loss"]


def test_a_4bit_model_keeps_its_gradients_after_an_evaluation(tmp_path):
    """bitsandbytes repacks a 4-bit layer for a CPU inference kernel with no backward the first time it runs in
    eval mode (on CPUs with AVX512-BF16, as here): without `keep_4bit_layers_differentiable`, every later training
    step lost the gradient through the quantized layers (LoRA gradients 20-80% off in early layers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.config.specs import QuantizationSpec

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    ids = torch.randint(0, 300, (4, 16))

    def lora_gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        model = get_peft_model(load_causal_lm(str(tmp_path), quantization=QuantizationSpec(bits=4)),
                               LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
        for name, param in model.named_parameters():
            if "lora_B" in name:  # nonzero, so that gradients reach lora_A and earlier layers
                torch.nn.init.normal_(param, std=0.1)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: param.grad for name, param in model.named_parameters() if param.grad is not None}

    fresh, after_eval = lora_gradients(False), lora_gradients(True)
    assert fresh.keys() == after_eval.keys() and len(fresh) == 2 * 2 * 7
    for name in fresh:
        assert torch.allclose(fresh[name], after_eval[name], rtol=1e-4, atol=1e-7), name


def test_tokenizer_stage_loads_an_existing_tokenizer(tmp_path):
    trained = tiny_stages()[0]
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    first = run(tmp_path, [trained])["tok"]["output"]
    loaded_dir = tmp_path / "second"
    loaded_dir.mkdir()
    out = run(loaded_dir, [{"name": "tok", "type": "tokenizer", "load": first, "chat_template": template}])["tok"]
    from transformers import AutoTokenizer

    original, loaded = AutoTokenizer.from_pretrained(first), AutoTokenizer.from_pretrained(out["output"])
    assert loaded.get_vocab() == original.get_vocab() and out["metrics"]["vocab_size"] == len(original)
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"
