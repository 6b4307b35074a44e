"""One prompt -> token ids rendering for the whole project.

TRL's trainers (SFT, DPO, GRPO, Reward) turn a prompt into tokens in one way: chat messages through
`apply_chat_template(..., add_generation_prompt=True)` (the template carries its own special tokens),
plain text through `tokenizer(text)` (BOS and the like, as the tokenizer defines them). Generation for
PPO rollouts, `eval` and `generate` must feed a model exactly those ids, or a policy is sampled on inputs
it was never trained on (a Llama-style tokenizer's missing BOS halved a model's measured accuracy).

A plain-text prompt is rendered the way the model was trained (`renders_chat`): a chat model given raw text
continues it ("How can I rob a store" -> " with a hammer and anvil?") instead of answering. The stages that
teach a format record it in the tokenizer they save (`record_prompt_format`, kept in tokenizer_config.json),
so every later stage, and every generator, reads it from the model itself.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Iterator

import torch
from datasets import Dataset

# The recipe's `prompt_format` (`pipeline.config.recipe`), set by the runner around each stage.
_RECIPE_FORMAT: ContextVar[str] = ContextVar("prompt_format", default="auto")
RECORD_KEY = "prompt_format"  # in tokenizer_config.json: "chat" or "raw", what the model was trained on
TEMPLATES_KEY = "alpaca_templates"  # in tokenizer_config.json: [with an input, without] SFT rendered Alpaca rows by


@contextlib.contextmanager
def recipe_prompt_format(value: str) -> Iterator[None]:
    """Render prompts as the recipe's `prompt_format` says while the block runs."""
    token = _RECIPE_FORMAT.set(value)
    try:
        yield
    finally:
        _RECIPE_FORMAT.reset(token)


def record_prompt_format(tokenizer, chat: bool) -> None:
    """Note in the tokenizer (saved with it) whether the model was trained on chat turns or on plain text."""
    tokenizer.init_kwargs[RECORD_KEY] = "chat" if chat else "raw"


def record_alpaca_templates(tokenizer, templates: tuple[str, str]) -> None:
    """Note in the tokenizer the templates SFT rendered Alpaca rows through for a model that takes plain text,
    so that later stages prompt it with them (`pipeline.data.formats.as_prompts`)."""
    tokenizer.init_kwargs[TEMPLATES_KEY] = list(templates)


def alpaca_templates(tokenizer) -> tuple[str, str] | None:
    """The recorded Alpaca templates where the model takes plain-text prompts (`renders_chat` false), else None:
    a chat model was trained on the request as a user turn."""
    found = tokenizer.init_kwargs.get(TEMPLATES_KEY)
    return tuple(found) if found and not renders_chat(tokenizer) else None


def renders_chat(tokenizer) -> bool:
    """Whether plain-text prompts to this tokenizer's model become a user turn through its chat template."""
    if _RECIPE_FORMAT.get() == "raw" or tokenizer.chat_template is None:
        return False
    return tokenizer.init_kwargs.get(RECORD_KEY, "chat") == "chat"


def trained_on_turns(tokenizer) -> bool:
    """Whether the saved tokenizer records training on chat turns (`record_prompt_format`); for a tokenizer without
    a chat template, turns rendered as plain text (an encoder reward model, `reward_functions.plain_text`)."""
    return tokenizer.init_kwargs.get(RECORD_KEY) == "chat"


def rendering(tokenizer) -> str:
    """How this tokenizer's model gets plain-text prompts, in words (for logs and `validate`)."""
    if renders_chat(tokenizer):
        return "chat template (user turn)"
    if tokenizer.chat_template is None:
        return "plain text (no chat template)"
    return "plain text (prompt_format: raw)" if _RECIPE_FORMAT.get() == "raw" else "plain text (as trained)"


def as_model_prompt(tokenizer, prompt: Any) -> Any:
    """`prompt` as the model takes it: a non-empty plain string becomes a user turn where `renders_chat`."""
    if isinstance(prompt, str) and prompt and renders_chat(tokenizer):
        return [{"role": "user", "content": prompt}]
    return prompt


def as_model_rows(dataset: Dataset, tokenizer) -> Dataset:
    """Rows for a TRL trainer, with plain-text prompts rendered as `as_model_prompt` says (see `user_turns`)."""
    return user_turns(dataset) if renders_chat(tokenizer) else dataset


def user_turns(dataset: Dataset) -> Dataset:
    """Plain-text prompts as user turns, and plain-text replies beside them (`completion`, `chosen`, `rejected`)
    as assistant turns, since TRL takes a row as conversational only when all of it is. Rows without a prompt
    (whole texts) and chat rows stay as they are."""
    if "prompt" not in dataset.column_names or not len(dataset) or not isinstance(dataset[0]["prompt"], str) or not all(dataset["prompt"]):
        return dataset
    replies = [c for c in ("completion", "chosen", "rejected") if c in dataset.column_names]

    def render(row: dict[str, Any]) -> dict[str, Any]:
        out = {"prompt": [{"role": "user", "content": row["prompt"]}]}
        return out | {c: [{"role": "assistant", "content": row[c]}] for c in replies if isinstance(row[c], str)}
    return dataset.map(render)


def prompt_token_ids(tokenizer, prompt: Any, tools: list | None = None) -> list[int]:
    """The ids a model trained by TRL saw before its completion, for a string or a chat-message prompt (chat
    prompts with the `tools` it may call shown, as TRL shows them)."""
    prompt = as_model_prompt(tokenizer, prompt)
    if isinstance(prompt, list):
        encoded = tokenizer.apply_chat_template(prompt, tools=tools or None, tokenize=True, add_generation_prompt=True,
                                                return_dict=True)
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
