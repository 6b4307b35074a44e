"""`pipeline bench --scaling`: how the pipeline's pretraining step time grows with sequence length, batch size
and model size, and the peak memory of SFT with full fine-tuning vs LoRA vs 4-bit QLoRA on one model."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from pipeline.bench.suite import measure
from pipeline.bench.workloads import SIZES, WORKLOADS, build_model, split_data

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
        lines += ["", *memory_table(work, models[size], size, steps, log)]
        return "\n".join(lines)


def memory_table(work: Path, model: Path, size: str, steps: int, log: Callable[[str], None]) -> list[str]:
    """Peak memory of the same SFT run, full fine-tuning vs LoRA vs QLoRA, each in its own process."""
    workload = WORKLOADS["sft"]
    data = split_data(work / "data" / "sft", workload.data, 256)
    rows = [f"SFT peak memory, model {size}, batch {workload.samples_per_step}, {steps} steps",
            f"{'':>22} {'peak MB':>9} {'over baseline MB':>17} {'trainable':>11}"]
    full = None
    for label, keys in MEMORY_VARIANTS.items():
        job = {"stage": "sft", "path": "pipeline", "model": str(model), "train": str(data[0]), "eval": str(data[1]),
               "args": {**workload.args, "max_steps": steps}, "stage_keys": keys, "out": str(work / f"mem-{len(rows)}")}
        result = measure(job)
        used = result["peak_mem_mb"] - result["baseline_mem_mb"]
        full = full or used
        log(f"sft {label}: peak {result['peak_mem_mb']:.0f} MB")
        rows.append(f"{label:>22} {result['peak_mem_mb']:>9.0f} {used:>11.0f} ({used / full:.0%}) "
                    f"{result['trainable_parameters']:>11,}")
    return rows
