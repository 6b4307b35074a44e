"""The calculator tool of `recipes/tools.yaml`: what a model calls for sums it cannot do from memory."""

from __future__ import annotations


def add(a: int, b: int) -> int:
    """Add two whole numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b
