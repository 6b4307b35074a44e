"""One prompt -> token ids rendering for the whole project.

TRL's trainers (SFT, DPO, GRPO, Reward) turn a prompt into tokens in one way: chat messages through
`apply_chat_template(..., add_generation_prompt=True)` (the template carries its own special tokens),
plain text through `tokenizer(text)` (BOS and the like, as the tokenizer defines them). Generation for
PPO rollouts, `eval` and `generate` must feed a model exactly those ids, or a policy is sampled on inputs
it was never trained on (a Llama-style tokenizer's missing BOS halved a model's measured accuracy).
"""

from __future__ import annotations

from typing import Any

import torch


def prompt_token_ids(tokenizer, prompt: Any) -> list[int]:
    """The ids a model trained by TRL saw before its completion, for a string or a chat-message prompt."""
    if isinstance(prompt, list):
        encoded = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        return list(encoded["input_ids"])
    ids = tokenizer(prompt)["input_ids"]
    # A tokenizer that appends EOS to every text (add_eos_token) would end the prompt; TRL's SFT starts the
    # completion where prompt and prompt+completion diverge, i.e. before that EOS.
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id \
            and not prompt.endswith(tokenizer.eos_token):
        ids = ids[:-1]
    return ids


def left_padded(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every sequence right-aligned, as decoder-only generation needs.

    The mask comes from the lengths, never from comparing ids with the pad id: where pad == EOS (ChatML
    models), a prompt's own EOS tokens are real input.
    """
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def encode_prompts(tokenizer, prompts: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) of a batch of prompts, rendered by `prompt_token_ids`."""
    return left_padded([prompt_token_ids(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
