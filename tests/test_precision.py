"""A recipe's `precision`: `bf16` loads, trains, scores and generates in bf16 on a CPU too (where it pays on CPUs
with AMX), the run records it, a change of precision reruns stages, and validation catches typos and warns where
bf16 would crawl."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import pipeline.validation.preflight as preflight
from pipeline.cli import main
from pipeline.models.loading import use_bf16
from tests.conftest import DATA, MINILM, needs_minilm, summary, tiny_stages, write_recipe


def tensor_dtypes(folder) -> set[str]:
    """The dtypes of every tensor in a saved model folder's safetensors files."""
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as weights:
            dtypes |= {str(weights.get_slice(name).get_dtype()) for name in weights.keys()}
    return dtypes


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """tokenizer -> pretrain -> sft -> reward -> ppo (LoRA) with `precision: bf16`, on this CPU."""
    directory = tmp_path_factory.mktemp("bf16")
    stages = tiny_stages(pretrain_steps=40, sft_steps=40) + [
        {"name": "rm", "type": "reward", "model": "sft", "dataset": {"path": str(DATA / "prefs.jsonl"), "max_samples": 400},
         "args": {"max_steps": 30, "learning_rate": 3e-3, "per_device_train_batch_size": 16, "max_length": 48}},
        {"name": "ppo", "type": "ppo", "model": "sft", "reward_model": "rm", "peft": {"r": 8, "lora_alpha": 16},
         "dataset": {"path": str(DATA / "prompts.jsonl"), "eval": {"path": str(DATA / "eval.jsonl"), "max_samples": 64}},
         "args": {"max_steps": 12, "rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 2,
                  "learning_rate": 3e-3, "max_new_tokens": 6, "kl_coef": 0.05}},
    ]
    recipe = write_recipe(directory, stages, precision="bf16")
    assert main(["run", str(recipe)]) == 0
    return recipe, directory / "run"


def test_bf16_loads_and_trains_in_bf16_and_the_run_records_it(bf16_run):
    _, run_dir = bf16_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["hardware"]["precision"] == "bf16"
    # Pretraining builds its model in fp32 (mixed precision keeps fp32 weights); later stages load in bf16.
    assert tensor_dtypes(run_dir / "base" / "output") == {"F32"}
    assert tensor_dtypes(run_dir / "sft" / "output") == {"BF16"}
    assert tensor_dtypes(run_dir / "rm" / "output") == {"BF16"}
    assert not use_bf16()  # the recipe's precision ends with its run


def test_every_stage_still_learns_in_bf16(bf16_run):
    stages = summary(bf16_run[1])["stages"]
    assert stages["sft"]["metrics"]["eval_loss"] < stages["sft"]["metrics"]["initial_eval_loss"]
    assert stages["rm"]["metrics"]["eval_accuracy"] > 0.8
    ppo = stages["ppo"]["metrics"]
    assert ppo["initial_eval_kl"] == pytest.approx(0.0, abs=1e-3)  # zero-initialised LoRA: policy == reference
    assert ppo["eval_reward/rm"] > ppo["initial_eval_reward/rm"]
    assert ppo["train_reward_last"] > ppo["train_reward_first"]
    assert 0.0 < ppo["eval_kl"] < 2.0


def test_a_changed_precision_reruns_and_auto_is_fp32_on_a_cpu(bf16_run):
    recipe, run_dir = bf16_run

    def statuses(*options: str) -> dict[str, str]:
        assert main(["run", str(recipe), "--stages", "tok,base", *options]) == 0
        return {name: summary(run_dir)["stages"][name]["status"] for name in ("tok", "base")}

    assert statuses() == {"tok": "skipped", "base": "skipped"}
    assert statuses("--set", "precision=fp32") == {"tok": "completed", "base": "completed"}
    assert json.loads((run_dir / "manifest.json").read_text())["hardware"]["precision"] == "fp32"
    assert statuses("--set", "precision=auto") == {"tok": "skipped", "base": "skipped"}  # the same choice here


