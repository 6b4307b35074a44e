"""The tool of `recipes/tools.yaml`: a calculator for products the model cannot work out from memory."""

from __future__ import annotations

import ast
import operator

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculate(expression: str) -> int:
    """Evaluate an arithmetic expression of whole numbers with +, - and *.

    Args:
        expression: The expression, for example "417 * 38".
    """
    # Parsed and walked rather than eval'd: the model writes the expression, and only arithmetic may run.
    return evaluate(ast.parse(expression, mode="eval").body)


def evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
    raise ValueError(f"not arithmetic on whole numbers: {ast.unparse(node)}")
