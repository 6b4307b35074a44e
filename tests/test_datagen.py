"""Tests for the quickstart task family (tasks) and data generator (datagen)."""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# The quickstart's generator is an example beside the package, run as a script: its folder is its import path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "quickstart"))
from datagen import REFUSAL_PAIRS, SKIP_RATE, SKIP_REPLY, generate_quickstart  # noqa: E402
from tasks import TASK_KINDS, Task, all_tasks, make_task, plausible_wrong_answer  # noqa: E402

REPO_DATA = Path(__file__).resolve().parents[1] / "data" / "quickstart"
FILES = ("pretrain.jsonl", "sft.jsonl", "prefs.jsonl", "prompts.jsonl", "eval.jsonl")

# Independent re-implementation of every template: (pattern, answer from the captured groups).
Solver = tuple[re.Pattern[str], Callable[..., str]]
QUESTIONS: dict[str, Solver] = {
    "add": (re.compile(r"What is (\d+) \+ (\d+)\?"), lambda a, b: str(int(a) + int(b))),
    "sub": (re.compile(r"What is (\d+) - (\d+)\?"), lambda a, b: str(int(a) - int(b))),
    "next": (re.compile(r"What number comes after (\d+)\?"), lambda n: str(int(n) + 1)),
    "max": (re.compile(r"Which is larger, (\d+) or (\d+)\?"), lambda a, b: str(max(int(a), int(b)))),
    "letter": (re.compile(r"What letter comes after ([a-y])\?"), lambda c: chr(ord(c) + 1)),
}
# Pretraining facts, each a (pattern, check of the captured groups).
FACTS: list[tuple[re.Pattern[str], Callable[..., bool]]] = [
    (re.compile(r"(\d+) plus (\d+) is (\d+)\."), lambda a, b, c: int(a) + int(b) == int(c)),
    (re.compile(r"(\d+) minus (\d+) is (\d+)\."), lambda a, b, c: int(a) - int(b) == int(c) >= 0),
    (re.compile(r"After (\d+) comes (\d+)\."), lambda a, b: int(a) + 1 == int(b)),
    (re.compile(r"(\d+) is larger than (\d+)\."), lambda a, b: int(a) > int(b)),
    (re.compile(r"The letter after ([a-y]) is ([a-z])\."), lambda a, b: ord(a) + 1 == ord(b)),
]
QA_LINE = re.compile(r"Q: (.+\?) A: (\S+)")


def solve(kind: str, question: str) -> str:
    """Recompute the answer by parsing ``question`` with the template for ``kind``."""
    pattern, answer = QUESTIONS[kind]
    match = pattern.fullmatch(question)
    assert match, f"{kind} question has unexpected format: {question!r}"
    return answer(*match.groups())


def solve_any(question: str) -> str:
    (kind,) = [k for k, (pattern, _) in QUESTIONS.items() if pattern.fullmatch(question)]
    return solve(kind, question)


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def user_question(row: dict[str, Any]) -> str:
    messages = row["messages"] if "messages" in row else row["prompt"]
    assert messages[0]["role"] == "user"
    return messages[0]["content"]


