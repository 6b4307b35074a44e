"""`answer_extractor:`: GSM8K-style answers scored by the exact_match reward and eval metric from the recipe alone."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.config.specs import AnswerExtractorSpec
from pipeline.data.answers import answer_check, first_word
from tests.conftest import tiny_stages, write_recipe

GSM8K = r"####\s*(\S+)"
ROWS = [  # references as GSM8K writes them (a worked solution ending in `#### N`) and as a bare number
    {"prompt": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "In May she sold 48/2 = 24.\nAltogether 48+24 = 72.\n#### 72"},
    {"prompt": "What is 40 + 2?", "answer": "42"},
    {"prompt": "What is 3 * 3?", "answer": "9"},
]
RESPONSES = ["48 + 24 = 72 clips\n#### 72", "40 plus 2 makes\n#### 42", "It is 9"]  # the last states no `####`


def last_word(response: str) -> str:
    """A user extractor, named in a recipe as `tests.test_answers:last_word`."""
    words = response.split()
    return words[-1] if words else ""


def gsm8k_recipe(tmp_path, extractor: dict) -> str:
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS * 4))
    stages = tiny_stages() + [
        {"name": "grpo", "type": "grpo", "model": "sft", "dataset": str(data), "answer_extractor": extractor,
         "rewards": [{"function": "exact_match"}]},
        {"name": "ev", "type": "eval", "models": ["sft"], "dataset": str(data), "answer_extractor": extractor},
    ]
    return str(write_recipe(tmp_path, stages))


@pytest.mark.parametrize("extractor, expected", [({"regex": GSM8K}, [1.0, 1.0, 0.0]),
                                                 ({"function": "tests.test_answers:last_word"}, [0.0, 1.0, 1.0])])
def test_recipe_extractor_scores_reward_and_eval_metric(extractor, expected, tmp_path):
    from pipeline.data.answers import answer_check
    from pipeline.metrics import load_metric
    from pipeline.models.reward_functions import build_reward_terms
    from pipeline.validation.recipe_checks import load_recipe

    recipe = load_recipe(gsm8k_recipe(tmp_path, extractor))
    grpo, ev = recipe.stage("grpo"), recipe.stage("ev")
    (reward,), _, _ = build_reward_terms(grpo.rewards, str, answer_check(grpo.answer_extractor))
    answers = [row["answer"] for row in ROWS]
    assert reward([row["prompt"] for row in ROWS], RESPONSES, answer=answers) == expected
    metric = load_metric("exact_match").compute(predictions=RESPONSES, references=answers,
                                                answer_extractor=ev.answer_extractor)
    assert metric["exact_match"] == pytest.approx(sum(expected) / 3)


def test_default_extractor_is_the_quickstart_rule():
    from pipeline.data.answers import answer_check

    is_correct = answer_check()
    assert is_correct("A: 19.\nmore", "19") and is_correct("7 is it", 7) and not is_correct("#### 42", "42")


@pytest.mark.parametrize("extractor, expected", [
    ({"regex": "####\\s*(\\S+"}, "stage 'grpo': answer_extractor.regex: '####\\\\s*(\\\\S+' is not a valid regular"),
    ({"function": "tests.test_answers:no_such_function"}, "stage 'grpo': answer_extractor.function: cannot import"),
    ({"function": "last_word"}, "answer_extractor.function: 'last_word' is not a `package.module:function` path"),
    ({"regex": GSM8K, "function": "tests.test_answers:last_word"}, "give exactly one of `regex` or `function`"),
])
def test_bad_extractor_is_refused_by_validate(extractor, expected, tmp_path, capsys):
    assert main(["validate", gsm8k_recipe(tmp_path, extractor)]) != 0
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (" 19.\n", "19"),
        ("19 because 7 + 12 = 19", "19"),
        ("", ""),
        ("  \n\t", ""),
        ("19\nWhat is 3 + 4?", "19"),
        ("A: d.", "d"),
        ("12, since 12 > 7", "12"),
    ],
)
def test_first_word_is_the_default_answer(response: str, expected: str) -> None:
    assert first_word(response) == expected


def test_default_answer_check_is_an_exact_match_of_the_first_word() -> None:
    exact_match = answer_check()
    assert exact_match(" 19.\n", "19")
    assert exact_match("19 because...", "19")
    assert not exact_match("", "19")
    assert not exact_match("190", "19")
    assert not exact_match("1 9", "19")


def test_numbers_read_as_floats_and_rows_without_an_answer():
    """One fractional answer (or a blank CSV cell) makes a whole column float: 72 must still be "72"; a row with
    no answer matches nothing, so exact_match cannot pay an empty response, and accuracy leaves the row out."""
    from datasets import Dataset

    from pipeline.data.answers import reference_answer
    from pipeline.models.decoding import accuracy
    from pipeline.models.reward_functions import exact_match_reward

    column = list(Dataset.from_list([{"answer": 72}, {"answer": 2.5}, {"answer": None}])["answer"])
    assert column[0] == 72.0 and [reference_answer(a) for a in column] == ["72", "2.5", ""]
    assert reference_answer(float("nan")) == "" and reference_answer(" 7 ") == "7"
    for check in (answer_check(), answer_check(AnswerExtractorSpec(function="tests.test_answers:last_word"))):
        assert check("72", 72.0) and check("2.5", 2.5) and not check("72.0", 72)
        assert not check("", "") and not check("None", None) and not check("", None)
    reward = exact_match_reward(answer_check())
    assert reward(["q"] * 3, ["", "None", "72"], answer=["", None, 72.0]) == [0.0, 0.0, 1.0]
    assert accuracy(["72", "x", ""], [72.0, "3", ""]) == 0.5  # two rows with an answer, one right


def test_numbers_compare_exactly():
    from pipeline.data.answers import same_answer

    assert same_answer("1,080", "1080") and same_answer("$18", "18") and same_answer("72.", "72.0")
    assert same_answer("7e2", "700") and same_answer("-3", "-3.00")
    assert not same_answer("9007199254740993", "9007199254740992")  # equal as floats
    assert not same_answer("1_000", "1000") and not same_answer("inf", "infinity") and not same_answer("nan", "nan ")
