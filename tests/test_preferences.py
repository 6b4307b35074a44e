"""Preference converters: pairwise, HH-RLHF transcripts, implicit prompts, pointwise, listwise, errors, real data."""

from __future__ import annotations

import pytest
from datasets import Dataset

from pipeline.data.loading import DataError, read_local
from pipeline.data.preferences import PREFERENCE_FORMATS, detect_preference_format, to_pairwise
from tests.conftest import REALDATA, needs_realdata


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def rows(dataset: Dataset) -> list[dict]:
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    return dataset.to_list()


def test_detection_order_and_columns():
    assert list(PREFERENCE_FORMATS) == ["pairwise", "pointwise", "listwise"]
    assert detect_preference_format(["prompt", "chosen", "rejected", "id"]) == "pairwise"
    assert detect_preference_format(["score", "response", "prompt"]) == "pointwise"
    assert detect_preference_format(["prompt", "responses", "scores"]) == "listwise"


def test_unknown_columns_list_formats_and_columns():
    with pytest.raises(DataError) as err:
        to_pairwise(Dataset.from_list([{"question": "q", "good": "a", "bad": "b"}]), "prefs.jsonl")
    message = str(err.value)
    assert message.startswith("prefs.jsonl: dataset has columns ['question', 'good', 'bad']")
    for expected in ("pairwise: chosen, rejected (optional prompt)", "pointwise: prompt, response, score",
                     "listwise: prompt, responses (optional scores)"):
        assert expected in message


def test_pairwise_with_prompt_kept_and_extra_columns_dropped():
    data = [{"prompt": [user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")], "kind": "add"},
            {"prompt": [user("1+1?")], "chosen": [bot("2")], "rejected": [bot("3")], "kind": "add"}]
    assert rows(to_pairwise(Dataset.from_list(data), "p")) == [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                               for r in data]
    strings = [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}]
    assert rows(to_pairwise(Dataset.from_list(strings), "p")) == strings


def test_string_prompt_with_message_completions_becomes_a_message():
    data = [{"prompt": "2+2?", "chosen": [bot("4")], "rejected": [bot("5")]}]
    assert rows(to_pairwise(Dataset.from_list(data), "p")) == [
        {"prompt": [user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]}]


def test_hh_transcripts_multi_turn():
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman:  What is 2+2? \n\nAssistant:"
    joke = "\n\nHuman: Tell me a joke\n\nAssistant: "
    data = [{"chosen": shared + " It is 4.", "rejected": shared + " Fish."},
            {"chosen": joke + "No.", "rejected": joke}]  # empty final reply: dropped
    assert rows(to_pairwise(Dataset.from_list(data), "hh")) == [
        {"prompt": [user("Hi there"), bot("Hello! How can I help?"), user("What is 2+2?")],
         "chosen": [bot("It is 4.")], "rejected": [bot("Fish.")]}]


def test_hh_transcripts_diverging_early_keep_the_differing_turns():
    data = [{"chosen": "\n\nHuman: Q\n\nAssistant: A1\n\nAssistant: A2", "rejected": "\n\nHuman: Q\n\nAssistant: B"}]
    assert rows(to_pairwise(Dataset.from_list(data), "hh")) == [
        {"prompt": [user("Q")], "chosen": [bot("A1"), bot("A2")], "rejected": [bot("B")]}]


def test_hh_transcripts_all_unusable_is_an_error():
    data = [{"chosen": "\n\nHuman: Q\n\nAssistant: A\n\nHuman: more?", "rejected": "\n\nHuman: Q\n\nAssistant: B"}]
    with pytest.raises(DataError, match=r"^hh: none of the 1 HH-RLHF transcript pairs .*no final assistant reply: 1"):
        to_pairwise(Dataset.from_list(data), "hh")


def test_implicit_prompt_message_lists():
    data = [{"chosen": [user("Hi"), bot("Hey"), user("2+2?"), bot("4")],
             "rejected": [user("Hi"), bot("Hey"), user("2+2?"), bot("5"), user("sure?"), bot("yes")]}]
    assert rows(to_pairwise(Dataset.from_list(data), "m")) == [
        {"prompt": [user("Hi"), bot("Hey"), user("2+2?")], "chosen": [bot("4")],
         "rejected": [bot("5"), user("sure?"), bot("yes")]}]
    same = [{"chosen": [user("Hi"), bot("Hey")], "rejected": [user("Hi"), bot("Hey")]}]
    with pytest.raises(DataError, match=r"^m: row 0: nothing is left"):
        to_pairwise(Dataset.from_list(same), "m")


def test_conversations_diverging_at_a_user_turn_keep_a_prompt_that_ends_on_one():
    data = [{"chosen": [user("Hi"), bot("Hey"), user("2+2?"), bot("4")],
             "rejected": [user("Hi"), bot("Hey"), user("3+3?"), bot("6")]}]
    assert rows(to_pairwise(Dataset.from_list(data), "m")) == [
        {"prompt": [user("Hi")], "chosen": [bot("Hey"), user("2+2?"), bot("4")],
         "rejected": [bot("Hey"), user("3+3?"), bot("6")]}]


def test_a_prompt_column_beside_whole_conversations_is_not_said_twice():
    messages = [{"prompt": [user("2+2?")], "chosen": [user("2+2?"), bot("4")], "rejected": [user("2+2?"), bot("5")]}]
    text = [{"prompt": "3+3?", "chosen": [user("3+3?"), bot("6")], "rejected": [user("3+3?"), bot("7")]}]
    assert rows(to_pairwise(Dataset.from_list(messages), "m")) == [
        {"prompt": [user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]}]
    assert rows(to_pairwise(Dataset.from_list(text), "m")) == [
        {"prompt": [user("3+3?")], "chosen": [bot("6")], "rejected": [bot("7")]}]


def test_plain_strings_without_prompt_get_an_empty_prompt():
    data = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    assert rows(to_pairwise(Dataset.from_list(data), "s")) == [
        {"prompt": "", "chosen": "The sky is blue.", "rejected": "The sky is green."}]


def test_pointwise_pairs_per_prompt_by_score():
    data = [{"prompt": "a", "response": "a1", "score": 1.0},
            {"prompt": "b", "response": "b1", "score": 5},
            {"prompt": "a", "response": "a2", "score": 3.0},
            {"prompt": "a", "response": "a3", "score": 2.0},
            {"prompt": "a", "response": "a4", "score": 3.0},  # ties a2: no pair between them
            {"prompt": "b", "response": "b2", "score": 5}]  # b has one distinct score: no pairs
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows(to_pairwise(Dataset.from_list(data), "pw"))] == [
        ("a", "a2", "a3"), ("a", "a2", "a1"), ("a", "a4", "a3"), ("a", "a4", "a1"), ("a", "a3", "a1")]


