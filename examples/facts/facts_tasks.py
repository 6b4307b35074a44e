"""A second task family, apart from the quickstart's, for checking RL on work its defaults were never tuned on.

Five kinds, none of them the quickstart's: times tables, the number before, the smaller of two, halves, and the
colour of a made-up thing (pure recall: nothing in the question hints at the answer). Each kind has one fixed
question template and one short correct answer, so rewards and evaluation are exact match.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

TASK_KINDS: tuple[str, ...] = ("times", "before", "min", "half", "colour")
COLOURS = ("red", "blue", "green", "black", "white", "pink")
_SYLLABLES = ("ba", "ko", "ri", "mu", "te", "lo", "zi", "pa", "ne", "du", "fa", "go")


@dataclass(frozen=True)
class Task:
    """One question with its single correct answer."""

    kind: str
    question: str
    answer: str


@functools.cache
def things() -> tuple[tuple[str, str], ...]:
    """120 made-up nouns, each with a fixed colour (the same on every machine: a seeded draw)."""
    rng = random.Random("facts:things")
    names = sorted({a + b + c for a in _SYLLABLES for b in _SYLLABLES for c in ("p", "t", "k", "m")})
    return tuple((name, rng.choice(COLOURS)) for name in rng.sample(names, 120))


@functools.cache
def all_tasks(kind: str) -> tuple[Task, ...]:
    """Every distinct task of ``kind`` in a fixed order (the whole task space)."""
    if kind == "times":
        return tuple(Task(kind, f"What is {a} times {b}?", str(a * b)) for a in range(2, 11) for b in range(2, 11))
    if kind == "before":
        return tuple(Task(kind, f"What number comes before {n}?", str(n - 1)) for n in range(1, 100))
    if kind == "min":
        return tuple(Task(kind, f"Which is smaller, {a} or {b}?", str(min(a, b)))
                     for a in range(10, 30) for b in range(10, 30) if a != b)
    if kind == "half":
        return tuple(Task(kind, f"What is half of {n}?", str(n // 2)) for n in range(2, 100, 2))
    if kind == "colour":
        return tuple(Task(kind, f"What colour is a {name}?", colour) for name, colour in things())
    raise ValueError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")


def fact(task: Task) -> str:
    """``task`` as a plain sentence for pretraining text, e.g. "6 times 7 makes 42."."""
    words = task.question.rstrip("?").split()
    if task.kind == "times":
        return f"{words[2]} times {words[4]} makes {task.answer}."
    if task.kind == "before":
        return f"{task.answer} comes just before {words[-1]}."
    if task.kind == "min":
        other = words[3].rstrip(",") if words[3].rstrip(",") != task.answer else words[5]
        return f"{task.answer} is smaller than {other}."
    if task.kind == "half":
        return f"Half of {words[-1]} is {task.answer}."
    return f"A {words[-1]} is {task.answer}."


def near_miss(task: Task, rng: random.Random) -> str:
    """A plausible wrong answer: a neighbouring number, the other operand, another colour."""
    if task.kind == "colour":
        return rng.choice([c for c in COLOURS if c != task.answer])
    if task.kind == "min":
        words = task.question.rstrip("?").replace(",", "").split()
        return next(w for w in (words[3], words[5]) if w != task.answer)
    n = int(task.answer)
    step = int(task.question.split()[2]) if task.kind == "times" else 1  # a times-table slip is one row off
    return rng.choice([str(n + d) for d in (-step, step) if n + d >= 0])