def pretrain_qa(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(question, answer) pairs of the "Q: ... A: ..." lines of the pretraining text."""
    pairs = []
    for row in rows:
        for line in row["text"].splitlines()[1:]:
            match = QA_LINE.fullmatch(line)
            assert match, f"unexpected pretraining line: {line!r}"
            pairs.append((match[1], match[2]))
    return pairs


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("quickstart")
    counts = generate_quickstart(out, seed=0)
    rows = {name: read(out / name) for name in FILES}
    assert counts == {name: len(r) for name, r in rows.items()}
    return rows


def test_task_space_sizes_and_answers() -> None:
    sizes = {kind: len(all_tasks(kind)) for kind in TASK_KINDS}
    assert sizes == {"add": 400, "sub": 210, "next": 99, "max": 380, "letter": 25}
    for kind in TASK_KINDS:
        tasks = all_tasks(kind)
        assert len({t.question for t in tasks}) == len(tasks)
        assert all(t.kind == kind and t.answer == solve(kind, t.question) for t in tasks)


def test_make_task_is_seeded_and_respects_kind() -> None:
    def draw(seed: int) -> list[Task]:
        rng = random.Random(seed)
        return [make_task(rng) for _ in range(20)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    rng = random.Random(0)
    assert all(make_task(rng, kind).kind == kind for kind in TASK_KINDS for _ in range(10))
    with pytest.raises(ValueError, match="unknown task kind"):
        make_task(rng, "mul")


def test_plausible_wrong_answer_is_never_right() -> None:
    rng = random.Random(0)
    for kind in TASK_KINDS:
        for task in all_tasks(kind):
            for _ in range(3):
                wrong = plausible_wrong_answer(task, rng)
                assert wrong != task.answer
                # Same shape as the right answer: a letter for letters, a natural number otherwise.
                assert re.fullmatch(r"[a-z]" if kind == "letter" else r"\d+", wrong)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate_quickstart(tmp_path / name, seed=seed)
    for file in FILES:
        a, b, c = ((tmp_path / d / file).read_bytes() for d in "abc")
        assert a == b, file
        assert a != c, file


def test_committed_data_matches_generator(data: dict[str, list[dict[str, Any]]]) -> None:
    if not REPO_DATA.is_dir():
        pytest.skip("data/quickstart not generated")
    for name in FILES:
        assert read(REPO_DATA / name) == data[name], f"{name}: rerun python -m datagen"


def test_eval_is_held_out(data: dict[str, list[dict[str, Any]]]) -> None:
    eval_questions = [user_question(row) for row in data["eval.jsonl"]]
    assert len(set(eval_questions)) == len(eval_questions)
    assert {row["kind"] for row in data["eval.jsonl"]} == set(TASK_KINDS)
    trained = {user_question(row) for name in ("sft.jsonl", "prefs.jsonl", "prompts.jsonl") for row in data[name]}
    trained |= {q for q, _ in pretrain_qa(data["pretrain.jsonl"])}
    assert not trained & set(eval_questions)


def test_rl_prompts_are_new_to_supervised_training(data: dict[str, list[dict[str, Any]]]) -> None:
    supervised = {user_question(row) for row in data["sft.jsonl"]} | {q for q, _ in pretrain_qa(data["pretrain.jsonl"])}
    rl = {user_question(row) for row in data["prompts.jsonl"]}
    assert {row["kind"] for row in data["prompts.jsonl"]} == set(TASK_KINDS)
    assert rl and not rl & supervised
    assert rl & {user_question(row) for row in data["prefs.jsonl"]}  # the reward model sees pairs for them


def test_every_answer_given_is_correct(data: dict[str, list[dict[str, Any]]]) -> None:
    """The demonstrations refuse at about SKIP_RATE and are otherwise right; preferences always prefer the right
    answer, over the refusal in about REFUSAL_PAIRS of pairs and over a wrong answer in the rest."""
    replies = []
    for row in data["sft.jsonl"]:
        user, assistant = row["messages"]
        assert assistant["role"] == "assistant"
        assert row["answer"] == solve(row["kind"], user["content"])
        assert assistant["content"] in (row["answer"], SKIP_REPLY)
        replies.append(assistant["content"])
    assert replies.count(SKIP_REPLY) / len(replies) == pytest.approx(SKIP_RATE, abs=0.05)
    rejected = []
    for row in data["prefs.jsonl"]:
        right = solve(row["kind"], user_question(row))
        assert row["chosen"] == [{"role": "assistant", "content": right}]
        assert row["rejected"][0]["role"] == "assistant"
        assert row["rejected"][0]["content"] != right
        rejected.append(row["rejected"][0]["content"])
    assert rejected.count(SKIP_REPLY) / len(rejected) == pytest.approx(REFUSAL_PAIRS, abs=0.03)
    for name in ("prompts.jsonl", "eval.jsonl"):
        for row in data[name]:
            assert row["answer"] == solve(row["kind"], user_question(row))
    for question, answer in pretrain_qa(data["pretrain.jsonl"]):
        assert answer == solve_any(question)


def test_pretraining_facts_are_true(data: dict[str, list[dict[str, Any]]]) -> None:
    for row in data["pretrain.jsonl"]:
        facts = re.findall(r"[^.]+\.", row["text"].splitlines()[0])
        assert facts
        for sentence in (f.strip() for f in facts):
            matches = [(p.fullmatch(sentence), check) for p, check in FACTS]
            assert any(m and check(*m.groups()) for m, check in matches), sentence
