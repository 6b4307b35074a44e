"""Write the small real-data samples the real-data recipes read offline (data/gsm8k, data/hh-rlhf, data/alpaca).

Usage: ``python examples/realdata/prepare.py DATASET SOURCE [--out DIR] [--seed N] [--rows FILE=N ...]``

- DATASET: ``gsm8k``, ``hh-rlhf`` or ``alpaca``;
- SOURCE: ``hub`` (``datasets.load_dataset``: openai/gsm8k, Anthropic/hh-rlhf, tatsu-lab/alpaca), or a local copy
  of the public repository (openai/grade-school-math, anthropics/hh-rlhf, tatsu-lab/stanford_alpaca), or one
  data file from it (``alpaca_data.json``, ``seed_tasks.jsonl``, an HH-RLHF ``*.jsonl.gz``).

Rows keep their source's own columns (GSM8K ``question``/``answer``, HH-RLHF ``chosen``/``rejected`` transcripts,
Alpaca ``instruction``/``input``/``output``), which the pipeline reads as published (README, "Recipes on real
data"), so the offline recipes read the same rows as their Hub variants. Each output file is a seeded random
sample, disjoint from the others; the same source and seed give byte-identical files (gzip without a timestamp).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]

# Per dataset: output file -> (source split, rows). HH-RLHF's only split kept in git (the others are Git LFS objects)
# is harmless-base's test set, so the offline sample draws all three files from it, disjointly.
PLANS: dict[str, dict[str, tuple[str, int]]] = {
    "gsm8k": {"train.jsonl": ("train", 300), "test.jsonl": ("test", 100)},
    "hh-rlhf": {"train.jsonl.gz": ("test", 600), "judge.jsonl.gz": ("test", 400), "test.jsonl.gz": ("test", 200)},
    "alpaca": {"train.jsonl": ("train", 150), "eval.jsonl": ("train", 25)},
}
HUB = {"gsm8k": ("openai/gsm8k", {"name": "main"}), "hh-rlhf": ("Anthropic/hh-rlhf", {"data_dir": "harmless-base"}),
       "alpaca": ("tatsu-lab/alpaca", {})}
COLUMNS = {"gsm8k": ("question", "answer"), "hh-rlhf": ("chosen", "rejected"), "alpaca": ("instruction", "input", "output")}


def read_rows(path: Path) -> list[Row]:
    """A JSONL file (gzipped or not) or a JSON list of objects."""
    opened = gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")
    with opened as f:
        if path.name.removesuffix(".gz").endswith(".json"):
            return json.load(f)
        return [json.loads(line) for line in f if line.strip()]


def flatten_instances(rows: list[Row]) -> list[Row]:
    """Self-Instruct seed tasks (``instruction`` and ``instances``) as Alpaca rows, one per instance."""
    return [{"instruction": row["instruction"], "input": inst.get("input", ""), "output": inst["output"]}
            for row in rows for inst in row.get("instances", [row])]


def local_splits(dataset: str, source: Path) -> dict[str, list[Row]]:
    """The source splits of a local copy of the public repository (or one of its data files)."""
    if source.is_file():
        rows = read_rows(source)
        return {split: rows for split, _ in PLANS[dataset].values()}
    if dataset == "gsm8k":
        return {split: read_rows(source / "grade_school_math" / "data" / f"{split}.jsonl") for split in ("train", "test")}
    if dataset == "hh-rlhf":
        return {"test": read_rows(source / "harmless-base" / "test.jsonl.gz")}
    data = source / "alpaca_data.json"
    return {"train": read_rows(data if data.is_file() else source / "seed_tasks.jsonl")}


def hub_splits(dataset: str) -> dict[str, list[Row]]:
    from datasets import load_dataset  # lazy: only the `hub` source needs it

    name, kwargs = HUB[dataset]
    loaded = load_dataset(name, **kwargs)
    return {split: loaded[split].to_list() for split in loaded}


def sample(splits: dict[str, list[Row]], plan: dict[str, tuple[str, int]], columns: tuple[str, ...],
           seed: int) -> dict[str, list[Row]]:
    """Each output file's rows: a seeded shuffle of its source split, cut into disjoint slices in plan order."""
    shuffled = {split: random.Random(f"{seed}:{split}").sample(rows, len(rows)) for split, rows in splits.items()}
    taken = dict.fromkeys(splits, 0)
    out = {}
    for name, (split, count) in plan.items():
        rows = shuffled[split][taken[split]:taken[split] + count]
        if len(rows) < count:
            raise SystemExit(f"{name}: the {split} split has {len(shuffled[split])} rows, too few for the sample")
        taken[split] += count
        out[name] = [{c: row.get(c) or "" for c in columns} for row in rows]
    return out


def write(path: Path, rows: list[Row]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    if path.suffix == ".gz":  # no name or time in the header: the same rows give the same bytes
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as f:
            f.write(text)
        text = buffer.getvalue()
    path.write_bytes(text)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python examples/realdata/prepare.py", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(PLANS))
    parser.add_argument("source", help="`hub`, a local copy of the public repository, or one of its data files")
    parser.add_argument("--out", type=Path, help="default: data/DATASET")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="*", default=[], metavar="FILE=N", help="rows of an output file, e.g. train.jsonl=500")
    args = parser.parse_args(argv)
    plan = dict(PLANS[args.dataset])
    for item in args.rows:
        name, _, count = item.partition("=")
        if name not in plan or not count.isdigit():
            parser.error(f"--rows {item}: expected FILE=N with FILE one of {', '.join(plan)}")
        plan[name] = (plan[name][0], int(count))
    splits = hub_splits(args.dataset) if args.source == "hub" else local_splits(args.dataset, Path(args.source))
    if args.dataset == "alpaca":
        splits = {split: flatten_instances(rows) if rows and "instances" in rows[0] else rows
                  for split, rows in splits.items()}
    out = args.out or Path("data") / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in sample(splits, plan, COLUMNS[args.dataset], args.seed).items():
        write(out / name, rows)
        print(f"{out / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
