"""Rollouts read each distinct prompt once, without the padding a group of similar lengths does not need
(pipeline/models/shared_prompts.py): the same tokens as plain `generate` for the same seed, greedy and sampled,
left-padded, with LoRA; and the GRPO-family trainers' generation goes through it."""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.models.shared_prompts import generate_sharing_prompts, share_prompts

DATA = Path(__file__).resolve().parent.parent / "data" / "quickstart"


def tiny_model(vocab_size: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def grouped_prompts(prompts: int = 4, group: int = 3, width: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """`group` copies of each of `prompts` left-padded rows of different lengths, a group's rows together."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (prompts, width), generator=generator)
    mask = torch.ones_like(ids)
    for row, padding in enumerate(range(prompts)):
        ids[row, :padding], mask[row, :padding] = 0, 0
    return ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)


class RowCounter:
    """Counts the rows and tokens each forward pass of a model is given."""

    def __init__(self, model) -> None:
        self.shapes: list[tuple[int, int]] = []
        model.model.embed_tokens.register_forward_hook(lambda _m, args, _o: self.shapes.append(tuple(args[0].shape)))


@pytest.mark.parametrize("do_sample", [False, True])
def test_same_tokens_as_plain_generate_with_each_prompt_read_once(do_sample):
    model = tiny_model()
    ids, mask = grouped_prompts()
    kwargs = dict(max_new_tokens=6, do_sample=do_sample, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(5)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    counter = RowCounter(model)
    torch.manual_seed(5)
    shared = generate_sharing_prompts(model, model.generate, ids, mask, **kwargs)
    assert torch.equal(plain, shared)
    # the 4 distinct prompts, all but their last token, once; then every row from the last prompt token on
    assert counter.shapes[0] == (4, ids.shape[1] - 1)
    assert counter.shapes[1] == (12, 1) and all(rows == 12 for rows, _ in counter.shapes[1:])


def mixed_length_prompts(real_lengths: list[int], width: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """One left-padded row per length, random tokens."""
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 64, (len(real_lengths), width), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate(real_lengths):
        ids[row, :width - length], mask[row, :width - length] = 0, 0
    return ids, mask


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("group", [1, 3])
def test_prompts_of_mixed_lengths_are_read_without_the_padding_they_do_not_need(do_sample, group):
    """HH-RLHF-like batches (a few short prompts beside long ones): each group of similar length is run cut to its
    longest prompt, and generation gives plain `generate`'s tokens."""
    model = tiny_model()
    ids, mask = mixed_length_prompts([13, 3, 16, 4, 12])
    ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=do_sample, top_k=0, top_p=1.0, pad_token_id=0,
                  eos_token_id=2)
    torch.manual_seed(5)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    counter = RowCounter(model)
    torch.manual_seed(5)
    assert torch.equal(generate_sharing_prompts(model, model.generate, ids, mask, **kwargs), plain)
    # all but the last prompt token: lengths 2 and 3 together, then 11, 12 and 15 (the longest is 25% padding)
    assert counter.shapes[:2] == [(2, 3), (3, 15)]
    assert all(shape == (5 * group, 1) for shape in counter.shapes[2:])


def test_a_sliding_window_model_shares_prompts_read_whole():
    """A sliding-window cache keeps a length of its own, which groups cut to other widths would not match: the
    distinct prompts are read once at the batch's width, with plain `generate`'s tokens."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                             pad_token_id=0, eos_token_id=2)).eval()
    ids, mask = mixed_length_prompts([13, 3, 16, 4, 12])
    ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    rows: list[tuple[int, int]] = []
    model.model.embed_tokens.register_forward_hook(lambda _m, args, _o: rows.append(tuple(args[0].shape)))
    assert torch.equal(generate_sharing_prompts(model, model.generate, ids, mask, **kwargs), plain)
    assert rows[0] == (5, ids.shape[1] - 1)  # the distinct prompts, once, whole


def test_distinct_prompts_and_own_caches_go_to_generate_unchanged():
    model = tiny_model()
    counter = RowCounter(model)
    ids, mask = grouped_prompts(group=1)
    generate_sharing_prompts(model, model.generate, ids, mask, max_new_tokens=2, pad_token_id=0)
    assert counter.shapes[0] == tuple(ids.shape)  # no prompt repeats: one prefill of every row
    counter.shapes.clear()
    ids, mask = grouped_prompts()
    generate_sharing_prompts(model, model.generate, ids, mask, max_new_tokens=2, pad_token_id=0,
                             cache_implementation="static")
    assert counter.shapes[0] == tuple(ids.shape)  # a cache generate must build itself
    counter.shapes.clear()
    generate_sharing_prompts(model, model.generate, ids, mask, max_new_tokens=2, pad_token_id=0,
                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    assert counter.shapes[0] == tuple(ids.shape)  # other model inputs (pixels, positions) the prefill would miss
    counter.shapes.clear()

    class NotGathered:  # DeepSpeed's ZeroParamStatus of a ZeRO-3 shard
        name = "NOT_AVAILABLE"
    next(model.parameters()).ds_status = NotGathered()
    generate_sharing_prompts(model, model.generate, ids, mask, max_new_tokens=2, pad_token_id=0)
    assert counter.shapes[0] == tuple(ids.shape)  # sharded weights: every forward pass is a collective


def test_lora_policy_generates_the_same_through_the_shared_cache():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter change the logits
            torch.nn.init.normal_(parameter, std=0.5)
    ids, mask = grouped_prompts()
    kwargs = dict(max_new_tokens=6, do_sample=True, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(3)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    with model.disable_adapter():
        torch.manual_seed(3)
        without_adapter = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    share_prompts(model)
    torch.manual_seed(3)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kwargs), plain)
    assert not torch.equal(plain, without_adapter)  # the prefill ran under the adapter too


def test_grpo_trainer_generation_reads_each_prompt_once(tmp_path):
    """TRL's GRPOTrainer calls `generate` on the model `share_prompts` patched (the grpo/rloo stages patch
    `trainer.model`): a step's first forward pass holds its distinct prompts, not num_generations copies."""
    from trl import GRPOConfig, GRPOTrainer

    from pipeline.stages.tokenizer import BOS, EOS, PAD, train_bpe

    texts = [json.loads(line)["text"] for line in (DATA / "pretrain.jsonl").read_text().splitlines()[:200]]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_bpe(texts, 64, 2), bos_token=BOS, eos_token=EOS,
                                        pad_token=PAD)
    model = tiny_model(len(tokenizer))
    prompts = Dataset.from_dict({"prompt": [f"{a} + {a} =" for a in range(8)]})
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=4, use_cpu=True, bf16=False, report_to=[], logging_steps=1,
                      save_strategy="no", seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
                          args=args, train_dataset=prompts, processing_class=tokenizer)
    share_prompts(trainer.model)
    counter = RowCounter(trainer.model)
    trainer.train()
    assert counter.shapes[0][0] == 2  # 8 rows: 2 prompts x 4 generations
    assert counter.shapes[1][0] == 8


