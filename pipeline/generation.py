"""Batched greedy/sampled generation from prompts (chat messages or plain strings), and exact-match scoring."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.tasks import exact_match


def render_prompts(tokenizer, prompts: list[Any]) -> list[str]:
    """Chat-message prompts through the chat template (with the assistant turn opened); strings as they are."""
    return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
            for p in prompts]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[Any], *, max_new_tokens: int = 16, batch_size: int = 64,
             do_sample: bool = False, temperature: float = 1.0, num_return_sequences: int = 1) -> list[str]:
    """Completions (special tokens stripped), `num_return_sequences` per prompt, in prompt order."""
    texts = render_prompts(tokenizer, prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                       **sampling)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            out += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def accuracy(responses: list[str], answers: list[str]) -> float:
    """Fraction of responses whose extracted answer equals the reference exactly."""
    return sum(exact_match(r, a) for r, a in zip(responses, answers)) / max(len(answers), 1)


def held_out_accuracy(model, tokenizer, dataset, max_new_tokens: int = 16) -> float:
    """Greedy exact-match accuracy on rows with `prompt` and `answer` (RL stages are judged by this, not by training reward)."""
    responses = generate(model, tokenizer, list(dataset["prompt"]), max_new_tokens=max_new_tokens)
    return accuracy(responses, list(dataset["answer"]))
