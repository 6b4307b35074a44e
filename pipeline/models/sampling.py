"""What a rollout, an eval or a sample is drawn from: the model's own distribution, ended at any of its stop ids.

Hub models ship decoding defaults in `generation_config.json` (Qwen2.5-Instruct: `repetition_penalty` 1.05, `top_k`
20; others `min_p`, `no_repeat_ngram_size`, `min_new_tokens`), and transformers' `generate` applies each one that
a call leaves unset, also under a `generation_config` of the caller's (TRL's GRPO and RLOO pass one). Such a
sample is not the model's distribution: RL would update on off-policy samples, a KL estimate would be biased, and
"greedy" eval would score a penalised decoding. So the stages generate with the model's config reduced to its
token ids and cache settings, and stop at every end-of-sequence id it lists (Gemma's `<end_of_turn>`, Phi-3's
`<|end|>`), not only the tokenizer's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from transformers import GenerationConfig

# what `generate` may take from the model's own config: which tokens begin, end and pad, and how it caches
KEPT_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "use_cache",
               "cache_implementation", "cache_config")


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a response: the tokenizer's EOS, then every EOS id of the model's generation config (as
    TRL's GRPOTrainer collects them, so every stage ends a response at the same tokens)."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    first = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return list(dict.fromkeys(first + listed))


def first_stop(response: list[int], stops: list[int]) -> list[int]:
    """`response` up to and including its first stop id (ending is part of what the model chose)."""
    ends = [i for i, token in enumerate(response) if token in stops]
    return response[:ends[0] + 1] if ends else response


@contextmanager
def model_distribution(model) -> Iterator[None]:
    """Inside, `model.generate` takes nothing but token ids and cache settings from the model's generation
    config: the call's own arguments decide how to sample (see the module docstring)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model generates
    shipped = getattr(target, "generation_config", None)                             # through its base's config
    if shipped is None:
        yield
        return
    target.generation_config = GenerationConfig(
        **{name: getattr(shipped, name) for name in KEPT_FIELDS if getattr(shipped, name, None) is not None})
    try:
        yield
    finally:
        target.generation_config = shipped
