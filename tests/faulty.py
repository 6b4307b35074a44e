"""Code that fails on purpose, for fault tests; recipes name it as `tests.faulty:function`."""

from __future__ import annotations

import os
from typing import Any


def reward_failing_on_rank_1(prompts: list, completions: list, **_: Any) -> list[float]:
    """A GRPO reward function with a bug that only the rows given to rank 1 trigger."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("reward function failed on rank 1")
    return [0.0] * len(completions)


def reward_failing(prompts: list, completions: list, **_: Any) -> list[float]:
    """A GRPO reward function with a bug every row triggers."""
    raise RuntimeError("a reward function with a bug")
