"""Tools for the tool-calling tests: a calculator, and tools that misbehave in each way a user's tool can."""

from __future__ import annotations

import os
import time
from pathlib import Path


def add(a: int, b: int) -> int:
    """Add two whole numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def broken(a: int) -> int:
    """Always fails.

    Args:
        a: Any number.
    """
    raise RuntimeError(f"cannot handle {a}")


def slow(a: int) -> int:
    """Never answers in time.

    Args:
        a: Any number.
    """
    time.sleep(60)
    return a


def opaque(a: int) -> object:
    """Answers with something that is not text.

    Args:
        a: Any number.
    """
    return object()


def undocumented(a, b):
    return a + b


def marker(a: int) -> str:
    """Leaves a file behind when called, so a test can tell whether it ran.

    Args:
        a: Any number.
    """
    Path(os.environ["TOOL_MARKER"]).write_text(str(a))
    return "called"


class Vault:
    """An environment: a vault whose code is the row's `answer`. The model tries codes (`try_code`, its one tool)
    and is told higher or lower; the rollout scores 1 if the vault opened."""

    def __init__(self, attempts: int = 3):
        if "TOOL_MARKER" in os.environ:  # so a test can tell whether one was made
            Path(os.environ["TOOL_MARKER"]).write_text("made")
        self.attempts = attempts

    def reset(self, answer: str, **row) -> str:
        self.code, self.left, self.opened = int(answer), self.attempts, False
        return f" The vault allows {self.attempts} tries."

    def try_code(self, code: int) -> str:
        """Try a code on the vault.

        Args:
            code: The code to try.
        """
        if self.left == 0:
            return "locked: no tries left"
        self.left -= 1
        self.opened = self.opened or code == self.code
        return "open" if code == self.code else "higher" if code < self.code else "lower"

    def get_reward(self) -> float:
        return float(self.opened)


class NoReset:
    def try_code(self, code: int) -> str:
        """Try a code.

        Args:
            code: The code.
        """
        return "no"


class Undescribed:
    def reset(self, **row) -> None:
        pass

    def poke(self, x):
        return x
