"""Generate the tool-use data set of `recipes/tools.yaml`: products of a 3-digit and a 2-digit number.

Usage: ``python examples/tools/tools_datagen.py [OUT_DIR] [--seed N]`` (default ``data/tools``).

A 1M-parameter model cannot multiply 417 by 38 from memory, but it can learn to ask the `multiply` tool
(`examples/tools/calculator.py`) and copy the tool's answer into its own. The questions are split into disjoint
pools: pretraining text, SFT demonstrations, RL prompts and held-out eval questions.

- ``pretrain.jsonl`` ({text}): plain-text worked calls, 'Q: What is 417 * 38? {"name": "multiply", "arguments":
  {"a": 417, "b": 38}} -> 15846. A: 15846', so the base model has met the calls' JSON and numbers being copied
  before it sees the chat format;
- ``sft.jsonl`` ({messages}): a few chat demonstrations in the tool-call format (user question, assistant call,
  tool answer, assistant answer);
- ``prompts.jsonl`` and ``eval.jsonl`` ({prompt, answer}): the RL prompts and held-out questions.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PRETRAIN_ROWS = 2000
SFT_ROWS = 1000
PROMPT_ROWS = 1000
EVAL_ROWS = 128
QUESTIONS_PER_TEXT = 3
FILLERS = ("Let me ask the calculator.", "I will call multiply.", "Calling the tool.", "The tool says:", "So,",
           "Then", "Checking.", "The result came back.", "Done.", "Okay.")


def question(a: int, b: int) -> str:
    return f"What is {a} * {b}?"


def call(a: int, b: int) -> dict:
    return {"name": "multiply", "arguments": {"a": a, "b": b}}


def demonstration(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": question(a, b)},
                         {"role": "assistant", "tool_calls": [{"type": "function", "function": call(a, b)}]},
                         {"role": "tool", "name": "multiply", "content": str(a * b)},
                         {"role": "assistant", "content": str(a * b)}]}


def filler(rng: random.Random) -> str:
    """0-3 short phrases: the distance from a number to its copy varies, so copying has to find the number by what
    it is, not by where it stands (what the chat format's longer distances need)."""
    return "".join(" " + rng.choice(FILLERS) for _ in range(rng.randint(0, 3)))


def worked_call(a: int, b: int, rng: random.Random) -> str:
    return f"Q: {question(a, b)}{filler(rng)} {json.dumps(call(a, b))}{filler(rng)} -> {a * b}.{filler(rng)} A: {a * b}"


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(out: Path, seed: int) -> None:
    rng = random.Random(f"tools:{seed}")
    pairs = rng.sample([(a, b) for a in range(100, 1000) for b in range(10, 100)],
                       PRETRAIN_ROWS * QUESTIONS_PER_TEXT + SFT_ROWS + PROMPT_ROWS + EVAL_ROWS)
    pretrain, rest = pairs[:PRETRAIN_ROWS * QUESTIONS_PER_TEXT], pairs[PRETRAIN_ROWS * QUESTIONS_PER_TEXT:]
    sft, prompts, held_out = rest[:SFT_ROWS], rest[SFT_ROWS:SFT_ROWS + PROMPT_ROWS], rest[SFT_ROWS + PROMPT_ROWS:]
    out.mkdir(parents=True, exist_ok=True)
    texts = [" ".join(worked_call(a, b, rng) for a, b in pretrain[i:i + QUESTIONS_PER_TEXT])
             for i in range(0, len(pretrain), QUESTIONS_PER_TEXT)]
    write(out / "pretrain.jsonl", [{"text": text} for text in texts])
    write(out / "sft.jsonl", [demonstration(a, b) for a, b in sft])
    write(out / "prompts.jsonl", [{"prompt": question(a, b), "answer": str(a * b)} for a, b in prompts])
    write(out / "eval.jsonl", [{"prompt": question(a, b), "answer": str(a * b)} for a, b in held_out])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("data/tools"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.out, args.seed)
