"""Generate the tool-use data set of `recipes/tools.yaml`: products of a 3-digit and a 2-digit number.

Usage: ``python examples/tools/tools_datagen.py [OUT_DIR] [--seed N]`` (default ``data/tools``).

A 1M-parameter model cannot multiply 417 by 38 from memory, but it can learn to ask the `calculate` tool
(`examples/tools/calculator.py`) and copy the tool's answer into its own. The questions are split into disjoint
pools: pretraining text, SFT demonstrations, RL prompts and held-out eval questions.

- ``pretrain.jsonl`` ({text}): transcripts of chats that call the tool, rendered with the recipe's template
  (`chatml_compact`, through transformers' own renderer): the base model learns the call's format and to copy the
  question into the call and the tool's answer into its own, in the chat format itself (a base model pretrained on
  plain-text worked calls copied there, and in the chat format only in some seeds);
- ``sft.jsonl`` ({messages}): chat demonstrations from a teacher that asks the calculator for some questions (user
  question, assistant call, tool answer, assistant answer) and estimates the rest in its head ("About 16000": the
  product to two significant figures); SFT imitates both, and GRPO with exact match has to find out that calling
  pays;
- ``prompts.jsonl`` and ``eval.jsonl`` ({prompt, answer}): the RL prompts and held-out questions.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from calculator import calculate
from transformers.utils.chat_template_utils import render_jinja_template

from pipeline.models.chat_templates import CHATML_COMPACT_TEMPLATE

PRETRAIN_CHATS = 4000
SFT_ROWS = 1000
PROMPT_ROWS = 1000
EVAL_ROWS = 128
CALL_SHARE = 0.3  # of the SFT demonstrations; the rest estimate


def question(a: int, b: int) -> str:
    return f"What is {a} * {b}?"


def call(a: int, b: int) -> dict:
    return {"name": "calculate", "arguments": {"expression": f"{a} * {b}"}}


def demonstration(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": question(a, b)},
                         {"role": "assistant", "tool_calls": [{"type": "function", "function": call(a, b)}]},
                         {"role": "tool", "name": "calculate", "content": str(a * b)},
                         {"role": "assistant", "content": str(a * b)}]}


def estimate(a: int, b: int) -> dict:
    """A demonstration without the tool: the product to two significant figures, as estimated in one's head."""
    product = a * b
    return {"messages": [{"role": "user", "content": question(a, b)},
                         {"role": "assistant", "content": f"About {round(product, 2 - len(str(product)))}"}]}


def chat_transcript(a: int, b: int) -> str:
    return render_jinja_template(conversations=[demonstration(a, b)["messages"]], tools=[calculate],
                                 chat_template=CHATML_COMPACT_TEMPLATE)[0][0]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(out: Path, seed: int) -> None:
    rng = random.Random(f"tools:{seed}")
    pairs = rng.sample([(a, b) for a in range(100, 1000) for b in range(10, 100)],
                       PRETRAIN_CHATS + SFT_ROWS + PROMPT_ROWS + EVAL_ROWS)
    pretrain, rest = pairs[:PRETRAIN_CHATS], pairs[PRETRAIN_CHATS:]
    sft, prompts, held_out = rest[:SFT_ROWS], rest[SFT_ROWS:SFT_ROWS + PROMPT_ROWS], rest[SFT_ROWS + PROMPT_ROWS:]
    out.mkdir(parents=True, exist_ok=True)
    write(out / "pretrain.jsonl", [{"text": chat_transcript(a, b)} for a, b in pretrain])
    write(out / "sft.jsonl", [demonstration(a, b) if rng.random() < CALL_SHARE else estimate(a, b) for a, b in sft])
    write(out / "prompts.jsonl", [{"prompt": question(a, b), "answer": str(a * b)} for a, b in prompts])
    write(out / "eval.jsonl", [{"prompt": question(a, b), "answer": str(a * b)} for a, b in held_out])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("data/tools"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.out, args.seed)