def test_pointwise_groups_message_prompts():
    data = [{"prompt": [user("q")], "response": "bad", "score": 0},
            {"prompt": [user("q")], "response": "good", "score": 1}]
    assert rows(to_pairwise(Dataset.from_list(data), "pw")) == [
        {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]}]


def test_pointwise_errors():
    with pytest.raises(DataError, match=r"^pw: no preference pairs from 2 pointwise row\(s\)"):
        to_pairwise(Dataset.from_list([{"prompt": "q", "response": r, "score": 1} for r in "xy"]), "pw")
    missing = [{"prompt": "q", "response": "x", "score": 1}, {"prompt": "q", "response": "y", "score": None}]
    with pytest.raises(DataError, match=r"^pw: row 1: column 'score': expected a number, got None"):
        to_pairwise(Dataset.from_list(missing), "pw")


def test_listwise_ordered_and_scored():
    ordered = [{"prompt": "q", "responses": ["best", "mid", "worst"]}]
    assert [(r["chosen"], r["rejected"]) for r in rows(to_pairwise(Dataset.from_list(ordered), "lw"))] == [
        ("best", "mid"), ("best", "worst"), ("mid", "worst")]
    scored = [{"prompt": "q", "responses": ["low", "high", "tie", "mid"], "scores": [0.0, 2.0, 1.0, 1.0]}]
    assert [(r["chosen"], r["rejected"]) for r in rows(to_pairwise(Dataset.from_list(scored), "lw"))] == [
        ("high", "tie"), ("high", "mid"), ("high", "low"), ("tie", "low"), ("mid", "low")]
    bad = [{"prompt": "q", "responses": ["a", "b"], "scores": [1.0]}]
    with pytest.raises(DataError, match=r"^lw: row 0: column 'scores' must be a list of 2 numbers"):
        to_pairwise(Dataset.from_list(bad), "lw")


@needs_realdata
def test_real_hh_rlhf_transcripts(capsys):
    source = read_local(REALDATA / "hh-rlhf-harmless-base-test.jsonl.gz")
    pairs = to_pairwise(source, "hh-rlhf")
    assert len(pairs) >= 0.99 * len(source)
    assert "hh-rlhf: dropped" in capsys.readouterr().out
    for row in pairs:
        assert row["prompt"][-1]["role"] == "user"
        assert row["chosen"][-1]["role"] == row["rejected"][-1]["role"] == "assistant"
        assert row["chosen"][-1]["content"] and row["rejected"][-1]["content"]
