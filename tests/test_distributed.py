"""One recipe across processes, for real on CPU: DDP over gloo, DeepSpeed ZeRO-2 and ZeRO-3 (DS_ACCELERATOR=cpu),
the Slurm script, and how ranks stay in step (the main process decides and writes; a failing rank stops the run).

Each launch starts two processes that import the ML stack (tens of seconds), so each runs several stages.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import DATA, REPO, summary, tiny_stages, write_recipe

CONFIGS = REPO / "accelerate_configs"
PREFS = {"path": str(DATA / "prefs.jsonl"), "max_samples": 120, "test_size": 0.15}
DPO_ARGS = {"max_steps": 4, "per_device_train_batch_size": 8, "max_length": 48}
LORA = {"r": 4, "lora_alpha": 8}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(recipe: Path, *launch_args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch [launch_args] --num_processes 2 -m pipeline run RECIPE`, as a user types it."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--num_processes", "2",
               "--main_process_port", str(free_port()), "-m", "pipeline", "run", str(recipe)]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            capture_output=True, text=True, timeout=900)
    print(result.stdout[-5000:], result.stderr[-5000:], sep="\n")  # shown by pytest when a test fails
    return result


def statuses(run_dir: Path) -> dict[str, str]:
    return {name: stage["status"] for name, stage in summary(run_dir)["stages"].items()}


def test_ddp_runs_sft_reward_dpo_grpo(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    stages = tiny_stages(pretrain_steps=6, sft_steps=6)
    stages += [
        {"name": "rm", "type": "reward", "model": "sft", "dataset": PREFS,
         "args": {"max_steps": 4, "per_device_train_batch_size": 8, "max_length": 48}},
        {"name": "dpo", "type": "dpo", "model": "sft", "dataset": PREFS, "peft": LORA, "args": DPO_ARGS},
        {"name": "grpo", "type": "grpo", "model": "sft",
         "dataset": {"path": str(DATA / "prompts.jsonl"), "max_samples": 64, "eval": str(DATA / "eval.jsonl")},
         "rewards": [{"reward_model": "rm", "weight": 0.5}, {"function": "exact_match"}], "peft": LORA,
         "args": {"max_steps": 2, "num_generations": 4, "per_device_train_batch_size": 8,
                  "max_completion_length": 4, "logging_steps": 1}},
    ]
    recipe = write_recipe(tmp_path, stages)
    result = launch(recipe, "--multi_gpu")
    assert result.returncode == 0
    run_dir = tmp_path / "run"
    assert set(statuses(run_dir).values()) == {"completed"}
    # One main process logs and writes; the other rank only trains.
    assert result.stdout.count("sft: running") == 1 and result.stdout.count("run finished") == 1
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["launch"]["num_processes"] == 2 and manifest["launch"]["distributed_type"].endswith("MULTI_CPU")
    assert "![sft curves](plots/sft.png)" in (run_dir / "report.md").read_text()
    # Data parallel: an epoch of 360 training rows is ceil(360 / (16 rows x 2 processes)) = 12 steps, not 23.
    stages_out = summary(run_dir)["stages"]
    assert stages_out["sft"]["metrics"]["train_epoch"] == pytest.approx(6 / 12)
    AutoModelForCausalLM.from_pretrained(stages_out["sft"]["output"])
    AutoModelForSequenceClassification.from_pretrained(stages_out["rm"]["output"], num_labels=1)
    for name in ("dpo", "grpo"):  # LoRA adapters on the SFT model
        AutoPeftModelForCausalLM.from_pretrained(stages_out[name]["output"])
    assert 0.0 <= stages_out["grpo"]["metrics"]["eval_accuracy"] <= 1.0


def lora_weights(adapter_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_sft_and_dpo(tmp_path, stage):
    """ZeRO-2 and ZeRO-3 on CPU; ZeRO-3 shards the weights, yet every output holds full weights (or the LoRA
    adapter) that from_pretrained loads and the next stage starts from."""
    from transformers import AutoModelForCausalLM

    stages = tiny_stages(pretrain_steps=4, sft_steps=4)
    stages += [{"name": "dpo", "type": "dpo", "model": "sft", "dataset": PREFS, "peft": LORA, "args": DPO_ARGS}]
    if stage == 3:  # full weights and TRL's reference copy, both sharded
        stages.append({"name": "dpo_full", "type": "dpo", "model": "sft", "dataset": PREFS, "args": DPO_ARGS})
    result = launch(write_recipe(tmp_path, stages), "--config_file", str(CONFIGS / f"deepspeed_zero{stage}.yaml"),
                    env={"DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0
    run_dir = tmp_path / "run"
    assert set(statuses(run_dir).values()) == {"completed"}
    assert json.loads((run_dir / "manifest.json").read_text())["launch"]["distributed_type"].endswith("DEEPSPEED")

    # The checkpoint is DeepSpeed's, at the configured stage; under ZeRO-3 each rank holds empty placeholders.
    states = sorted((run_dir / "sft" / "checkpoints").glob("checkpoint-4/global_step4/*model_states.pt"))
    assert states
    saved = torch.load(states[0], map_location="cpu", weights_only=False)
    assert saved["ds_config"]["zero_optimization"]["stage"] == stage
    if stage == 3:
        assert all(t.numel() == 0 for t in saved["module"].values())

    out = summary(run_dir)["stages"]
    for name in ("base", "sft", "dpo_full")[:stage]:
        model = AutoModelForCausalLM.from_pretrained(out[name]["output"])
        assert sum(p.numel() for p in model.parameters()) == out["base"]["metrics"]["num_parameters"]
    adapter = lora_weights(out["dpo"]["output"])  # the adapter itself, trained: B starts at zero
    assert adapter and any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


@pytest.mark.parametrize("launcher", ["ddp", "zero2"])
def test_ppo_across_two_processes(tmp_path, launcher):
    """The project's own PPO trainer under DDP (gloo) and DeepSpeed ZeRO-2: both ranks roll out and update one
    policy, and the main process checkpoints and saves its LoRA adapter."""
    from peft import AutoPeftModelForCausalLM

    stages = tiny_stages(pretrain_steps=6, sft_steps=6)
    stages += [
        {"name": "rm", "type": "reward", "model": "sft", "dataset": PREFS,
         "args": {"max_steps": 4, "per_device_train_batch_size": 8, "max_length": 48}},
        {"name": "ppo", "type": "ppo", "model": "sft", "reward_model": "rm", "peft": LORA,
         "dataset": {"path": str(DATA / "prompts.jsonl"), "max_samples": 64,
                     "eval": {"path": str(DATA / "eval.jsonl"), "max_samples": 16}},
         "args": {"max_steps": 3, "rollout_batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1,
                  "max_new_tokens": 4, "learning_rate": 1e-2, "save_steps": 2}},
    ]
    launch_args = (["--multi_gpu"] if launcher == "ddp"
                   else ["--config_file", str(CONFIGS / "deepspeed_zero2.yaml")])
    result = launch(write_recipe(tmp_path, stages), *launch_args, env={"DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0
    run_dir = tmp_path / "run"
    assert set(statuses(run_dir).values()) == {"completed"}
    distributed = json.loads((run_dir / "manifest.json").read_text())["launch"]["distributed_type"]
    assert distributed.endswith("MULTI_CPU" if launcher == "ddp" else "DEEPSPEED")
    history = json.loads((run_dir / "ppo" / "log_history.json").read_text())
    assert [row["step"] for row in history] == [1, 2, 3]
    # Rewards and KL are gathered from both ranks; the checkpoint at step 2 is accelerate's, with PPO's own state.
    assert (run_dir / "ppo" / "checkpoints" / "checkpoint-2" / "ppo_state.json").is_file()
    output = summary(run_dir)["stages"]["ppo"]["output"]
    adapter = lora_weights(output)  # the policy adapter alone, trained: B starts at zero
    assert adapter and not any("value" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    AutoPeftModelForCausalLM.from_pretrained(output)


def test_slurm_script_and_a_failing_rank(tmp_path):
    """accelerate_configs/slurm.sbatch on one 2-process node (srun and scontrol stand-ins), on a recipe whose
    GRPO reward function fails on rank 1 only, mid-training: the run stops with that rank's error, no hang."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')  # one task: here
    (shims / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    stages = tiny_stages(pretrain_steps=2)[:2] + [
        {"name": "grpo", "type": "grpo", "model": "base", "dataset": {"path": str(DATA / "prompts.jsonl"),
                                                                     "max_samples": 64},
         "rewards": [{"function": "tests.faulty:reward_failing_on_rank_1"}],
         "args": {"max_steps": 2, "num_generations": 4, "per_device_train_batch_size": 8,
                  "max_completion_length": 4}}]
    recipe = write_recipe(tmp_path, stages)
    env = {**os.environ, "PATH": f"{shims}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_NODELIST": "node1",
           "MAIN_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    started = time.time()
    result = subprocess.run(["bash", str(CONFIGS / "slurm.sbatch"), str(recipe), str(CONFIGS / "multi_gpu.yaml")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(result.stdout[-5000:], result.stderr[-5000:], sep="\n")
    assert result.returncode != 0
    root_cause = result.stderr.split("Root Cause (first observed failure)")[-1]
    assert "rank      : 1" in root_cause and "RuntimeError: reward function failed on rank 1" in root_cause
    assert time.time() - started < 600  # stopped, not waiting out gloo's 30-minute collective timeout
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "manifest.json").read_text())["launch"]["num_processes"] == 2
    assert statuses(run_dir)["base"] == "completed" and statuses(run_dir)["grpo"] != "completed"
    assert not (run_dir / "grpo" / "result.json").exists()


def _on_main_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two ranks exercising `on_main` over gloo; writes what it saw to rank<N>.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    from accelerate import PartialState

    from pipeline.distributed import on_main

    state = PartialState(cpu=True)
    seen = {"decision": on_main(state, lambda: f"decided by rank {state.process_index}", "deciding")}

    def disk_full() -> None:
        raise OSError(28, "No space left on device")

    try:
        on_main(state, disk_full, "writing the summary")
    except Exception as err:
        seen["error"] = f"{type(err).__name__}: {err}"
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
    # Tear gloo down before exit: left to interpreter shutdown, its threads can abort the process (SIGABRT).
    torch.distributed.destroy_process_group()


def test_main_decides_and_its_failure_reaches_every_rank(tmp_path):
    context = torch.multiprocessing.start_processes(_on_main_worker, args=(free_port(), str(tmp_path)), nprocs=2,
                                                    join=False, start_method="spawn")
    deadline = time.time() + 300
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("ranks hung in on_main")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["decision"] == rank1["decision"] == "decided by rank 0"
    assert rank0["error"] == "OSError: [Errno 28] No space left on device"
    assert rank1["error"] == ("MainProcessFailed: writing the summary failed on the main process: "
                              "OSError: [Errno 28] No space left on device")
