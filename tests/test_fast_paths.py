"""Fast paths chosen from the hardware, and what packed SFT relies on (see README, Performance)."""

from __future__ import annotations

import importlib.util

import torch

from pipeline.cli import main
from pipeline.models import loading as modeling
from pipeline.training import trainers as training
from tests.conftest import summary, tiny_stages, write_recipe


def pretend_installed(monkeypatch, *packages: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in packages else real(name, *a))


def test_gpu_fast_paths_follow_hardware_and_packages(monkeypatch):
    assert training.gpu_fast_paths() == {}  # CPU: none apply
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pretend_installed(monkeypatch, "liger_kernel")
    assert training.gpu_fast_paths() == {}  # Liger only where a recipe asks (it fetched a Hub kernel offline)
    pretend_installed(monkeypatch, "liger_kernel", "vllm")
    assert training.gpu_fast_paths() == {"use_vllm": True, "vllm_mode": "colocate"}


def test_fast_path_fields_reach_only_configs_that_have_them(monkeypatch, tmp_path):
    # The values are the harmless ones (nothing GPU-only is switched on here); what is checked is the routing.
    monkeypatch.setattr(training, "gpu_fast_paths", lambda: {"use_liger_kernel": False, "use_vllm": False,
                                                              "vllm_mode": "server"})
    grpo = training.make_config("trl.GRPOConfig", {}, output_dir=str(tmp_path), seed=0)
    sft = training.make_config("trl.SFTConfig", {}, output_dir=str(tmp_path), seed=0)
    assert grpo.vllm_mode == "server" and not hasattr(sft, "vllm_mode")
    recipe = training.make_config("trl.GRPOConfig", {"vllm_mode": "colocate"}, output_dir=str(tmp_path), seed=0)
    assert recipe.vllm_mode == "colocate"  # a recipe's args override every default


def test_flash_attention_only_on_a_bf16_gpu_with_flash_attn(monkeypatch):
    assert modeling.attn_implementation() is None  # CPU: transformers' default, SDPA
    monkeypatch.setattr(modeling, "use_bf16", lambda: True)
    monkeypatch.setattr(modeling.torch.cuda, "is_available", lambda: True)
    assert modeling.attn_implementation() is None  # bf16 GPU without the package
    pretend_installed(monkeypatch, "flash_attn")
    assert modeling.attn_implementation() == "flash_attention_2"
    monkeypatch.setattr(modeling.torch.cuda, "is_available", lambda: False)
    assert modeling.attn_implementation() is None  # bf16 on a CPU (`precision: bf16`): flash_attn runs on GPUs only


def test_packed_rows_attend_only_within_their_row_with_sdpa():
    """Padding-free batches (TRL's `bfd` packing) carry position_ids restarting at 0 and no attention mask;
    without a KV cache (SFTTrainer's `compute_loss` passes `use_cache=False`) transformers builds a
    block-diagonal mask from them for SDPA, so a row packed after another gets the same logits as alone.
    This is what makes `packing: true` correct on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    first, second = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 7))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits
        alone = model(input_ids=second, use_cache=False).logits
        unseparated = model(input_ids=packed, use_cache=False).logits  # one long row: the second attends to the first
    assert torch.allclose(together[:, 5:], alone, atol=1e-5)
    assert not torch.allclose(unseparated[:, 5:], alone, atol=1e-3)


def test_sft_with_packing_learns(tmp_path):
    stages = tiny_stages(pretrain_steps=20, sft_steps=20)
    stages[2]["args"]["packing"] = True  # TRL's bfd packing: rows packed into max_length bins, padding-free
    assert main(["run", str(write_recipe(tmp_path, stages))]) == 0
    sft = summary(tmp_path / "run")["stages"]["sft"]["metrics"]
    assert sft["eval_loss"] < sft["initial_eval_loss"] - 0.5
