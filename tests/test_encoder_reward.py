"""A reward model on a real BERT-style encoder (all-MiniLM-L6-v2): HH-RLHF transcripts without a chat
template, left truncation in training, in the saved tokenizer and in the scorer, scoring with plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.models.reward_functions import RewardModelScorer
from tests.conftest import DATA, MINILM, needs_minilm, summary, write_recipe

pytestmark = needs_minilm
MAX_LENGTH = 64
LONG = " ".join(["the weather was fine and nothing else happened that day"] * 60)  # ~600 tokens


def transcripts(count: int) -> list[dict[str, str]]:
    """The quickstart's preference pairs written as HH-RLHF transcripts, and one far longer than 512 tokens."""
    rows = []
    for line in (DATA / "prefs.jsonl").read_text().splitlines()[:count]:
        pair = json.loads(line)
        question = pair["prompt"][0]["content"]
        head = f"\n\nHuman: {question}\n\nAssistant:"
        rows.append({"chosen": f"{head} {pair['chosen'][0]['content']}",
                     "rejected": f"{head} {pair['rejected'][0]['content']}"})
    rows[0] = {key: f"\n\nHuman: {LONG} What is 2 + 2?\n\nAssistant: {answer}"
               for key, answer in (("chosen", "4"), ("rejected", "5"))}
    return rows


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("minilm")
    data = directory / "hh.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in transcripts(200)))
    stage = {"name": "rm", "type": "reward", "model": str(MINILM), "dataset": {"path": str(data), "test_size": 32},
             "args": {"max_steps": 15, "learning_rate": 1e-4, "per_device_train_batch_size": 8,
                      "max_length": MAX_LENGTH}}
    assert main(["run", str(write_recipe(directory, [stage]))]) == 0
    return summary(directory / "run")["stages"]["rm"]


def test_transcripts_train_an_encoder_reward_model(reward_run):
    metrics = reward_run["metrics"]
    assert metrics["truncated_pairs"] >= 1  # the long transcript was cut, not dropped or crashed on
    assert metrics["eval_loss"] < 0.693  # better than a constant scorer (Bradley-Terry loss log 2)


def test_saved_tokenizer_cuts_from_the_left_at_the_training_length(reward_run):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_run["output"])
    assert tokenizer.truncation_side == "left" and tokenizer.model_max_length == MAX_LENGTH
    ids = tokenizer(LONG + " the final reply", truncation=True)["input_ids"]
    assert len(ids) == MAX_LENGTH and tokenizer.decode(ids[-4:-1]) == "the final reply"


def test_plain_transformers_scores_like_the_pipeline(reward_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompt, reply = [{"role": "user", "content": "What is 10 - 5?"}], "5"
    tokenizer = AutoTokenizer.from_pretrained(reward_run["output"])
    model = AutoModelForSequenceClassification.from_pretrained(reward_run["output"]).eval()
    with torch.no_grad():  # the README's recipe: turns joined by [SEP]
        plain = model(**tokenizer("User: What is 10 - 5? [SEP] Assistant: 5", return_tensors="pt")).logits[0, 0]
    assert RewardModelScorer(reward_run["output"])([prompt], [reply])[0] == pytest.approx(plain.item(), abs=1e-4)


def test_scorer_cuts_sequences_longer_than_the_encoder_takes(reward_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompt, reply = f"{LONG} {LONG} Which is larger, 6 or 11?", " 11"  # ~1200 tokens; the encoder has 512 positions
    score = RewardModelScorer(reward_run["output"])([prompt], [reply])[0]
    tokenizer = AutoTokenizer.from_pretrained(reward_run["output"])
    model = AutoModelForSequenceClassification.from_pretrained(reward_run["output"]).eval()
    with torch.no_grad():  # the same final tokens as the saved tokenizer keeps (turns, as it trained on)
        plain = model(**tokenizer(f"User: {prompt} [SEP] Assistant: {reply}", truncation=True,
                                  return_tensors="pt")).logits[0, 0]
    assert score == pytest.approx(plain.item(), abs=1e-4)


def test_plain_text_prompts_are_scored_as_the_turns_it_trained_on(reward_run):
    """Trained on transcripts (turns), the encoder scores a plain-text prompt (open-ended eval, GRPO on plain
    prompts) as the same user turn, not as the bare text it never saw."""
    scorer = RewardModelScorer(reward_run["output"])
    text, turns = scorer(["What is 10 - 5?"], ["5"]), scorer([[{"role": "user", "content": "What is 10 - 5?"}]], ["5"])
    assert text == turns
    config = json.loads((Path(reward_run["output"]) / "tokenizer_config.json").read_text())
    assert config["prompt_format"] == "chat"
