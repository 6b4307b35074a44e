"""Public datasets read as published: HH-RLHF transcripts as SFT rows and RL/eval prompts, Alpaca rows as eval
prompts, GSM8K's worked solutions scored by their `#### N`, Hub subsets by `data_dir`, and the shipped samples."""

from __future__ import annotations

import gzip
import json
import sys

import pytest
from datasets import Dataset

from pipeline.data.answers import answer_check, same_answer
from pipeline.data.formats import as_prompts, sft_messages
from pipeline.data.loading import DataError
from pipeline.stages.sft import to_prompt_completion
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "examples" / "realdata"))
import prepare  # noqa: E402

TRANSCRIPT = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2 + 2?\n\nAssistant: 4."
REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2 + 2?\n\nAssistant: Go away."
GSM8K = {"regex": r"####\s*(\S+)"}


def hh_rows(*chosen: str) -> Dataset:
    return Dataset.from_list([{"chosen": c, "rejected": REJECTED} for c in chosen])


def test_hh_transcripts_become_sft_messages_trained_on_the_final_reply():
    rows = to_prompt_completion(hh_rows(TRANSCRIPT), "hh-rlhf transcripts", None, "here", chat=True)
    assert rows[0]["prompt"] == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "What is 2 + 2?"}]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "4."}]


def test_hh_transcripts_become_prompts_with_the_chosen_reply_as_reference(capsys):
    rows = as_prompts(hh_rows(TRANSCRIPT, "\n\nHuman: Hi\n\nAssistant:", "no transcript"), "stage 'ppo'")
    assert len(rows) == 1 and rows.column_names == ["prompt", "completion"]
    assert rows[0]["prompt"][-1] == {"role": "user", "content": "What is 2 + 2?"}
    assert rows[0]["completion"] == [{"role": "assistant", "content": "4."}]
    assert ("dropped 2 of 3 HH-RLHF transcripts in 'chosen' (empty final assistant reply: 1, "
            "not a Human/Assistant transcript: 1)") in capsys.readouterr().out


def test_no_usable_transcript_is_an_error():
    with pytest.raises(DataError, match="none of the 1 HH-RLHF transcripts in 'chosen' could be used"):
        sft_messages(hh_rows("\n\nHuman: only a question"), "stage 'sft'")


def test_alpaca_rows_become_the_request_sft_trains_a_chat_model_on():
    rows = Dataset.from_list([{"instruction": "Translate.", "input": "bonjour", "output": "hello"},
                              {"instruction": "Say hi. ", "input": "", "output": "hi"}])
    prompts = as_prompts(rows, "stage 'eval'")
    sft = to_prompt_completion(rows, "alpaca", None, "here", chat=True)
    assert prompts["prompt"] == ["Translate.\n\nbonjour", "Say hi."] and prompts["completion"] == ["hello", "hi"]
    assert [p[0]["content"] for p in sft["prompt"]] == prompts["prompt"]


def test_prompt_rows_stay_as_they_are_and_other_rows_are_refused():
    rows = Dataset.from_list([{"prompt": "q", "answer": "1", "chosen": "x"}])
    assert as_prompts(rows, "here") is rows
    with pytest.raises(DataError, match="expected one of these formats: prompts: prompt; hh-rlhf transcripts: chosen"):
        as_prompts(Dataset.from_list([{"question": "q"}]), "here")


@pytest.mark.parametrize("stated, expected, same", [("72", "72", True), ("1080", "1,080", True), ("$18", "18", True),
                                                    ("72.", "72", True), ("72.0", "72", True), ("73", "72", False),
                                                    ("7,2", "72", True), ("abc", "abd", False), ("", "0", False)])
def test_numbers_compare_by_value(stated, expected, same):
    assert same_answer(stated, expected) is same


def test_gsm8k_rows_of_the_shipped_sample_score_by_their_final_number():
    is_correct = answer_check(type("Spec", (), {"regex": GSM8K["regex"], "function": None})())
    rows = prepare.read_rows(REPO / "data" / "gsm8k" / "train.jsonl")
    for row in rows:
        final = row["answer"].rsplit("####", 1)[1].strip()
        assert is_correct(f"So the answer is\n#### {final.replace(',', '')}", row["answer"]), row["answer"]
        assert not is_correct(f"#### {float(final.replace(',', '')) + 1:f}", row["answer"])
        assert not is_correct(row["answer"].rsplit("####", 1)[0], row["answer"])  # the working without `####`


