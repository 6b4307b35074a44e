"""Write the tool-use data set of `recipes/tools.yaml`: sums of two 3-digit numbers, and a calculator to call.

Usage: ``python examples/tools/datagen.py [OUT_DIR] [--seed N] [--demonstrations N]`` (default ``data/tools``).

- ``sft.jsonl``: demonstrations (``--demonstrations``, default 200): the user asks for a sum, the assistant calls
  ``add`` with the two numbers, the tool answers, the assistant states the sum.
- ``prompts.jsonl``: other questions, with their answers, for GRPO; ``eval.jsonl``: held-out questions, in neither.

A 3-digit sum is beyond what the quickstart's model can do from memory (its pretraining states sums up to 20), so
its accuracy is its accuracy at calling the tool with the question's numbers and copying the tool's answer out.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

EVAL_ROWS, PROMPT_ROWS = 200, 1000


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def demonstration(a: int, b: int) -> dict:
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}
    return {"messages": [{"role": "user", "content": question(a, b)},
                         {"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "name": "add", "content": str(a + b)},
                         {"role": "assistant", "content": str(a + b)}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="data/tools")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demonstrations", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    pairs = list(dict.fromkeys((rng.randint(100, 999), rng.randint(100, 999))
                               for _ in range(EVAL_ROWS + PROMPT_ROWS + args.demonstrations + 100)))
    held_out, rest = pairs[:EVAL_ROWS], pairs[EVAL_ROWS:]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"sft.jsonl": [demonstration(a, b) for a, b in rest[:args.demonstrations]],
             "prompts.jsonl": [{"prompt": question(a, b), "answer": str(a + b)}
                               for a, b in rest[args.demonstrations:args.demonstrations + PROMPT_ROWS]],
             "eval.jsonl": [{"prompt": question(a, b), "answer": str(a + b)} for a, b in held_out]}
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{out / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
