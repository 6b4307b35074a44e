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

from tests.conftest import DATA, REPO, kill_at_checkpoint, summary, tiny_stages, write_recipe

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
         "dynamic_sampling": {"max_draws": 2},
         "args": {"max_steps": 2, "num_generations": 4, "per_device_train_batch_size": 8,
                  "max_completion_length": 4, "logging_steps": 1}},
        # The ppo stage's critic-free GRPO: its batch std is all-reduced; dynamic sampling draws with no collective,
        # so ranks that draw different numbers of times must not hang.
        {"name": "ppo_grpo", "type": "ppo", "model": "sft", "rewards": [{"function": "exact_match"}], "peft": LORA,
         "advantage_estimator": "grpo", "dataset": {"path": str(DATA / "prompts.jsonl"), "max_samples": 64},
         "args": {"max_steps": 2, "rollout_batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 1,
                  "max_new_tokens": 4, "dynamic_sampling_max_draws": 3}},
    ]
    recipe = write_recipe(tmp_path, stages)
    result = launch(recipe, "--multi_gpu")
    assert result.returncode == 0
    run_dir = tmp_path / "run"
    assert set(statuses(run_dir).values()) == {"completed"}
    # One main process logs and writes; the other rank only trains.
    assert result.stdout.count("sft: running") == 1 and result.stdout.count("run finished") == 1
    # Dense models use every parameter: DDP is not told to search for unused ones (nor warns it found none).
    assert "find_unused_parameters=True" not in result.stderr
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
    for name, max_draws in (("grpo", 2), ("ppo_grpo", 3)):  # dynamic sampling ran, within its cap
        history = json.loads((run_dir / name / "log_history.json").read_text())
        draws = [row["dynamic_sampling/draws"] for row in history if "dynamic_sampling/draws" in row]
        assert draws and all(1 <= n <= max_draws for n in draws)


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
         "args": {"max_steps": 6, "rollout_batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1,
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
    assert [row["step"] for row in history] == [1, 2, 3, 4, 5, 6]
    # Rewards and KL are gathered from both ranks; the checkpoint at step 2 is accelerate's, with PPO's own state.
    assert (run_dir / "ppo" / "checkpoints" / "checkpoint-2" / "ppo_state.json").is_file()
    output = summary(run_dir)["stages"]["ppo"]["output"]
    adapter = lora_weights(output)  # the policy adapter alone, trained: B starts at zero
    assert adapter and not any("value" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    AutoPeftModelForCausalLM.from_pretrained(output)
    if launcher == "ddp":
        check_killed_ppo_resumes_exactly(tmp_path, stages, launch_args)


def check_killed_ppo_resumes_exactly(tmp_path: Path, stages: list[dict], launch_args: list[str]) -> None:
    """Both ranks killed right after PPO's checkpoint at step 2 (of 6), then relaunched: the run continues as the
    unbroken one did, step for step (each rank's prompt sampler, RNG, optimizer and schedule restored)."""
    import shutil
    import signal

    import psutil

    directory = tmp_path / "killed"
    for stage in ("tok", "base", "sft", "rm"):  # the finished upstream stages of the unbroken run
        shutil.copytree(tmp_path / "run" / stage, directory / "run" / stage)
    recipe = write_recipe(directory, stages)
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--num_processes", "2",
               "--main_process_port", str(free_port()), "-m", "pipeline", "run", str(recipe)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = directory / "run" / "ppo" / "checkpoints" / "checkpoint-2" / "ppo_state.json"
    deadline = time.time() + 600
    while not marker.is_file() and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    # torch's elastic agent starts the ranks in sessions of their own: kill the launcher and every descendant
    for victim in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
        victim.send_signal(signal.SIGKILL)
    process.wait()
    assert summary(directory / "run")["stages"]["ppo"]["status"] != "completed"
    result = launch(recipe, *launch_args)
    assert result.returncode == 0 and "resuming from" in result.stdout

    def history(run_dir: Path) -> list[dict]:
        rows = json.loads((run_dir / "ppo" / "log_history.json").read_text())
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]

    assert history(directory / "run") == history(tmp_path / "run")


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

    from pipeline.runtime.distributed import map_shards, on_main, summed_over_processes

    state = PartialState(cpu=True)
    seen = {"decision": on_main(state, lambda: f"decided by rank {state.process_index}", "deciding"),
            "shards": map_shards(list(range(5)), lambda share: [[item, state.process_index] for item in share]),
            "summed": summed_over_processes({"tool_calls": float(rank + 1), "tool_errors": float(rank)})}

    def disk_full() -> None:
        raise OSError(28, "No space left on device")

    try:
        on_main(state, disk_full, "writing the summary")
    except Exception as err:
        seen["error"] = f"{type(err).__name__}: {err}"
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
    # Tear gloo down before exit: left to interpreter shutdown, its threads can abort the process (SIGABRT).
    torch.distributed.destroy_process_group()


def test_main_decides_and_its_failure_reaches_every_rank_and_shards_gather_in_order(tmp_path):
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
    # Each rank worked on its contiguous share; both got every result back, in item order.
    assert rank0["shards"] == rank1["shards"] == [[0, 0], [1, 0], [2, 0], [3, 1], [4, 1]]
    assert rank0["summed"] == rank1["summed"] == {"tool_calls": 3.0, "tool_errors": 1.0}  # each rank's own counts
    assert rank0["error"] == "OSError: [Errno 28] No space left on device"
    assert rank1["error"] == ("MainProcessFailed: writing the summary failed on the main process: "
                              "OSError: [Errno 28] No space left on device")


def test_zero3_chain_trains_then_generates_sharded(tmp_path):
    """Under ZeRO-3, stages that generate after one that trained (GRPO's held-out checks, eval, generate) load
    whole models, not the shards an earlier Trainer's DeepSpeed config left switched on ("'weight' must be
    2-D" before); eval and generate split the prompts between the processes, and the gathered results are
    those of one process."""
    from pipeline.stages import STAGE_TYPES
    from pipeline.stages.context import StageContext
    from pipeline.validation.recipe_checks import load_recipe

    held_out = {"path": str(DATA / "eval.jsonl"), "max_samples": 13}  # odd: the two shards differ in size
    stages = tiny_stages(pretrain_steps=3)[:2] + [
        {"name": "grpo", "type": "grpo", "model": "base", "peft": LORA, "rewards": [{"function": "format"}],
         "dataset": {"path": str(DATA / "prompts.jsonl"), "max_samples": 32, "eval": held_out},
         "args": {"max_steps": 2, "num_generations": 4, "per_device_train_batch_size": 4,
                  "max_completion_length": 4}},
        {"name": "ev", "type": "eval", "models": ["base", "grpo"], "dataset": held_out, "max_new_tokens": 6,
         "batch_size": 4, "num_samples_table": 13, "reference_column": "answer"},
        {"name": "gen", "type": "generate", "model": "grpo", "dataset": held_out, "judge": {"model": "base"},
         "num_samples": 2, "max_new_tokens": 4},
    ]
    recipe = write_recipe(tmp_path, stages)
    result = launch(recipe, "--config_file", str(CONFIGS / "deepspeed_zero3.yaml"), env={"DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0
    run_dir = tmp_path / "run"
    assert set(statuses(run_dir).values()) == {"completed"}
    out = summary(run_dir)["stages"]
    assert 0.0 <= out["grpo"]["metrics"]["eval_accuracy"] <= 1.0
    listwise = [json.loads(line) for line in (run_dir / "gen" / "output" / "listwise.jsonl").read_text().splitlines()]
    expected_prompts = [json.loads(line)["prompt"] for line in (DATA / "eval.jsonl").read_text().splitlines()[:13]]
    assert [row["prompt"] for row in listwise] == expected_prompts  # every prompt once, in order
    assert all(len(row["responses"]) == 2 for row in listwise)

    # The same eval stage in one process (this one) on the same models: the same greedy responses, same metrics.
    loaded = load_recipe(recipe)
    spec = next(s for s in loaded.stages if s.name == "ev")
    alone = STAGE_TYPES["eval"].run(spec, StageContext(loaded, spec, run_dir))
    # each process batches its own share by length: sums in another order, equal to float precision
    assert alone == pytest.approx(out["ev"]["metrics"], rel=1e-6, abs=1e-6)
    sharded = json.loads((run_dir / "ev" / "output" / "samples.json").read_text())["rows"]
    single = json.loads((run_dir / "ev" / "output.partial" / "samples.json").read_text())["rows"]
    assert [r["responses"] for r in sharded] == [r["responses"] for r in single]


def test_a_launch_of_another_size_skips_finished_stages_and_refuses_their_checkpoints(tmp_path):
    """World size is recorded per stage and per launch: a 1-process run killed mid-stage is not resumed by a
    2-process launch (the global batch would double), the 1-process rerun is, and a later 2-process launch
    skips every finished stage while their records still say how they were trained."""
    recipe = write_recipe(tmp_path, tiny_stages(pretrain_steps=400)[:2])  # long enough to be killed mid-stage
    run_dir = tmp_path / "run"
    command, env = kill_at_checkpoint(recipe, run_dir / "base" / "checkpoints", "checkpoint-*/trainer_state.json",
                                      settle=0.5)
    refused = launch(recipe, "--multi_gpu")
    assert refused.returncode != 0
    assert (f"stage 'base': its checkpoints in {run_dir / 'base' / 'checkpoints'} were made by a launch of "
            "1 process, and this launch is 2 processes, MULTI_CPU") in refused.stderr
    assert any((run_dir / "base" / "checkpoints").iterdir())  # kept for the launch that can resume them

    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
    assert launch(recipe, "--multi_gpu").returncode == 0
    stages = summary(run_dir)["stages"]
    assert {name: stage["status"] for name, stage in stages.items()} == {"tok": "skipped", "base": "skipped"}
    assert stages["base"]["launch"] == {"num_processes": 1, "distributed_type": "NO", "zero_stage": None}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [entry["num_processes"] for entry in manifest["launches"]] == [1, 2, 1, 2]
    assert manifest["launch"] == manifest["launches"][-1] and manifest["launch"]["stage_seconds"] == {}
    assert set(manifest["stage_seconds"]) == {"tok", "base"}  # timings of the launches that ran them, kept
    assert "| base | skipped | 1 process |" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("arguments, config, rest", [
    (["RECIPE", "--stages", "sft"], "accelerate_configs/deepspeed_zero3.yaml", ["--stages", "sft"]),
    (["RECIPE", "accelerate_configs/multi_gpu.yaml", "--stages", "sft"], "accelerate_configs/multi_gpu.yaml",
     ["--stages", "sft"]),
    (["RECIPE"], "accelerate_configs/deepspeed_zero3.yaml", []),
])
def test_slurm_script_tells_config_from_run_options(tmp_path, arguments, config, rest):
    """Without a CONFIG, `pipeline run` options go to the run, not to accelerate as its config file."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nshift 3\nprintf "%s\\n" "$@"\n')
    (shims / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1"}
    result = subprocess.run(["bash", str(CONFIGS / "slurm.sbatch"), *arguments], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # srun's command after `bash -c SCRIPT`: config, GPUs per node, main host, port, recipe, run options.
    assert result.stdout.splitlines() == [config, "8", "localhost", "29500", "RECIPE", *rest]


def test_slurm_script_names_a_missing_config(tmp_path):
    result = subprocess.run(["bash", str(CONFIGS / "slurm.sbatch"), "RECIPE", "nope.yaml"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "accelerate config 'nope.yaml' not found" in result.stderr
