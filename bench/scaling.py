"""`python -m bench --scaling`: how the pipeline's pretraining step time grows with sequence length, batch size
and model size; with it, or alone with `--memory`, the memory of SFT with full fine-tuning vs LoRA vs 4-bit
QLoRA on one model."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from bench.suite import measure
from bench.workloads import SIZES, WORKLOADS, build_model, split_data

SEQ_LENGTHS, BATCH_SIZES = (64, 128, 256, 512), (4, 8, 16, 32)
BASE_SEQ, BASE_BATCH = 128, 8
LORA = {"r": 16, "lora_alpha": 32}
MEMORY_VARIANTS = {"full": {}, "LoRA r=16": {"peft": LORA},
                   "QLoRA 4-bit r=16": {"peft": LORA, "quantization": {"bits": 4}}}


def run_scaling(size: str, steps: int, log: Callable[[str], None]) -> str:
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        work = Path(tmp)
        models = {name: build_model(work / f"model-{name}", name) for name in SIZES}
        cache: dict[tuple, dict[str, Any]] = {}

        def pretrain_step(model: str, seq: int, batch: int) -> dict[str, Any]:
            if (model, seq, batch) not in cache:
                data = split_data(work / "data" / "pretrain", "pretrain.jsonl", 2000)
                job = {"stage": "pretrain", "path": "pipeline", "model": str(models[model]), "train": str(data[0]),
                       "eval": str(data[1]), "out": str(work / f"pretrain-{model}-{seq}-{batch}"),
                       "args": {"per_device_train_batch_size": batch, "learning_rate": 1e-3, "max_steps": steps},
                       "stage_keys": {"block_size": seq}}
                result = measure(job)
                cache[model, seq, batch] = {"step_ms": 1000 * result["loop_s"] / steps,
                                            "tokens_per_s": result["train_tokens"] / result["loop_s"],
                                            "params": result["num_parameters"]}
                log(f"pretrain {model} seq {seq} batch {batch}: {cache[model, seq, batch]['step_ms']:.0f} ms/step")
            return cache[model, seq, batch]

        def sweep(title: str, points: list[tuple[str, tuple]]) -> list[str]:
            rows = [f"{title:>22} {'params':>10} {'step ms':>9} {'tokens/s':>9}"]
            for label, key in points:
                r = pretrain_step(*key)
                rows.append(f"{label:>22} {r['params']:>10,} {r['step_ms']:>9.0f} {r['tokens_per_s']:>9.0f}")
            return rows

        lines = [f"pretraining, {steps} steps each; step time = training loop / steps", ""]
        lines += sweep(f"seq len (batch {BASE_BATCH}, {size})", [(str(n), (size, n, BASE_BATCH)) for n in SEQ_LENGTHS])
        lines += [""] + sweep(f"batch (seq {BASE_SEQ}, {size})", [(str(b), (size, BASE_SEQ, b)) for b in BATCH_SIZES])
        lines += [""] + sweep(f"model (seq {BASE_SEQ}, batch {BASE_BATCH})",
                              [(m, (m, BASE_SEQ, BASE_BATCH)) for m in SIZES])
        lines += ["", *memory_table(measure_memory(work, models[size], steps, log), size, steps)]
        return "\n".join(lines)


def run_memory(size: str, steps: int, log: Callable[[str], None]) -> dict[str, dict[int, dict[str, float]]]:
    """`python -m bench --memory`: `measure_memory` on a fresh model of `size`."""
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        work = Path(tmp)
        return measure_memory(work, build_model(work / f"model-{size}", size), steps, log)


MEMORY_KEYS = ("weights_mb", "gradients_mb", "optimizer_state_mb", "peak_mem_mb", "baseline_mem_mb",
               "trainable_parameters")


def measure_memory(work: Path, model: Path, steps: int, log: Callable[[str], None]) -> dict[str, dict[int, dict]]:
    """Memory of the same SFT run, full fine-tuning vs LoRA vs QLoRA, each in its own process, at the
    workload's batch and at batch 2 (where activations are small): {variant: {batch: numbers}}."""
    workload = WORKLOADS["sft"]
    data = split_data(work / "data" / "sft", workload.data, 256)
    results: dict[str, dict[int, dict[str, float]]] = {label: {} for label in MEMORY_VARIANTS}
    for batch in (workload.samples_per_step, 2):
        for label, keys in MEMORY_VARIANTS.items():
            job = {"stage": "sft", "path": "pipeline", "model": str(model), "train": str(data[0]),
                   "eval": str(data[1]), "stage_keys": keys, "out": str(work / f"mem-{batch}-{label.split()[0]}"),
                   "args": {**workload.args, "per_device_train_batch_size": batch, "max_steps": steps}}
            results[label][batch] = {k: v for k, v in measure(job).items() if k in MEMORY_KEYS}
            log(f"sft {label} batch {batch}: peak {results[label][batch]['peak_mem_mb']:.0f} MB")
    return results


def memory_table(results: dict[str, dict[int, dict[str, float]]], size: str, steps: int) -> list[str]:
    """The training state counted from its tensors (weights + gradients + optimizer state), and the process's
    peak against its memory after importing the libraries; percentages relative to full fine-tuning."""
    rows = [f"SFT memory, model {size}, {steps} steps; state = weights + gradients + optimizer state (MB)",
            f"{'':>22} {'batch':>5} {'weights':>8} {'grads':>7} {'optim':>7} {'state':>14} "
            f"{'peak MB':>8} {'over baseline':>14} {'trainable':>11}"]
    for batch in next(iter(results.values())):
        full = None
        for label, by_batch in results.items():
            r = by_batch[batch]
            state = r["weights_mb"] + r["gradients_mb"] + r["optimizer_state_mb"]
            used = r["peak_mem_mb"] - r["baseline_mem_mb"]
            full = full or (state, used)
            rows.append(f"{label:>22} {batch:>5} {r['weights_mb']:>8.1f} {r['gradients_mb']:>7.1f} "
                        f"{r['optimizer_state_mb']:>7.1f} {state:>7.1f} ({state / full[0]:>4.0%}) "
                        f"{r['peak_mem_mb']:>8.0f} {used:>7.0f} ({used / full[1]:>4.0%}) "
                        f"{r['trainable_parameters']:>11,}")
    return rows
