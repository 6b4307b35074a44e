"""Reward functions built to make RL stages unhealthy (tests/test_health.py), named `tests.health_rewards:NAME`."""

from __future__ import annotations

from typing import Any

from pipeline.models.decoding import completion_text


def constant(prompts: list, completions: list, **_: Any) -> list[float]:
    """The same reward for every sample: every group has zero variance, nothing to learn."""
    return [1.0] * len(completions)


def length(prompts: list, completions: list, **_: Any) -> list[float]:
    """Pays for characters: responses grow to the token limit."""
    return [len(completion_text(c)) / 10 for c in completions]



def short(prompts: list, completions: list, **_: Any) -> list[float]:
    """Pays for saying nothing: the policy learns to end at once, and its entropy collapses."""
    return [-len(completion_text(c)) / 10 for c in completions]
