"""Samples come from the model's own distribution and end at every stop id it lists (pipeline/models/sampling.py):
a Hub model's shipped `generation_config.json` penalties shape none of them, in `generate_ids` (eval, generate,
serving) and in the `generate` TRL's GRPO-family trainers call."""

import json
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.models.decoding import generate_ids
from pipeline.models.sampling import stop_token_ids
from pipeline.models.shared_prompts import share_prompts

DATA = Path(__file__).resolve().parent.parent / "data" / "quickstart"
PROMPTS = [" + ".join(str(n) for n in range(1, 2 + (7 * k) % 23)) + " =" for k in range(6)]
SHAPING = dict(repetition_penalty=5.0, no_repeat_ngram_size=1, min_new_tokens=10, min_p=0.5, top_k=3)


@pytest.fixture(scope="module")
def tokenizer():
    from pipeline.stages.tokenizer import BOS, EOS, PAD, train_bpe

    texts = [json.loads(line)["text"] for line in (DATA / "pretrain.jsonl").read_text().splitlines()[:200]]
    return PreTrainedTokenizerFast(tokenizer_object=train_bpe(texts, 96, 2), bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD)


def tiny_model(tokenizer, **generation) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    for key, value in generation.items():
        setattr(model.generation_config, key, value)
    return model


def test_responses_end_at_every_stop_id_the_model_lists(tokenizer):
    model = tiny_model(tokenizer)
    plain = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=12)
    # a token the model writes mid-response becomes a second end-of-sequence id, as Gemma's <end_of_turn> is
    counts: dict[int, int] = {}
    for _, response in plain:
        for token in response[1:-1]:
            counts[token] = counts.get(token, 0) + 1
    other = max(counts, key=counts.get)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, other]
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, other]
    stopped = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=12)
    cut = 0
    for (_, before), (_, after) in zip(plain, stopped):
        end = before.index(other) + 1 if other in before else len(before)
        assert after == before[:end]
        cut += end < len(before)
    assert cut >= 1


def test_shipped_decoding_defaults_shape_no_sample(tokenizer):
    clean, shipped = tiny_model(tokenizer), tiny_model(tokenizer, **SHAPING)
    kwargs = dict(max_new_tokens=8, num_return_sequences=2)
    assert generate_ids(shipped, tokenizer, PROMPTS, **kwargs) == generate_ids(clean, tokenizer, PROMPTS, **kwargs)
    torch.manual_seed(3)
    sampled = generate_ids(shipped, tokenizer, PROMPTS, do_sample=True, **kwargs)
    torch.manual_seed(3)
    assert sampled == generate_ids(clean, tokenizer, PROMPTS, do_sample=True, **kwargs)
    assert shipped.generation_config.repetition_penalty == 5.0  # the model's own config is left as it shipped

    # the same call through plain `generate` is shaped by them: what the test guards against can happen
    ids = tokenizer(PROMPTS[:1], return_tensors="pt")
    assert not torch.equal(shipped.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=0),
                           clean.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=0))


def test_trl_style_calls_with_a_generation_config_are_not_shaped_either(tokenizer):
    """TRL's GRPO and RLOO pass a `generation_config` whose unset fields `generate` fills from the model's."""
    clean, shipped = tiny_model(tokenizer), tiny_model(tokenizer, **SHAPING)
    for model in (clean, shipped):
        share_prompts(model)
    ids = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True, padding_side="left")
    config = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id])
    torch.manual_seed(4)
    shaped = shipped.generate(**ids, generation_config=config)
    torch.manual_seed(4)
    assert torch.equal(shaped, clean.generate(**ids, generation_config=config))
