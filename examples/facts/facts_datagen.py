"""Generate the `facts` data set: the second task family (``facts_tasks``), for RL on work it was not tuned on.

Usage: ``python examples/facts/facts_datagen.py [OUT_DIR] [--seed N]`` (default ``data/facts``).

The same layout as the quickstart's (pretraining text, SFT, preferences, RL prompts, held-out eval) with
its own tasks and its own labelers:

- pretraining states facts from the whole task space ("6 times 7 makes 42."), and shows the Q/A form only
  for the supervised pool; RL prompts and held-out questions are never answered in that form;
- the SFT labeler is hurried: right in ``RIGHT_RATE`` of rows, "Not sure." in ``HEDGE_RATE``, a near miss
  (a slip) in the rest, so SFT imitates slips and hedges on questions it could answer;
- the preference labeler always prefers the right answer, over a hedge, an answer of the wrong type (a colour
  for a number) or a near miss; near misses are the pairs a small reward model cannot check, so its errors
  are plausible ones, and RL against it can be hacked by them.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from facts_tasks import COLOURS, TASK_KINDS, Task, all_tasks, fact, near_miss

EVAL_FRACTION, RL_FRACTION = 0.2, 0.2  # shares of each kind's questions held out, and kept for RL prompts
PRETRAIN_ROWS, SFT_ROWS, PREF_ROWS, PROMPT_ROWS = 3000, 1500, 1500, 500
RIGHT_RATE, HEDGE_RATE = 0.55, 0.30  # the SFT labeler; slips (near misses) in the remaining 15%
HEDGE = "Not sure."
NEAR_MISS_PAIRS, WRONG_TYPE_PAIRS = 0.15, 0.40  # rejected replies; hedges in the remaining 45%

Pools = dict[str, list[Task]]
Row = dict[str, Any]


def split_tasks(seed: int) -> tuple[Pools, Pools, Pools]:
    """Every kind's questions split into (supervised, RL, held-out) pools, deterministically per seed."""
    rng = random.Random(f"facts:{seed}:split")
    pools: tuple[Pools, Pools, Pools] = ({}, {}, {})
    for kind in TASK_KINDS:
        tasks = list(all_tasks(kind))
        rng.shuffle(tasks)
        n_eval, n_rl = round(len(tasks) * EVAL_FRACTION), round(len(tasks) * RL_FRACTION)
        pools[2][kind], pools[1][kind], pools[0][kind] = tasks[:n_eval], tasks[n_eval:n_eval + n_rl], tasks[n_eval + n_rl:]
    return pools


def balanced(rng: random.Random, pools: Pools, n: int) -> list[Task]:
    """``n`` tasks, the same count per kind, repeats spread evenly within a kind, shuffled."""
    out = []
    for kind in TASK_KINDS:
        picks: list[Task] = []
        while len(picks) < n // len(TASK_KINDS):
            picks.extend(rng.sample(pools[kind], len(pools[kind])))
        out.extend(picks[:n // len(TASK_KINDS)])
    rng.shuffle(out)
    return out


def wrong_type(task: Task, rng: random.Random) -> str:
    return str(rng.randint(2, 99)) if task.kind == "colour" else rng.choice(COLOURS)


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def assistant(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


def pretrain_row(rng: random.Random, every: list[Task], supervised: Pools) -> Row:
    facts = " ".join(fact(rng.choice(every)) for _ in range(rng.randint(3, 6)))
    pairs = (rng.choice(supervised[rng.choice(TASK_KINDS)]) for _ in range(rng.randint(1, 3)))
    return {"text": facts + "\n" + "\n".join(f"Q: {t.question} A: {t.answer}" for t in pairs)}


def sft_row(task: Task, rng: random.Random) -> Row:
    draw = rng.random()
    reply = task.answer if draw < RIGHT_RATE else HEDGE if draw < RIGHT_RATE + HEDGE_RATE else near_miss(task, rng)
    return {"messages": user(task.question) + assistant(reply), "answer": task.answer, "kind": task.kind}


def pref_row(task: Task, rng: random.Random) -> Row:
    draw = rng.random()
    rejected = (near_miss(task, rng) if draw < NEAR_MISS_PAIRS else wrong_type(task, rng)
                if draw < NEAR_MISS_PAIRS + WRONG_TYPE_PAIRS else HEDGE)
    return {"prompt": user(task.question), "chosen": assistant(task.answer), "rejected": assistant(rejected),
            "kind": task.kind}


def prompt_row(task: Task) -> Row:
    return {"prompt": user(task.question), "answer": task.answer, "kind": task.kind}


def generate_facts(out_dir: Path, seed: int = 0) -> dict[str, int]:
    """Write the JSONL files into ``out_dir``; returns ``{file name: rows}``. The same seed, the same bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    supervised, rl, held_out = split_tasks(seed)
    every = [t for kind in TASK_KINDS for t in all_tasks(kind)]

    def rng(name: str) -> random.Random:
        return random.Random(f"facts:{seed}:{name}")

    pretrain_rng, sft_rng, pref_rng = rng("pretrain"), rng("sft"), rng("prefs")
    preference_pool = {kind: supervised[kind] + rl[kind] for kind in TASK_KINDS}
    files = {
        "pretrain.jsonl": [pretrain_row(pretrain_rng, every, supervised) for _ in range(PRETRAIN_ROWS)],
        "sft.jsonl": [sft_row(t, sft_rng) for t in balanced(sft_rng, supervised, SFT_ROWS)],
        "prefs.jsonl": [pref_row(t, pref_rng) for t in balanced(pref_rng, preference_pool, PREF_ROWS)],
        "prompts.jsonl": [prompt_row(t) for t in balanced(rng("prompts"), rl, PROMPT_ROWS)],
        "eval.jsonl": [prompt_row(t) for kind in TASK_KINDS for t in held_out[kind]],
    }
    for name, rows in files.items():
        with (out_dir / name).open("w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return {name: len(rows) for name, rows in files.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python examples/facts/facts_datagen.py", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path("data/facts"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, count in generate_facts(args.out_dir, args.seed).items():
        print(f"{args.out_dir / name}: {count} rows")


if __name__ == "__main__":
    main()
