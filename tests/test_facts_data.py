"""The second task family (examples/facts): committed files are the generator's, answers are right, splits hold."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "facts"))
import facts_datagen  # noqa: E402
import facts_tasks  # noqa: E402

REPO_DATA = Path(__file__).resolve().parents[1] / "data" / "facts"
FILES = ("pretrain.jsonl", "sft.jsonl", "prefs.jsonl", "prompts.jsonl", "eval.jsonl")
COLOUR_OF = dict(facts_tasks.things())
# Independent solvers for every question template.
SOLVERS = [
    (re.compile(r"What is (\d+) times (\d+)\?"), lambda a, b: str(int(a) * int(b))),
    (re.compile(r"What number comes before (\d+)\?"), lambda n: str(int(n) - 1)),
    (re.compile(r"Which is smaller, (\d+) or (\d+)\?"), lambda a, b: str(min(int(a), int(b)))),
    (re.compile(r"What is half of (\d+)\?"), lambda n: str(int(n) // 2)),
    (re.compile(r"What colour is a (\w+)\?"), lambda name: COLOUR_OF[name]),
]


def solve(question: str) -> str:
    (answer,) = [f(*m.groups()) for pattern, f in SOLVERS if (m := pattern.fullmatch(question))]
    return answer


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("facts")
    facts_datagen.generate_facts(out, seed=0)
    return out


@pytest.mark.parametrize("name", FILES)
def test_committed_files_are_the_generators_output(generated, name):
    assert (generated / name).read_bytes() == (REPO_DATA / name).read_bytes()


def test_every_answer_and_preference_is_right():
    for row in read(REPO_DATA / "prompts.jsonl") + read(REPO_DATA / "eval.jsonl"):
        assert row["answer"] == solve(row["prompt"][0]["content"])
    for row in read(REPO_DATA / "prefs.jsonl"):
        question = row["prompt"][0]["content"]
        assert row["chosen"][0]["content"] == solve(question) != row["rejected"][0]["content"]


def test_labelers_rates_and_the_near_misses():
    sft = read(REPO_DATA / "sft.jsonl")
    replies = [r["messages"][1]["content"] for r in sft]
    right = sum(reply == r["answer"] for reply, r in zip(replies, sft)) / len(sft)
    hedged = replies.count(facts_datagen.HEDGE) / len(sft)
    assert right == pytest.approx(facts_datagen.RIGHT_RATE, abs=0.04)
    assert hedged == pytest.approx(facts_datagen.HEDGE_RATE, abs=0.04)
    prefs = read(REPO_DATA / "prefs.jsonl")
    kinds = {"near miss": 0, "wrong type": 0, "hedge": 0}
    for row in prefs:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        kinds["hedge" if rejected == facts_datagen.HEDGE else
              "near miss" if chosen.isdigit() == rejected.isdigit() else "wrong type"] += 1
    assert kinds["near miss"] / len(prefs) == pytest.approx(facts_datagen.NEAR_MISS_PAIRS, abs=0.03)
    assert kinds["wrong type"] / len(prefs) == pytest.approx(facts_datagen.WRONG_TYPE_PAIRS, abs=0.04)


def test_rl_and_held_out_questions_are_never_answered_before_rl():
    supervised = {r["messages"][0]["content"] for r in read(REPO_DATA / "sft.jsonl")}
    supervised |= {q for r in read(REPO_DATA / "pretrain.jsonl") for q in re.findall(r"Q: (.+?\?) A:", r["text"])}
    rl = {r["prompt"][0]["content"] for r in read(REPO_DATA / "prompts.jsonl")}
    held_out = {r["prompt"][0]["content"] for r in read(REPO_DATA / "eval.jsonl")}
    assert not supervised & rl and not supervised & held_out and not rl & held_out
