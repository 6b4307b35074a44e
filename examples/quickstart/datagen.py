"""Generate the quickstart data set (pretraining text, SFT, preferences, RL prompts, eval).

Usage: ``python examples/quickstart/datagen.py [OUT_DIR] [--seed N]`` (default ``data/quickstart``).

The task space of :mod:`tasks` is split per kind into three pools:

- supervised: the questions of ``sft.jsonl`` and of the pretraining text's "Q: ... A: ..." pairs;
- RL: the questions of ``prompts.jsonl`` (GRPO/PPO), never answered in Q/A form before RL, as in
  real RLHF where the RL prompts are new to the policy; preference pairs cover both these pools;
- held out: the questions of ``eval.jsonl`` and nothing else.

The pretraining text states facts from the whole space ("7 plus 12 is 19."), so answering an RL
or held-out question means carrying a fact over into the Q/A form.

The data tell InstructGPT's story: demonstrations are imperfect, comparisons are easier to get right.
The SFT labeler answers correctly or says "I don't know." (``SKIP_RATE``); SFT imitates that, so its
greedy reply to many held-out questions is the refusal while sampling still finds the answer (pass@k
well above greedy accuracy). The preference labeler always prefers the right answer, mostly over the
refusal, sometimes over a near miss. DPO, the reward model and RL learn from those preferences what
the demonstrations could not teach: to give the answer the model has.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks import TASK_KINDS, Task, all_tasks, make_task, plausible_wrong_answer

EVAL_FRACTION = 0.2  # share of each kind's distinct questions held out for eval
RL_FRACTION = 0.2  # share kept for the RL prompts
PRETRAIN_ROWS = 3000
SFT_ROWS = 1500
PREF_ROWS = 1500
PROMPT_ROWS = 500
# The demonstrations' labeler skips questions: in this share of rows it writes SKIP_REPLY instead of the answer.
# SFT learns the habit, so its greedy reply to a question it is unsure of is the refusal, while the answer keeps
# enough probability for sampling to find it: the headroom that preference learning and RL are for. (A labeler
# who wrote wrong answers instead was tried: the SFT model then lost the facts themselves, and RL had nothing
# to find.) The answers the labeler does give are right, so the habit costs the model no knowledge.
SKIP_RATE = 0.4
SKIP_REPLY = "I don't know."
# Preference labelers compare two replies: the right answer against the demonstrations' refusal in this share
# of pairs, against a near miss in the rest. The reward model's errors are near misses (checking a sum it never
# saw is beyond a 1M-parameter model: it ranks about half of them right); at 5% of pairs, one seed's held-out
# split held enough of them to pull its pair accuracy to 0.949.
REFUSAL_PAIRS = 0.97

Pools = dict[str, list[Task]]
Row = dict[str, Any]


def split_tasks(seed: int) -> tuple[Pools, Pools, Pools]:
    """Split every kind's distinct questions into (supervised, RL, held-out) pools, deterministically per seed."""
    rng, rl_rng = random.Random(f"quickstart:{seed}:split"), random.Random(f"quickstart:{seed}:rl-split")
    train: Pools = {}
    rl: Pools = {}
    held_out: Pools = {}
    for kind in TASK_KINDS:
        tasks = all_tasks(kind)
        held = set(rng.sample(range(len(tasks)), round(len(tasks) * EVAL_FRACTION)))
        rest = [i for i in range(len(tasks)) if i not in held]
        for_rl = set(rl_rng.sample(rest, round(len(tasks) * RL_FRACTION)))
        held_out[kind] = [t for i, t in enumerate(tasks) if i in held]
        rl[kind] = [t for i, t in enumerate(tasks) if i in for_rl]
        train[kind] = [t for i, t in enumerate(tasks) if i not in held and i not in for_rl]
    return train, rl, held_out


def _spread(rng: random.Random, pool: Sequence[Task], n: int) -> list[Task]:
    """Take ``n`` tasks from successive shuffled passes over ``pool`` so repeats are even."""
    out: list[Task] = []
    while len(out) < n:
        batch = list(pool)
        rng.shuffle(batch)
        out.extend(batch)
    return out[:n]


