"""Rows of similar length are batched together (pipeline/data/batching.py) wherever prompts are generated from or
scored; results come back in the caller's order, equal to each row's alone."""

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

from pipeline.data.batching import MAX_PADDING_SHARE, length_batches

DATA = Path(__file__).resolve().parent.parent / "data" / "quickstart"


@pytest.mark.parametrize("max_rows", [1, 3, 64])
def test_batches_hold_every_row_once_and_bound_padding(max_rows):
    rng = random.Random(max_rows)
    lengths = [rng.choice([rng.randint(5, 40), rng.randint(100, 800)]) for _ in range(50)]
    batches = length_batches(lengths, max_rows)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= max_rows
        padded = len(batch) * max(lengths[i] for i in batch)
        assert sum(lengths[i] for i in batch) >= (1 - MAX_PADDING_SHARE) * padded
    if max_rows == 64:  # one batch of everything would be mostly padding; similar rows still share one
        assert 1 < len(batches) < len(lengths) / 2
    unsplit = length_batches(lengths, max_rows, max_padding_share=1.0)  # sorted, max_rows a batch
    assert [len(batch) for batch in unsplit] == [len(part) for part in (range(50)[i:i + max_rows] for i in range(0, 50, max_rows))]
    assert [lengths[i] for batch in unsplit for i in batch] == sorted(lengths)


@pytest.fixture(scope="module")
def tokenizer():
    from pipeline.stages.tokenizer import BOS, EOS, PAD, train_bpe

    texts = [json.loads(line)["text"] for line in (DATA / "pretrain.jsonl").read_text().splitlines()[:200]]
    return PreTrainedTokenizerFast(tokenizer_object=train_bpe(texts, 96, 2), bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD)


def tiny_config(tokenizer) -> LlamaConfig:
    torch.manual_seed(0)
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)


def prompts_of_mixed_length() -> list[str]:
    return [" + ".join(str(n) for n in range(1, 2 + (7 * k) % 23)) + " =" for k in range(9)]


def test_generated_rows_come_back_in_prompt_order_as_each_prompt_alone(tokenizer):
    from pipeline.data.prompts import prompt_token_ids
    from pipeline.models.decoding import generate_ids

    model = LlamaForCausalLM(tiny_config(tokenizer)).eval()
    prompts = prompts_of_mixed_length()
    batched = generate_ids(model, tokenizer, prompts, max_new_tokens=6, batch_size=64)
    alone = generate_ids(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert batched == alone
    assert [p for p, _ in batched] == [prompt_token_ids(tokenizer, p) for p in prompts]
    sampled = generate_ids(model, tokenizer, prompts, max_new_tokens=3, batch_size=64, do_sample=True,
                           num_return_sequences=2)
    assert [p for p, _ in sampled] == [prompt_token_ids(tokenizer, p) for p in prompts for _ in range(2)]


def test_reward_scores_come_back_in_row_order_as_each_row_alone(tokenizer, tmp_path):
    from pipeline.models.reward_functions import RewardModelScorer

    config = tiny_config(tokenizer)
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = prompts_of_mixed_length()
    completions = [str(k) * (1 + k % 4) for k in range(len(prompts))]
    batched = RewardModelScorer(str(tmp_path), batch_size=64)(prompts, completions)
    alone = [RewardModelScorer(str(tmp_path), batch_size=1)([p], [c])[0] for p, c in zip(prompts, completions)]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 4) for s in batched)) > 1  # the rows score differently: order would show


def test_a_response_the_baseline_also_wrote_ties_whatever_its_scores_last_bits():
    """Models' responses are scored in different batches, so the same text can score a float's last bits apart;
    the win rate counts it a tie."""
    from pipeline.metrics import load_metric
    from pipeline.stages.eval import Judged

    model = Judged(["same", "better", "same too"], {"reward": [1.0000001, 2.0, 0.5]})
    baseline = Judged(["same", "worse", "same too"], {"reward": [1.0, 1.0, 0.5000001]})
    assert model.against(baseline, "reward") == [1.0, 2.0, 0.5000001]
    win_rate = load_metric("win_rate").compute(predictions=model.against(baseline, "reward"),
                                               references=baseline.scores["reward"])["win_rate"]
    assert win_rate == pytest.approx((0.5 + 1.0 + 0.5) / 3)