def test_precision_typo_is_a_recipe_error(tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_stages()[:1], precision="bfloat16")
    assert main(["validate", str(recipe)]) != 0
    assert "precision: must be one of auto, fp32, bf16, got 'bfloat16'; did you mean 'bf16'?" in capsys.readouterr().err


@pytest.mark.parametrize("precision, amx, warned", [("bf16", False, True), ("bf16", True, False),
                                                    ("auto", False, False), ("fp32", False, False)])
def test_bf16_on_a_cpu_without_amx_is_warned_about(tmp_path, capsys, monkeypatch, precision, amx, warned):
    monkeypatch.setattr(preflight, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(preflight.torch.cuda, "is_available", lambda: False)
    recipe = write_recipe(tmp_path, tiny_stages()[:1], precision=precision)
    assert main(["validate", str(recipe), "--no-cache"]) == 0
    assert ("precision: bf16 on a CPU without AMX" in capsys.readouterr().err) == warned


def test_bf16_under_deepspeed_on_a_cpu_is_one_recipe_error(tmp_path, capsys, monkeypatch):
    """transformers refuses bf16 on a CPU unless `use_cpu`, which a DeepSpeed launch cannot set: said once, before
    anything trains, with what to do instead (its own message, once per stage, named `use_cpu`)."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = write_recipe(tmp_path, tiny_stages(), precision="bf16")
    assert main(["validate", str(recipe), "--no-cache"]) != 0
    err = capsys.readouterr().err
    assert err.count("precision: bf16 under DeepSpeed needs a GPU") == 1 and "--multi_gpu" in err
    assert "rejects these values" not in err
    assert main(["validate", str(write_recipe(tmp_path, tiny_stages(), precision="auto")), "--no-cache"]) == 0


def test_qlora_trains_in_bf16(tmp_path):
    """4-bit base weights (bitsandbytes on CPU) with bf16 compute: the adapter learns."""
    stages = tiny_stages(pretrain_steps=20, sft_steps=15)
    stages[1]["model"].update(hidden_size=64, intermediate_size=128)  # bitsandbytes quantises blocks of 64 values
    stages[2]["peft"] = {"r": 4, "lora_alpha": 8}
    stages[2]["quantization"] = {"bits": 4}
    assert main(["run", str(write_recipe(tmp_path, stages, precision="bf16"))]) == 0
    sft = summary(tmp_path / "run")["stages"]["sft"]
    assert sft["metrics"]["eval_loss"] < sft["metrics"]["initial_eval_loss"]
    # TRL casts a quantized model's trainable parameters to bf16 (the QLoRA paper's recipe), here the compute dtype
    assert tensor_dtypes(tmp_path / "run" / "sft" / "output") == {"BF16"}


def test_bf16_across_two_processes(tmp_path):
    """Plain data parallel (gloo) in bf16: the Trainer stages and PPO's own Accelerator on both ranks."""
    from tests.test_distributed import LORA, PREFS, launch, statuses

    stages = tiny_stages(pretrain_steps=6, sft_steps=6) + [
        {"name": "rm", "type": "reward", "model": "sft", "dataset": PREFS,
         "args": {"max_steps": 4, "per_device_train_batch_size": 8, "max_length": 48}},
        {"name": "ppo", "type": "ppo", "model": "sft", "reward_model": "rm", "peft": LORA,
         "dataset": {"path": str(DATA / "prompts.jsonl"), "max_samples": 64},
         "args": {"max_steps": 3, "rollout_batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1,
                  "max_new_tokens": 4}},
    ]
    result = launch(write_recipe(tmp_path, stages, precision="bf16"), "--multi_gpu")
    assert result.returncode == 0
    run_dir = tmp_path / "run"
    assert set(statuses(run_dir).values()) == {"completed"}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["hardware"]["precision"] == "bf16" and manifest["launch"]["num_processes"] == 2
    assert tensor_dtypes(run_dir / "sft" / "output") == {"BF16"}
    history = json.loads((run_dir / "ppo" / "log_history.json").read_text())
    assert [row["step"] for row in history] == [1, 2, 3]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_bf16_lm_head_reads_contiguous_rows(tmp_path, precision):
    """Generation's prefill hands the LM head the last position of each row, a strided view: in bf16 on a CPU,
    torch's batched product then copied the whole weight once per row. fp32 keeps the path it had (no hook)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models.loading import load_causal_lm, recipe_precision

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with recipe_precision(precision):
        model = load_causal_lm(str(tmp_path)).eval()
    head = model.get_output_embeddings()
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))  # runs after ours
    model.generate(input_ids=torch.randint(1, 64, (4, 6)), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(seen) == 3 and all(seen) == (precision == "bf16")
    assert head.weight.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)


def test_a_served_model_loads_in_the_precision_asked(monkeypatch):
    import pipeline.serving.reward_server as reward_server

    seen = []
    monkeypatch.setattr(reward_server, "serve", lambda *args: seen.append(use_bf16()))
    assert main(["serve", "some-model", "--precision", "bf16"]) == 0
    assert main(["serve", "some-model"]) == 0
    assert seen == [True, False]



@needs_minilm
def test_an_encoder_reward_model_trains_in_bf16(tmp_path):
    """A real checkpoint (all-MiniLM-L6-v2, a BERT encoder) through the reward stage in bf16: it learns, and the
    over-long transcript is still cut rather than dropped."""
    from tests.test_encoder_reward import MAX_LENGTH, transcripts

    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in transcripts(200)))
    stage = {"name": "rm", "type": "reward", "model": str(MINILM), "dataset": {"path": str(data), "test_size": 32},
             "args": {"max_steps": 15, "learning_rate": 1e-4, "per_device_train_batch_size": 8, "max_length": MAX_LENGTH}}
    assert main(["run", str(write_recipe(tmp_path, [stage], precision="bf16"))]) == 0
    metrics = summary(tmp_path / "run")["stages"]["rm"]["metrics"]
    assert metrics["eval_accuracy"] > metrics["initial_eval_accuracy"] + 0.2  # observed 0.47 -> 0.91 (fp32: 0.50 -> 0.94)
    assert metrics["truncated_pairs"] >= 1
    assert tensor_dtypes(tmp_path / "run" / "rm" / "output") == {"BF16"}


def test_grpo_rollouts_compute_lora_in_bf16_as_its_loss_does(bf16_run, tmp_path, monkeypatch):
    """TRL computes a bf16 GRPO's loss under autocast, where peft's fp32 adapters compute in bf16; the stage's
    generation runs under the same autocast (without it: in fp32, another rounding of the policy, and slower)."""
    import pipeline.stages.grpo as grpo

    share_prompts, seen = grpo.share_prompts, set()

    def share_and_watch(model, *precision):
        share_prompts(model, *precision)
        lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
        assert lora_a.weight.dtype == torch.float32
        lora_a.register_forward_hook(lambda module, args, out: seen.add(out.dtype))

    monkeypatch.setattr(grpo, "share_prompts", share_and_watch)
    stages = [{"name": "grpo", "type": "grpo", "model": str(bf16_run[1] / "sft" / "output"),
               "dataset": {"path": str(DATA / "prompts.jsonl"), "max_samples": 16},
               "rewards": [{"function": "exact_match"}], "peft": {"r": 4, "lora_alpha": 8},
               "args": {"max_steps": 1, "num_generations": 4, "per_device_train_batch_size": 8,
                        "max_completion_length": 4, "disable_dropout": True}}]
    assert main(["run", str(write_recipe(tmp_path, stages, precision="bf16"))]) == 0
    assert seen == {torch.bfloat16}
