"""Batched greedy/sampled generation from prompts (chat messages or plain strings), response log-probs, exact match."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.data.answers import AnswerCheck, answer_check, reference_answer
from pipeline.data.batching import MAX_PADDING_SHARE, length_batches
from pipeline.data.prompts import left_padded, prompt_token_ids
from pipeline.models.sampling import first_stop, model_distribution, stop_token_ids
from pipeline.models.shared_prompts import generate_sharing_prompts


def prompt_text(prompt: Any) -> str:
    """A prompt as plain text for people and judges: a single message's content, else `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def completion_text(completion: Any) -> str:
    """The text the model wrote, from a completion given as a string or as chat messages: with tools, its
    assistant turns only (a tool's answer is not the model's, so an answer copied from it must be written out)."""
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")
    return completion


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[Any], *, max_new_tokens: int = 16, batch_size: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, num_return_sequences: int = 1,
                 tools: list[list] | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per completion, `num_return_sequences` per prompt, in prompt order.

    Prompts are tokenized as training saw them (`pipeline.data.prompts`), each with the tools it may call (`tools`,
    one list per prompt), and generated in batches of similar length (`pipeline.data.batching`). Padding is removed;
    a response ends with its first stop id (`pipeline.models.sampling`; kept: ending is part of what the model
    chose) or after `max_new_tokens`. Sampling is plain (top_k=0, top_p=1, none of the model's shipped penalties),
    so samples follow the model's distribution.
    """
    model.eval()
    n = num_return_sequences
    out: list[tuple[list[int], list[int]]] = [([], [])] * (len(prompts) * n)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
    stops = stop_token_ids(model, tokenizer)
    prompt_ids = [prompt_token_ids(tokenizer, p, tools[i] if tools is not None else None) for i, p in enumerate(prompts)]
    # On a GPU a batch decodes about as fast as one row, so more batches would cost more steps than padding
    # costs; there rows are only sorted. On a CPU every row and padded position costs, and batches split.
    split = MAX_PADDING_SHARE if model.device.type == "cpu" else 1.0
    for batch in length_batches([len(ids) + max_new_tokens for ids in prompt_ids], batch_size, split):
        input_ids, attention_mask = (t.repeat_interleave(n, dim=0).to(model.device)
                                     for t in left_padded([prompt_ids[i] for i in batch], tokenizer.pad_token_id))
        # rows as `num_return_sequences` lays them out, each prompt read once
        with model_distribution(model):
            generated = generate_sharing_prompts(model, model.generate, input_ids, attention_mask,
                                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                                 eos_token_id=stops, **sampling)
        for row_index, row in enumerate(generated.tolist()):
            response = first_stop(row[input_ids.shape[1]:], stops)
            prompt = batch[row_index // n]
            out[prompt * n + row_index % n] = (prompt_ids[prompt], response)
    return out


def generate(model, tokenizer, prompts: list[Any], *, max_new_tokens: int = 16, batch_size: int = 64,
             do_sample: bool = False, temperature: float = 1.0, num_return_sequences: int = 1) -> list[str]:
    """Completions (special tokens stripped), `num_return_sequences` per prompt, in prompt order."""
    pairs = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         do_sample=do_sample, temperature=temperature, num_return_sequences=num_return_sequences)
    return tokenizer.batch_decode([response for _, response in pairs], skip_special_tokens=True)


@torch.no_grad()
def response_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 64) -> list[list[float]]:
    """Log-prob of each response token given the prompt and the tokens before it, per (prompt, response) pair.

    Pairs are scored in batches of similar length (`pipeline.data.batching`). Each row is laid out so that every
    prompt ends at the same position (padded on the left, responses on the right, positions counted from each
    row's first token), so the logits of the response positions alone are computed (`logits_to_keep`): with long
    prompts and a large vocabulary the rest would be most of the memory."""
    model.eval()
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in pairs]
    for batch in length_batches([len(p) + len(r) for p, r in pairs], batch_size):
        chunk = [pairs[i] for i in batch]
        prompt_width, response_width = max(len(p) for p, _ in chunk), max(len(r) for _, r in chunk)
        ids = torch.zeros(len(chunk), prompt_width + response_width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (prompt, response) in enumerate(chunk):
            first = prompt_width - len(prompt)
            ids[i, first:prompt_width + len(response)] = torch.tensor(prompt + response)
            mask[i, first:prompt_width + len(response)] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # the logits at positions prompt_width - 1 ... predict the response tokens
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=response_width + 1).logits[:, :-1].float()
        logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, prompt_width:, None].to(device))[..., 0].cpu()
        for row, (i, (_, response)) in enumerate(zip(batch, chunk)):
            out[i] = logps[row, :len(response)].tolist()
    return out


def accuracy(responses: list[str], answers: list, is_correct: AnswerCheck = answer_check()) -> float:
    """Fraction of responses whose answer (read by `is_correct`, `pipeline.data.answers`) equals the reference
    exactly, over the rows that have a reference answer."""
    checked = [(r, a) for r, a in zip(responses, answers) if reference_answer(a)]
    return sum(is_correct(r, a) for r, a in checked) / max(len(checked), 1)

