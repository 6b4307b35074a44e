"""Row-level checks of a local dataset, in file order, so every problem names the file's own line numbers.

Made before training (by `pipeline.validation.preflight`): the stages see rows after a seeded shuffle and split,
where a position means nothing to the user. Errors are rows no stage can use; warnings are rows that
train but teach nothing (a pair whose chosen equals its rejected), reported with their count.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from datasets import Dataset

from pipeline.config.schema import suggest

VALID_ROLES = ("system", "user", "assistant", "tool")
# Columns whose list values are chat messages (`responses` and `instances` hold lists of other things).
MESSAGE_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")
TEXT_COLUMNS = ("text", "prompt", "completion", "chosen", "rejected")  # a string, or (but `text`) chat messages
SHOWN_SPANS = 6


def spans(numbers: list[int]) -> str:
    """`3, 7, 101-110` for sorted line numbers; the first few runs, then how many more."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:SHOWN_SPANS])
    return shown + (f" and {len(runs) - SHOWN_SPANS} more" if len(runs) > SHOWN_SPANS else "")


class Rows:
    """Names rows of one source as the user finds them: `lines 101-110` of a JSONL file, else `rows 3-5`."""

    def __init__(self, where: str, kind: str, numbers: list[int]):
        self.where, self.kind, self.numbers = where, kind, numbers

    def one(self, index: int) -> str:
        return f"{self.where}: {self.kind} {self.numbers[index]}"

    def many(self, indices: list[int]) -> str:
        plural = "s" if len(indices) > 1 else ""
        return f"{self.where}: {self.kind}{plural} {spans([self.numbers[i] for i in indices])}"


def message_problem(value: Any) -> str | None:
    """What is wrong with one list of chat messages, or None."""
    if not value:
        return "an empty message list"
    for i, message in enumerate(value):
        calls = isinstance(message, dict) and message.get("tool_calls")  # a tool call needs no content
        if not isinstance(message, dict) or "role" not in message or ("content" not in message and not calls):
            return f"message {i} is not a {{role, content}} mapping: {message!r:.60}"
        role = message["role"]
        for key in ("role",) + (() if calls else ("content",)):  # a key some rows lack is null in theirs
            if message[key] is None:
                return f"message {i} has no {key}"
        if role not in VALID_ROLES:
            return f"message {i} has role {role!r}; roles are {', '.join(VALID_ROLES)}{suggest(str(role), VALID_ROLES)}"
        if not isinstance(message.get("content"), str) and not (calls and message.get("content") is None):
            return f"message {i} has content of type {type(message['content']).__name__}; content is a string"
    return None


def grouped(problems: dict[str, list[int]], rows: Rows) -> list[str]:
    """One line per kind of problem, with every row it occurs in."""
    return [f"{rows.many(indices)}: {problem}" + (f" ({len(indices)} rows)" if len(indices) > 1 else "")
            for problem, indices in problems.items()]


def row_problems(dataset: Dataset, columns: tuple[str, ...], rows: Rows, *, sft_messages: bool = False) -> list[str]:
    """Rows missing a value the stage needs, and malformed chat messages, in `columns`."""
    problems: dict[str, list[int]] = defaultdict(list)
    present = [c for c in columns if c in dataset.column_names]
    for column in present:
        for index, value in enumerate(dataset[column]):
            if value is None:
                problems[f"missing '{column}'"].append(index)
            elif column in TEXT_COLUMNS and not isinstance(value, (str, list)):
                problems[f"'{column}' is a {type(value).__name__}, not text"].append(index)
            elif column == "prompt" and isinstance(value, str) and not value.strip():
                # also: one empty prompt would make TRL take every row of the split as plain text, not chat
                problems["empty 'prompt' (a row without one belongs in a `text` column)"].append(index)
            elif isinstance(value, list) and column in MESSAGE_COLUMNS:
                problem = message_problem(value)
                if problem is None and sft_messages and column == "messages" and value[-1]["role"] != "assistant":
                    problem = "the last message must be the assistant's (it is what SFT trains on)"
                if problem:
                    problems[f"'{column}': {problem}"].append(index)
    return grouped(problems, rows)


def label_problems(dataset: Dataset, rows: Rows) -> list[str]:
    """Unpaired rows' `label`: true (desirable) or false (undesirable), and both kinds present."""
    labels = list(dataset["label"])
    wrong = [i for i, label in enumerate(labels) if not isinstance(label, bool)]
    if wrong:
        return grouped({f"`label` must be true (desirable) or false (undesirable), not {labels[wrong[0]]!r}": wrong},
                       rows)
    if len(set(labels)) < 2:
        return [f"{rows.where}: all {len(labels)} rows are labelled {labels[0]}; desirable (true) and undesirable "
                "(false) rows are learnt from together, so give both"]
    return []


def identical_pairs(dataset: Dataset, rows: Rows) -> tuple[list[str], list[str]]:
    """(errors, warnings) for pairwise rows whose chosen equals rejected: no preference, no gradient."""
    same = [i for i, (c, r) in enumerate(zip(dataset["chosen"], dataset["rejected"])) if c == r and c is not None]
    if not same:
        return [], []
    if len(same) == len(dataset):
        return [f"{rows.where}: in all {len(same)} rows 'chosen' equals 'rejected', so there is no preference "
                "to learn (DPO and reward training would see zero gradient); check the columns"], []
    return [], [f"{rows.many(same)}: 'chosen' equals 'rejected' in {len(same)} of {len(dataset)} rows; "
                "these pairs teach nothing"]


def split_problem(rows: int, test_size: float) -> str | None:
    """Why a seeded split of `rows` rows with `test_size` leaves no training or no held-out rows, or None."""
    held_out = int(test_size) if test_size >= 1 else math.ceil(rows * test_size)  # datasets rounds a fraction up
    if held_out < rows:
        return None
    fix = "give fewer rows or a fraction such as 0.1" if test_size >= 1 else "add rows"
    return f"test_size: {test_size:g} holds out {held_out} of the {rows} rows, leaving none to train on; {fix}"

