"""Generation that reads each distinct prompt once and without its padding: GRPO, RLOO, grouped PPO and pass@k
sample several responses per prompt, and `generate` (also with `num_return_sequences`) runs the whole prompt
through the model once per response; and a left-padded batch of prompts of mixed lengths (HH-RLHF's run from 34 to
857 tokens: a batch of 8 is half padding) spends as much compute on each pad position as on a real token. Here
the distinct prompts fill a KV cache once, in groups of similar length (`pipeline.data.batching`: each group is
cut to its longest prompt), each row gets a copy of its prompt's cache, and `generate` carries on from it with the
same logits and the same sampling draws: the same tokens for the same seed.

Not where the model draws random numbers as it reads: TRL generates GRPO and RLOO rollouts in training mode, so
with LoRA's dropout on (`lora_dropout`, unless `disable_dropout: true`), reading each prompt once would draw fewer
dropout masks and so other samples than before (from the same distribution). Those calls generate as before, so
a recipe's numbers do not change with this speed-up.

transformers offers no prefix sharing for `generate`; its continuous batching (`generate_batch`, which shares
blocks) ran 50-100x slower than `generate` on CPU (quickstart's model, 2026-12-04), so this is done here, with the
cache API `generate` itself uses to continue from a cached prefix.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation import utils as generation_utils

from pipeline.data.batching import length_batches
from pipeline.models.sampling import model_distribution

# transformers 5.2x renamed `past_key_values` to `cache` (the old name is deprecated); the first of these names
# is the one the installed version reads and writes
CACHE = getattr(generation_utils, "ALL_CACHE_NAMES", ["past_key_values"])[0]


def generate_sharing_prompts(model, generate: Callable[..., torch.Tensor], input_ids: torch.Tensor,
                             attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """`generate(input_ids=..., attention_mask=..., **kwargs)`, with each distinct (left-padded) prompt row read
    by `model` once, without the padding its group of similar lengths does not need (`prefilled_cache`). All but
    the last prompt token go into the cache, so `generate` still runs the model on the last one and samples its
    first token from logits of its own.

    Falls back to `generate` as it is when no prompt repeats and the prompts' lengths are alike; when the model
    draws random numbers as it reads (`draws_random_numbers`) or its weights are sharded (`sharded_weights`);
    when the call brings its own cache, asks for a cache `generate` must build (`cache_implementation`) or brings
    other model inputs (a multimodal model's pixels, token types); for encoder-decoder models; and for caches
    holding more than attention keys and values (a hybrid model's recurrent state, which copying the keys and
    values alone would leave wrong). Sliding-window caches share prompts but read them whole: each keeps a
    length of its own, which groups of other widths would not match."""
    config = kwargs.get("generation_config")
    own_cache = any(kwargs.get(k) is not None for k in (CACHE, "past_key_values", "cache_implementation")) or \
        getattr(config, "cache_implementation", None) is not None
    other_inputs = any(isinstance(value, torch.Tensor) for value in kwargs.values())
    layers = getattr(DynamicCache(config=model.config), "layers", [None])
    if own_cache or other_inputs or draws_random_numbers(model) or sharded_weights(model) \
            or model.config.is_encoder_decoder or input_ids.shape[1] < 2 or not attention_only(layers):
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    distinct, row_of = torch.unique(rows, dim=0, return_inverse=True)
    width = input_ids.shape[1]
    prefix_ids, prefix_mask = distinct[:, :width - 1], distinct[:, width:2 * width - 1]
    groups = length_batches(prefix_mask.sum(-1).tolist(), max_rows=len(distinct)) \
        if all(type(layer) is DynamicLayer for layer in layers) else [list(range(len(distinct)))]
    if len(distinct) == len(rows) and len(groups) == 1:
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    cache = prefilled_cache(model, prefix_ids, prefix_mask, groups)
    if cache is None:  # a cache of its own kind, which the config did not show: read the prompts anew
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    cache.batch_select_indices(row_of)
    return generate(input_ids=input_ids, attention_mask=attention_mask, **{CACHE: cache}, **kwargs)


@torch.no_grad()
def prefilled_cache(model, ids: torch.Tensor, mask: torch.Tensor, groups: list[list[int]]):
    """The KV cache of left-padded rows `ids`, each group of rows (indices) run through `model` cut to its longest
    row; the keys and values of the padding the groups left out are zeros, which the attention mask hides as it
    hid the pad tokens' own. None for a cache that is not attention keys and values alone."""
    # positions as `generate` numbers left-padded rows: counted from each row's first real token
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if len(groups) == 1:
        cache = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                      logits_to_keep=1)[CACHE]
        return cache if attention_only(getattr(cache, "layers", [None])) else None
    lengths = mask.sum(-1)
    caches = []
    for group in groups:
        rows = torch.tensor(group, device=ids.device)
        cut = max(int(lengths[rows].max()), 1)
        caches.append((rows, model(input_ids=ids[rows, -cut:], attention_mask=mask[rows, -cut:],
                                   position_ids=positions[rows, -cut:], use_cache=True, logits_to_keep=1)[CACHE]))
    if not all(type(layer) is DynamicLayer for _, group_cache in caches for layer in group_cache.layers):
        return None  # a cache of another kind than the config showed: not assembled here
    cache = caches[0][1]
    for index, layer in enumerate(cache.layers):
        shape = (len(ids), layer.keys.shape[1], ids.shape[1], layer.keys.shape[3])
        keys, values = layer.keys.new_zeros(shape), layer.values.new_zeros(shape)
        for rows, group_cache in caches:
            group_layer = group_cache.layers[index]
            cut = group_layer.keys.shape[2]
            keys[rows, :, -cut:], values[rows, :, -cut:] = group_layer.keys, group_layer.values
        layer.keys, layer.values = keys, values
    return cache


def attention_only(layers: list) -> bool:
    """Whether a cache's `layers` hold attention keys and values alone, which rows can copy from one another."""
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers)


def draws_random_numbers(model) -> bool:
    """Whether a forward pass of `model` draws random numbers: dropout (a layer's, or attention's) in training mode."""
    if not model.training:
        return False
    return getattr(model.config, "attention_dropout", 0) > 0 or \
        any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in model.modules())


def sharded_weights(model) -> bool:
    """Whether some weights are DeepSpeed ZeRO-3 shards, not gathered (TRL's `ds3_gather_for_generation: false`):
    every forward pass is then a collective, which `generate` keeps in step across processes (`synced_gpus`),
    and processes whose prompts fall into different numbers of length groups would wait on each other forever."""
    return any(getattr(getattr(p, "ds_status", None), "name", "AVAILABLE") != "AVAILABLE" for p in model.parameters())


class SharedPromptGenerate:
    """A model's `generate`, reading repeated prompts once (`generate_sharing_prompts`), inside `precision` (a
    context manager's factory), from the model's own distribution (`pipeline.models.sampling`). Installed on the
    model object that TRL's GRPO-family trainers call `generate` on (`share_prompts`)."""

    def __init__(self, model, precision: Callable[[], AbstractContextManager] = nullcontext) -> None:
        self.model, self.generate, self.precision = model, type(model).generate.__get__(model), precision

    def __call__(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        with self.precision(), model_distribution(self.model):
            if input_ids is None or attention_mask is None:
                return self.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return generate_sharing_prompts(self.model, self.generate, input_ids, attention_mask, **kwargs)


def share_prompts(model, precision: Callable[[], AbstractContextManager] = nullcontext) -> None:
    """Make `model.generate` read each distinct prompt of a call once, inside `precision()`."""
    model.generate = SharedPromptGenerate(model, precision)
