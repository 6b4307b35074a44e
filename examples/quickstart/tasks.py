"""Checkable toy tasks for the quickstart: tiny arithmetic, ordering and alphabet questions.

Every task has exactly one short correct answer, so rewards and evaluation can be
computed by exact match. Each kind uses a single fixed question template so that a
~1M-parameter model can learn the format within minutes on a CPU.
"""

from __future__ import annotations

import functools
import random
import re
import string
from dataclasses import dataclass

TASK_KINDS: tuple[str, ...] = ("add", "sub", "next", "max", "letter")

_SMALL = range(20)  # operands for add/sub/max
_COUNT = range(99)  # "next" questions cover 0..98 so answers stay below 100
_LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Task:
    """One question with its single correct answer."""

    kind: str
    question: str
    answer: str


@functools.cache
def all_tasks(kind: str) -> tuple[Task, ...]:
    """Return every distinct task of ``kind`` in a fixed order (the whole task space)."""
    if kind == "add":
        return tuple(Task(kind, f"What is {a} + {b}?", str(a + b)) for a in _SMALL for b in _SMALL)
    if kind == "sub":
        return tuple(
            Task(kind, f"What is {a} - {b}?", str(a - b)) for a in _SMALL for b in _SMALL if a >= b
        )
    if kind == "next":
        return tuple(Task(kind, f"What number comes after {n}?", str(n + 1)) for n in _COUNT)
    if kind == "max":
        return tuple(
            Task(kind, f"Which is larger, {a} or {b}?", str(max(a, b)))
            for a in _SMALL
            for b in _SMALL
            if a != b
        )
    if kind == "letter":
        # a..y: "z" has no successor.
        return tuple(
            Task(kind, f"What letter comes after {c}?", nxt) for c, nxt in zip(_LETTERS, _LETTERS[1:])
        )
    raise ValueError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")


def make_task(rng: random.Random, kind: str | None = None) -> Task:
    """Draw a task of ``kind`` (a uniformly chosen kind when None) using ``rng``."""
    return rng.choice(all_tasks(kind if kind is not None else rng.choice(TASK_KINDS)))


def plausible_wrong_answer(task: Task, rng: random.Random) -> str:
    """Return an incorrect answer close to the right one (a near miss, not noise).

    Near misses make preference pairs informative: the model must get the exact
    value right, not merely produce a number or a letter.
    """
    if task.kind == "letter":
        i = _LETTERS.index(task.answer)
        candidates = [_LETTERS[j] for j in (i - 2, i - 1, i + 1) if 0 <= j < len(_LETTERS)]
    elif task.kind == "max":
        # The classic mistake is picking the smaller of the two numbers.
        candidates = [n for n in re.findall(r"\d+", task.question) if n != task.answer]
    else:
        n = int(task.answer)
        candidates = [str(n + d) for d in (-2, -1, 1, 2) if n + d >= 0]
    return rng.choice(candidates)
