"""Generation that reads each distinct prompt once: GRPO, RLOO, grouped PPO and pass@k sample several responses
per prompt, and `generate` (also with `num_return_sequences`) runs the whole prompt through the model once per
response. Here the distinct prompts fill a KV cache once, each row gets a copy of its prompt's cache, and
`generate` carries on from it with the same logits and the same sampling draws: the same tokens for the same seed.

Not where the model draws random numbers as it reads: TRL generates GRPO and RLOO rollouts in training mode, so
with LoRA's dropout on (`lora_dropout`, unless `disable_dropout: true`), reading each prompt once would draw fewer
dropout masks and so other samples than before (from the same distribution). Those calls generate as before, so
a recipe's numbers do not change with this speed-up.

transformers offers no prefix sharing for `generate`; its continuous batching (`generate_batch`, which shares
blocks) ran 50-100x slower than `generate` on CPU (quickstart's model, 2026-12-04), so this is done here, with the
cache API `generate` itself uses to continue from a cached prefix.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation import utils as generation_utils

# transformers 5.2x renamed `past_key_values` to `cache` (the old name is deprecated); the first of these names
# is the one the installed version reads and writes
CACHE = getattr(generation_utils, "ALL_CACHE_NAMES", ["past_key_values"])[0]


def generate_sharing_prompts(model, generate: Callable[..., torch.Tensor], input_ids: torch.Tensor,
                             attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """`generate(input_ids=..., attention_mask=..., **kwargs)`, with each distinct (left-padded) prompt row read
    by `model` once. All but the last prompt token go into the shared cache, so `generate` still runs the model
    on the last one and samples its first token from logits of its own.

    Falls back to `generate` as it is when no prompt repeats; when the model draws random numbers as it reads
    (`draws_random_numbers`); when the call brings its own cache, asks for a
    cache `generate` must build (`cache_implementation`) or brings other model inputs (a multimodal model's
    pixels, token types); for encoder-decoder models; and for caches holding more than attention keys and values
    (a hybrid model's recurrent state, which copying the keys and values alone would leave wrong)."""
    config = kwargs.get("generation_config")
    own_cache = any(kwargs.get(k) is not None for k in (CACHE, "past_key_values", "cache_implementation")) or \
        getattr(config, "cache_implementation", None) is not None
    other_inputs = any(isinstance(value, torch.Tensor) for value in kwargs.values())
    if own_cache or other_inputs or draws_random_numbers(model) or model.config.is_encoder_decoder \
            or input_ids.shape[1] < 2 or not attention_only(DynamicCache(config=model.config)):
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    distinct, row_of = torch.unique(rows, dim=0, return_inverse=True)
    if len(distinct) == len(rows):
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    width = input_ids.shape[1]
    prefix_ids, prefix_mask = distinct[:, :width - 1], distinct[:, width:2 * width - 1]
    # positions as `generate` numbers left-padded rows: counted from each row's first real token
    positions = (prefix_mask.cumsum(-1) - 1).masked_fill(prefix_mask == 0, 0)
    with torch.no_grad():
        cache = model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions, use_cache=True,
                      logits_to_keep=1)[CACHE]
    if not attention_only(cache):  # a cache of its own kind, which the config did not show: read the prompts anew
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    cache.batch_select_indices(row_of)
    return generate(input_ids=input_ids, attention_mask=attention_mask, **{CACHE: cache}, **kwargs)


def attention_only(cache) -> bool:
    """Whether `cache` holds attention keys and values alone, which rows can copy from one another."""
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in getattr(cache, "layers", [None]))


def draws_random_numbers(model) -> bool:
    """Whether a forward pass of `model` draws random numbers: dropout (a layer's, or attention's) in training mode."""
    if not model.training:
        return False
    return getattr(model.config, "attention_dropout", 0) > 0 or \
        any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in model.modules())


class SharedPromptGenerate:
    """A model's `generate`, reading repeated prompts once (`generate_sharing_prompts`). Installed on the model
    object that TRL's GRPO-family trainers call `generate` on (`share_prompts`)."""

    def __init__(self, model) -> None:
        self.model, self.generate = model, type(model).generate.__get__(model)

    def __call__(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        if input_ids is None or attention_mask is None:
            return self.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return generate_sharing_prompts(self.model, self.generate, input_ids, attention_mask, **kwargs)


def share_prompts(model) -> None:
    """Make `model.generate` read each distinct prompt of a call once."""
    model.generate = SharedPromptGenerate(model)
