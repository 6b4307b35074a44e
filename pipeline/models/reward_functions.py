"""Reward functions for RL stages, all with TRL's reward-function signature `f(prompts, completions, **columns)`.

- `exact_match`: 1 if the completion's answer (read as `pipeline.data.answers` says) equals the row's `answer`, else 0;
- `format`: 1 for a short one-line answer, else 0 (penalises rambling and missing EOS);
- a reward model: its scalar score of prompt + completion (`RewardModelScorer`); served elsewhere, the same
  score over HTTP (`reward_url`: `pipeline.models.remote`);
- any user function named `package.module:function`.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Callable

import torch
from accelerate import PartialState
from transformers import AutoModelForSequenceClassification

from pipeline.config.paths import import_object
from pipeline.config.specs import RewardTermSpec
from pipeline.data.answers import AnswerCheck, answer_check
from pipeline.data.batching import length_batches
from pipeline.data.prompts import as_model_prompt, trained_on_turns
from pipeline.models.decoding import completion_text
from pipeline.models.judges import judge_scorer
from pipeline.models.loading import NO_LIMIT, compute_dtype, load_tokenizer
from pipeline.models.remote import RemoteRewardScorer

RewardFn = Callable[..., list[float]]


def exact_match_reward(is_correct: AnswerCheck = answer_check()) -> RewardFn:
    """The `exact_match` reward, reading each completion's answer with `is_correct` (`pipeline.data.answers`)."""

    def exact_match_reward(prompts: list, completions: list, answer: list, **_: Any) -> list[float]:
        return [float(is_correct(completion_text(c), a)) for c, a in zip(completions, answer)]

    return exact_match_reward  # TRL logs a reward function under its name: rewards/exact_match_reward/mean


def format_reward(prompts: list, completions: list, **_: Any) -> list[float]:
    """1.0 for a non-empty single-line answer of at most three words."""
    scores = []
    for completion in completions:
        text = completion_text(completion).strip()
        scores.append(float(bool(text) and "\n" not in text and len(text.split()) <= 3))
    return scores


def resolve_function(name: str, is_correct: AnswerCheck = answer_check()) -> RewardFn:
    """A `function:` reward term: a built-in (`exact_match` reads answers with `is_correct`) or a user function."""
    if name == "exact_match":
        return exact_match_reward(is_correct)
    if name == "format":
        return format_reward

    return import_object(name)


class RewardModelScorer:
    """A sequence-classification reward model as a reward function (prompt + completion -> score).

    Sequences longer than the model takes (its tokenizer's `model_max_length`, which the reward stage sets
    to the length it trained at, and its position embeddings) are cut from the left, as in training.
    """

    def __init__(self, path: str, batch_size: int = 32):
        self.tokenizer = load_tokenizer(path)

        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=compute_dtype(),
                                                                        use_safetensors=True).eval()
        self.model.to(PartialState().device)  # this rank's GPU, or the CPU
        self.max_length = max_tokens(self.tokenizer, self.model.config)
        self.batch_size = batch_size
        self.__name__ = f"reward_model:{path}"  # TRL names logged reward columns after this

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        encoded = [encode(self.tokenizer, p, c, self.max_length) for p, c in zip(prompts, completions)]
        scores: list[float] = [0.0] * len(encoded)
        device = next(self.model.parameters()).device
        for rows in length_batches([len(ids) for ids in encoded], self.batch_size):  # similar lengths pad less
            batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
            for i, score in zip(rows, self.model(**batch.to(device)).logits[:, 0].float().tolist()):
                scores[i] = score
        return scores


def max_tokens(tokenizer, config) -> int | None:
    """The longest sequence a model takes: its tokenizer's `model_max_length` and its position embeddings,
    whichever is smaller; None where neither states a limit."""

    limits = [tokenizer.model_max_length, getattr(config.get_text_config(), "max_position_embeddings", None)]
    limits = [n for n in limits if n and n < NO_LIMIT]
    return min(limits) if limits else None


def plain_text(messages: list[dict[str, Any]], tokenizer) -> str:
    """Chat messages as plain text for a tokenizer without a chat template (a BERT-like encoder):
    "User: ..." turns separated by the tokenizer's separator token, "[SEP]", where it has one."""
    separator = f" {tokenizer.sep_token} " if tokenizer.sep_token else "\n\n"
    return separator.join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def encode(tokenizer, prompt: Any, completion: Any, max_length: int | None = None) -> list[int]:
    """Token ids of prompt + completion exactly as the reward model is trained on and scores them.

    Chat data goes through the chat template (which carries its own special tokens), or, where the
    tokenizer has none, becomes plain text (`plain_text`). Plain text gets the tokenizer's special
    tokens ([CLS] ... [SEP] for BERT-like encoders) and an EOS where the tokenizer has one. Over-long
    sequences are cut from the left, so the final replies, the part that differs between chosen and
    rejected, are kept (TRL's RewardTrainer would drop them).
    """
    prompt = as_model_prompt(tokenizer, prompt)  # a plain-text prompt as the reward model was trained on it
    if isinstance(prompt, str) and prompt and tokenizer.chat_template is None and trained_on_turns(tokenizer):
        prompt = [{"role": "user", "content": prompt}]  # an encoder trained on turns: the same `plain_text` form
    if isinstance(prompt, list) and tokenizer.chat_template is not None:
        messages = prompt + (completion if isinstance(completion, list)
                             else [{"role": "assistant", "content": completion}])
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    else:
        if isinstance(prompt, list):
            replies = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            text = plain_text(prompt + replies, tokenizer)
        else:
            text = prompt + completion_text(completion)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
    if max_length is not None and len(ids) > max_length:
        keep_first = 1 if ids[0] in (tokenizer.bos_token_id, tokenizer.cls_token_id) else 0
        ids = ids[:keep_first] + ids[len(ids) - (max_length - keep_first):]
    return ids


def build_reward_terms(terms: list[RewardTermSpec], resolve: Callable[[str], str],
                       is_correct: AnswerCheck = answer_check()) -> tuple[list[RewardFn], list[float], list[str]]:
    """(functions, weights, names) for a stage's reward terms; `resolve` maps a stage name to its output folder,
    `is_correct` is how `exact_match` reads answers."""
    functions, weights, names = [], [], []
    for term in terms:
        if term.reward_model:
            functions.append(RewardModelScorer(resolve(term.reward_model)))
            names.append(term.reward_model.rstrip("/").rsplit("/", 1)[-1])
        elif term.reward_url:
            functions.append(RemoteRewardScorer(term.reward_url, timeout=term.timeout))
            names.append(urllib.parse.urlsplit(term.reward_url).netloc)
        elif term.judge:
            functions.append(judge_scorer(term.judge, resolve))
            names.append("judge")
        else:
            functions.append(resolve_function(term.function, is_correct))
            names.append(term.function.rsplit(":", 1)[-1])
        weights.append(term.weight)
    return functions, weights, names

