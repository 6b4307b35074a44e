"""Plain-text prompts reach a model the way it was trained (`pipeline.data.prompts`): a user turn through the chat
template by default, plain text where the model was trained on plain text or the recipe says `prompt_format: raw`."""

from __future__ import annotations

import pytest
from datasets import Dataset

from pipeline.data.prompts import (
    as_model_rows,
    prompt_token_ids,
    recipe_prompt_format,
    record_prompt_format,
    renders_chat,
)
from pipeline.models.loading import load_tokenizer
from pipeline.models.reward_functions import encode
from pipeline.cli import main
from tests.conftest import REPO, SMOLLM2_GGUF, needs_smollm2

pytestmark = needs_smollm2


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(SMOLLM2_GGUF))


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def test_plain_prompt_to_a_chat_model_is_a_user_turn(tokenizer):
    assert prompt_token_ids(tokenizer, "How can I rob a store") == chat_ids(tokenizer, "How can I rob a store")
    with recipe_prompt_format("raw"):
        assert not renders_chat(tokenizer)
        assert prompt_token_ids(tokenizer, "Hi") == tokenizer("Hi")["input_ids"]


def test_a_model_trained_on_plain_text_keeps_it(tmp_path, tokenizer):
    record_prompt_format(tokenizer, chat=False)
    try:
        tokenizer.save_pretrained(tmp_path)
        saved = load_tokenizer(str(tmp_path))  # the record travels in tokenizer_config.json
        assert not renders_chat(saved) and prompt_token_ids(saved, "Hi") == saved("Hi")["input_ids"]
    finally:
        tokenizer.init_kwargs.pop("prompt_format")


def test_trl_rows_and_reward_scores_follow_the_same_rendering(tokenizer):
    pairs = Dataset.from_list([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    row = as_model_rows(pairs, tokenizer)[0]
    assert row["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "4"}]
    whole = Dataset.from_list([{"prompt": "", "chosen": "a b", "rejected": "a c"}])  # no prompt: kept whole
    assert as_model_rows(whole, tokenizer)[0]["chosen"] == "a b"
    assert encode(tokenizer, "2+2?", "4") == encode(tokenizer, [{"role": "user", "content": "2+2?"}], "4")


def test_validate_reports_the_rendering_and_warns_on_raw_text_to_a_chat_trained_model(capsys):
    assert main(["validate", str(REPO / "recipes" / "quickstart.yaml")]) == 0
    out = capsys.readouterr()
    assert "stage 'eval': plain-text prompts to 'dpo': a user turn through its chat template" in out.out
    assert "warning" not in out.err
    assert main(["validate", str(REPO / "recipes" / "quickstart.yaml"), "--set", "prompt_format=raw"]) == 0
    out = capsys.readouterr()
    assert "plain text (prompt_format: raw)" in out.out
    assert "stage 'eval': 'sft' was trained on chat rows (stage 'sft')" in out.err
