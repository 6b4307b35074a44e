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