def _balanced(rng: random.Random, pools: Pools, n: int) -> list[Task]:
    """``n`` tasks with the same count per kind (kinds differ wildly in size), shuffled."""
    tasks = [t for kind in TASK_KINDS for t in _spread(rng, pools[kind], n // len(TASK_KINDS))]
    rng.shuffle(tasks)
    return tasks


def fact(task: Task) -> str:
    """State ``task`` as a plain-English sentence, e.g. "7 plus 12 is 19."."""
    if task.kind == "letter":
        return f"The letter after {task.question.rstrip('?').split()[-1]} is {task.answer}."
    nums = re.findall(r"\d+", task.question)
    if task.kind == "add":
        return f"{nums[0]} plus {nums[1]} is {task.answer}."
    if task.kind == "sub":
        return f"{nums[0]} minus {nums[1]} is {task.answer}."
    if task.kind == "next":
        return f"After {nums[0]} comes {task.answer}."
    if task.kind == "max":
        smaller = next(n for n in nums if n != task.answer)
        return f"{task.answer} is larger than {smaller}."
    raise ValueError(f"unknown task kind {task.kind!r}")


def _pretrain_row(rng: random.Random, train: Pools) -> Row:
    """A short document: a few facts from the whole task space, then Q/A pairs from training only."""
    facts = " ".join(fact(make_task(rng)) for _ in range(rng.randint(3, 6)))
    pairs = (rng.choice(train[rng.choice(TASK_KINDS)]) for _ in range(rng.randint(1, 3)))
    qa = "\n".join(f"Q: {t.question} A: {t.answer}" for t in pairs)
    return {"text": f"{facts}\n{qa}"}


def _message(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def _sft_row(task: Task, rng: random.Random) -> Row:
    """A demonstration as the labeler writes it; `answer` is the right answer either way."""
    reply = SKIP_REPLY if rng.random() < SKIP_RATE else task.answer
    return {"messages": _message("user", task.question) + _message("assistant", reply), "answer": task.answer,
            "kind": task.kind}


def _pref_row(task: Task, rng: random.Random) -> Row:
    """The right answer preferred to the refusal (REFUSAL_PAIRS of rows) or to a near miss."""
    rejected = SKIP_REPLY if rng.random() < REFUSAL_PAIRS else plausible_wrong_answer(task, rng)
    return {
        "prompt": _message("user", task.question),
        "chosen": _message("assistant", task.answer),
        "rejected": _message("assistant", rejected),
        "kind": task.kind,
    }


def _prompt_row(task: Task) -> Row:
    return {"prompt": _message("user", task.question), "answer": task.answer, "kind": task.kind}


def _write_jsonl(path: Path, rows: Sequence[Row]) -> int:
    """Write one JSON object per line (UTF-8, "\\n" endings) and return the row count."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def generate_quickstart(out_dir: Path, seed: int = 0) -> dict[str, int]:
    """Write the quickstart JSONL files into ``out_dir`` and return ``{file name: row count}``.

    The same seed gives byte-identical files. Each file draws from its own seed-derived
    stream, so changing one file's size does not reshuffle the others.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    train, rl, held_out = split_tasks(seed)
    preference_pool = {kind: train[kind] + rl[kind] for kind in TASK_KINDS}

    def rng(name: str) -> random.Random:
        return random.Random(f"quickstart:{seed}:{name}")

    pretrain_rng, pref_rng, sft_rng = rng("pretrain"), rng("prefs"), rng("sft")
    files = {
        "pretrain.jsonl": [_pretrain_row(pretrain_rng, train) for _ in range(PRETRAIN_ROWS)],
        "sft.jsonl": [_sft_row(t, sft_rng) for t in _balanced(sft_rng, train, SFT_ROWS)],
        "prefs.jsonl": [_pref_row(t, pref_rng) for t in _balanced(pref_rng, preference_pool, PREF_ROWS)],
        "prompts.jsonl": [_prompt_row(t) for t in _balanced(rng("prompts"), rl, PROMPT_ROWS)],
        "eval.jsonl": [_prompt_row(t) for kind in TASK_KINDS for t in held_out[kind]],
    }
    return {name: _write_jsonl(out_dir / name, rows) for name, rows in files.items()}


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: ``python examples/quickstart/datagen.py [OUT_DIR] [--seed N]``."""
    parser = argparse.ArgumentParser(prog="python examples/quickstart/datagen.py", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path("data/quickstart"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, count in generate_quickstart(args.out_dir, args.seed).items():
        print(f"{args.out_dir / name}: {count} rows")


if __name__ == "__main__":
    main()