def test_hub_source_takes_a_data_dir(monkeypatch):
    from pipeline.config.specs import SourceSpec
    from pipeline.data import loading

    calls = []
    monkeypatch.setattr(loading, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs))
                        or Dataset.from_list([{"chosen": "a", "rejected": "b"}]))
    loading.load_source(SourceSpec(path="Anthropic/hh-rlhf", data_dir="harmless-base", split="test"), recipe_path=None)
    assert calls == [(("Anthropic/hh-rlhf", None), {"split": "test", "data_dir": "harmless-base"})]


@pytest.mark.parametrize("dataset", sorted(prepare.PLANS))
def test_shipped_samples_are_the_plans_rows_in_their_sources_columns(dataset):
    folder = REPO / "data" / dataset
    assert (folder / "LICENSE").is_file()
    seen: set[str] = set()
    for name, (_, count) in prepare.PLANS[dataset].items():
        rows = prepare.read_rows(folder / name)
        assert len(rows) == count and all(list(row) == list(prepare.COLUMNS[dataset]) for row in rows)
        keys = {json.dumps(row, sort_keys=True) for row in rows}
        assert not keys & seen, f"{name} shares rows with another file"  # the samples are disjoint
        seen |= keys


def test_prepare_writes_the_same_bytes_from_the_same_rows(tmp_path):
    source = tmp_path / "test.jsonl.gz"
    with gzip.open(source, "wt") as f:
        f.writelines(json.dumps({"chosen": TRANSCRIPT + str(i), "rejected": REJECTED}) + "\n" for i in range(30))
    for out in ("a", "b"):
        prepare.main(["hh-rlhf", str(source), "--out", str(tmp_path / out), "--seed", "3",
                      "--rows", "train.jsonl.gz=10", "judge.jsonl.gz=5", "test.jsonl.gz=5"])
    for name in prepare.PLANS["hh-rlhf"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert len(prepare.read_rows(tmp_path / "a" / "train.jsonl.gz")) == 10


def test_alpaca_prompts_reach_a_plain_text_model_as_its_sft_rendered_them(tmp_path):
    """A model that takes plain text was trained on Alpaca rows through a template (Stanford's, or the recipe's
    `prompt_template`); its SFT records them, and eval, GRPO and PPO prompt it the same way, not with the bare
    request a chat model gets as a user turn."""
    from pipeline.cli import main
    from pipeline.data.prompts import record_alpaca_templates
    from pipeline.models.loading import load_tokenizer
    from pipeline.stages.eval import EvalRows
    from pipeline.stages.sft import alpaca_templates_for
    from tests.conftest import summary, tiny_stages, write_recipe

    rows = Dataset.from_list([{"instruction": "Translate.", "input": "bonjour", "output": "hello"},
                              {"instruction": "Say hi. ", "input": "", "output": "hi"}])
    stages = tiny_stages(pretrain_steps=5, sft_steps=3)
    stages[2]["dataset"] = {"path": str(REPO / "data" / "alpaca" / "train.jsonl"), "max_samples": 64}
    stages[2]["args"]["max_length"] = 512
    assert main(["run", str(write_recipe(tmp_path, stages, prompt_format="raw"))]) == 0
    tokenizer = load_tokenizer(summary(tmp_path / "run")["stages"]["sft"]["output"])
    assert tokenizer.init_kwargs["prompt_format"] == "raw"
    for template in (None, "Q: {instruction} {input}\nA:"):
        if template is not None:
            record_alpaca_templates(tokenizer, alpaca_templates_for(template))
        trained = to_prompt_completion(rows, "alpaca", template, "here", chat=False)["prompt"]
        assert as_prompts(rows, "here", tokenizer)["prompt"] == trained
        assert EvalRows(["bare"] * 2, ["", ""], None, [], rows).for_model(tokenizer, "here") == trained
    assert trained[0] == "Q: Translate. bonjour\nA:"
    assert as_prompts(rows, "here")["prompt"] == ["Translate.\n\nbonjour", "Say hi."]  # no model: the request
