"""The tool of `recipes/tools.yaml`: a multiplication the model cannot do from memory."""

from __future__ import annotations

import re


def multiply(a: int, b: int) -> int:
    """Multiply two whole numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a * b


def arguments_copied(prompts: list, completions: list, **_) -> list[float]:
    """A graded reward for the call: the share of the question's digits that the model's first `multiply` call
    copies to the right place (0 without a call). Exact match alone is all-or-nothing on five digits, so a policy
    that copies most of them right gets no signal from it; this one tells it which samples copied more."""
    return [copied_share(question_text(prompt), first_call_arguments(completion))
            for prompt, completion in zip(prompts, completions)]


def question_text(prompt: str | list[dict]) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def first_call_arguments(completion: str | list[dict]) -> dict | None:
    for message in completion if isinstance(completion, list) else []:
        for call in message.get("tool_calls") or []:
            function = call.get("function", call)
            if function.get("name") == "multiply" and isinstance(function.get("arguments"), dict):
                return function["arguments"]
    return None


def copied_share(question: str, arguments: dict | None) -> float:
    numbers = re.findall(r"\d+", question)
    if arguments is None or len(numbers) != 2:
        return 0.0
    shares = []
    for name, number in zip(("a", "b"), numbers):
        written = str(arguments.get(name, ""))
        shares.append(sum(x == y for x, y in zip(written, number)) / max(len(written), len(number)))
    return sum(shares) / len(shares)