def test_a_hybrid_models_recurrent_state_is_not_shared_but_generated_as_before():
    """Jamba's cache holds Mamba layers' state besides attention keys and values: generation falls back to plain
    `generate` (the same tokens) rather than copy part of a prompt's state."""
    from transformers import JambaConfig, JambaForCausalLM

    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=100, num_experts=1,
        mamba_d_state=4, mamba_d_conv=2, mamba_expand=1, pad_token_id=0, eos_token_id=2,
        use_mamba_kernels=False)).eval()
    ids, mask = grouped_prompts(prompts=2, width=6)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    rows: list[int] = []
    model.model.embed_tokens.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    assert torch.equal(generate_sharing_prompts(model, model.generate, ids, mask, **kwargs), plain)
    assert rows[0] == len(ids)  # known from the config: no prefill of the distinct prompts first


def test_a_model_drawing_dropout_masks_generates_as_before():
    """TRL samples GRPO rollouts in training mode: with LoRA's dropout on, reading each prompt once would draw other
    masks and so other samples, so such a call generates as before (the same tokens); in eval mode it shares."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                    target_modules=["q_proj", "v_proj"]))
    ids, mask = grouped_prompts()
    kwargs = dict(max_new_tokens=6, do_sample=True, pad_token_id=0, eos_token_id=2)
    counter = RowCounter(model.base_model.model)
    for mode, prefill_rows in (("train", 12), ("eval", 4)):
        getattr(model, mode)()
        torch.manual_seed(3)
        plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        counter.shapes.clear()
        torch.manual_seed(3)
        assert torch.equal(generate_sharing_prompts(model, model.generate, ids, mask, **kwargs), plain), mode
        assert counter.shapes[0][0] == prefill_rows, mode
