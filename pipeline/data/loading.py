"""Reading datasets: local JSONL/JSON/Parquet/CSV or Hub ids, renames, mixtures, held-out splits.

Local JSONL is read by `datasets`; a file it cannot read is parsed again here, so that a malformed line
is reported with its file and line number before any training starts.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from accelerate import PartialState
from datasets import Dataset, concatenate_datasets, load_dataset
from datasets.exceptions import DatasetGenerationError
from datasets.utils import logging

from pipeline.config.paths import resolve_local
from pipeline.config.specs import DatasetSpec, RewardTermSpec, SourceSpec
from pipeline.runtime.process import UserError


class DataError(UserError, ValueError):
    """A dataset that cannot be used as given: the message says where and why."""


def _open_text(path: Path):
    """utf-8-sig: a byte-order mark (as Windows editors write) is skipped, not read as part of the first row."""
    return gzip.open(path, "rt", encoding="utf-8-sig") if path.suffix == ".gz" else path.open(encoding="utf-8-sig")


def jsonl_lines(path: Path) -> list[int]:
    """The file line number of each row `read_jsonl` returns (blank lines hold no row), for messages."""
    with _open_text(path) as f:
        return [number for number, line in enumerate(f, start=1) if line.strip()]


def row_numbers(path: Path, rows: int) -> tuple[str, list[int]]:
    """How a user finds each row of a local file: ("line", file line numbers) for JSONL, else ("row", 1..n)."""
    if path.name.removesuffix(".gz").endswith(".jsonl"):
        return "line", jsonl_lines(path)
    return "row", list(range(1, rows + 1))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                # Without its newline: an error at the end of the line is then reported at its own column,
                # not as "column 1" of the line after.
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _kind(value: Any) -> str | None:
    """A JSON value's kind as a table column sees it (a list by its items' kind); None for null or []."""
    if value is None or value == []:
        return None  # fits any column
    if isinstance(value, list):
        items = {_kind(v) for v in value} - {None}
        return f"a list of {items.pop().removeprefix('a ').removeprefix('an ')}s" if len(items) == 1 else "a mixed list"
    return {dict: "an object", str: "a string", bool: "true/false"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def mixed_column(rows: list[dict[str, Any]]) -> tuple[str, int, str, str] | None:
    """(column, first row index, its kind, the column's usual kind) for a column whose values are of different
    JSON kinds (a table column has one type), or None."""
    kinds: dict[str, dict[str, list[int]]] = {}
    for index, row in enumerate(rows):
        for column, value in row.items():
            if _kind(value) is not None:
                kinds.setdefault(column, {}).setdefault(_kind(value), []).append(index)
    for column, by_kind in kinds.items():
        if len(by_kind) > 1:
            usual = max(by_kind, key=lambda k: len(by_kind[k]))
            odd = min((k for k in by_kind if k != usual), key=lambda k: by_kind[k][0])
            return column, by_kind[odd][0], odd, usual
    return None


def from_json_lines(path: Path) -> Dataset | None:
    """A JSONL file read by `datasets` (pyarrow's parser), or None where it fails: a malformed line, a column
    of mixed kinds, a key first seen after the first 10 MB chunk, no rows.

    Measured on a 21 MB, 150k-row chat file: 0.33 s and +95 MB peak memory on the first read, 0.05 s once
    cached (as when a stage reads what the pre-run check read); parsed by hand, 1.5 s and +260 MB every time.
    The cost is the cache: an Arrow copy of each version of the file (11 MB here) in HF_DATASETS_CACHE, as
    for parquet, CSV and Hub data.
    """

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)  # its error log names no line: `read_local` then says which one
    try:
        # on_mixed_types=None: a column of mixed kinds is an error, not an untyped `Json` column that fails later
        # elsewhere (and message dicts with different keys get one struct type, as `Dataset.from_list` gives).
        # keep_in_memory: in memory as before, so trainers' `map`s write no cache files.
        return load_dataset("json", data_files=str(path), split="train", on_mixed_types=None, keep_in_memory=True)
    except (DatasetGenerationError, ValueError):
        return None
    finally:
        logging.set_verbosity(verbosity)


def read_local(path: Path) -> Dataset:
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        with _open_text(path) as f:
            if f.read(4096).lstrip().startswith("["):  # `datasets` would read it, and line numbers would be wrong
                raise DataError(f"{path}: holds a JSON array, not one JSON object per line; name it .json")
        dataset = from_json_lines(path)
        if dataset is not None:
            return dataset
        rows = read_jsonl(path)
        try:
            return Dataset.from_list(rows)
        except (ValueError, TypeError) as err:  # pyarrow's ArrowInvalid/ArrowTypeError: a column of mixed types
            mixed = mixed_column(rows)
            if mixed is None:
                raise DataError(f"{path}: cannot be read as a table: {err}") from None
            column, index, kind, usual = mixed
            raise DataError(f"{path} line {jsonl_lines(path)[index]}: column '{column}' is {kind} where other rows "
                            f"have {usual}; a column holds one kind of value") from None
    if name.endswith(".json"):
        with _open_text(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {err.lineno}: invalid JSON: {err.msg}") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]} wrappers are common
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a list of JSON objects")
        return Dataset.from_list(data)
    if name.endswith((".parquet", ".csv")):
        kind = "parquet" if name.endswith(".parquet") else "csv"
        return load_dataset(kind, data_files=str(path), split="train")
    raise DataError(f"{path}: unsupported file type (use .jsonl, .json, .parquet or .csv)")


def load_source(source: SourceSpec, *, recipe_path: Path | None,
                stage_outputs: Callable[[str], Path | None] = lambda _: None) -> Dataset:
    """One source as a Dataset: a stage's generated data, a local file, or a Hub dataset."""
    produced = stage_outputs(source.path)
    local = produced or resolve_local(source.path, recipe_path)
    if local is not None:
        if source.split != "train":  # a local file is one table: `datasets` names it "train"
            raise DataError(f"{source.path}: `split: {source.split}` names a split of a Hub dataset; a local file is "
                            "read whole (take rows with `max_samples`, or give the split's own file)")
        if local.is_dir():
            local = local / "data.jsonl"
        dataset = read_local(local)
    else:
        dataset = load_dataset(source.path, source.name, split=source.split, data_dir=source.data_dir)
    if len(dataset) == 0:
        raise DataError(f"{source.path}: empty dataset")
    missing = [old for old in source.columns if old not in dataset.column_names]
    if missing:
        raise DataError(f"{source.path}: cannot rename missing column(s) {missing}; "
                        f"columns are {dataset.column_names}")
    clash = [new for old, new in source.columns.items() if new in dataset.column_names and new not in source.columns]
    if clash:
        raise DataError(f"{source.path}: renaming to {clash} would give two columns of that name; rename the "
                        "existing one too (columns: {old: new, ...}) or drop it from the data")
    if source.columns:
        dataset = dataset.rename_columns(source.columns)
    if source.max_samples is not None:
        dataset = dataset.select(range(min(source.max_samples, len(dataset))))
    return dataset


SOURCE_COLUMN = "__source"


def _take_fraction(dataset: Dataset, weight: float, seed: int) -> Dataset:
    """`weight` of the rows: a shuffled subset below 1, whole repeats plus a subset above."""
    if weight == 1.0:
        return dataset
    count = math.ceil(len(dataset) * weight)
    repeats, rest = divmod(count, len(dataset))
    parts = [dataset] * repeats + [dataset.shuffle(seed=seed).select(range(rest))]
    return concatenate_datasets(parts)


def load_mixture(spec: DatasetSpec, *, seed: int, recipe_path: Path | None,
                 stage_outputs: Callable[[str], Path | None] = lambda _: None, tagged: bool = False) -> Dataset:
    """All rows of a dataset spec's weighted mixture of sources, unsplit (what `eval` and `generate` read);
    `tagged`: with each row's source index in SOURCE_COLUMN."""
    parts = []
    for index, source in enumerate(spec.sources):
        dataset = _take_fraction(load_source(source, recipe_path=recipe_path, stage_outputs=stage_outputs),
                                 source.weight, seed)
        parts.append(dataset.add_column(SOURCE_COLUMN, [index] * len(dataset)) if tagged else dataset)
    columns = [sorted(p.column_names) for p in parts]
    if any(c != columns[0] for c in columns):
        listing = "; ".join(f"{s.path}: {c}" for s, c in zip(spec.sources, columns))
        raise DataError(f"mixture sources have different columns ({listing}); rename columns so they match")
    try:
        return concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    except ValueError as err:
        raise DataError(f"mixture {[s.path for s in spec.sources]}: column types differ ({err})") from None


def load_splits(spec: DatasetSpec, *, seed: int, recipe_path: Path | None,
                stage_outputs: Callable[[str], Path | None] = lambda _: None) -> tuple[Dataset, Dataset]:
    """(train, held-out) for a dataset spec: mixture of sources, then a seeded split or the `eval` source;
    the held-out rows cut to `eval_samples` (none with 0, when every row trains).

    A split holds out no row that also trains: a source upweighted past 1 is split before its rows repeat, and
    a held-out row equal to a training row (data with duplicates) is left out, with a line saying how many.
    """
    if spec.eval_samples == 0:
        train = load_mixture(spec, seed=seed, recipe_path=recipe_path, stage_outputs=stage_outputs)
        return train.shuffle(seed=seed), train.select([])
    if spec.eval is not None:
        train = load_mixture(spec, seed=seed, recipe_path=recipe_path, stage_outputs=stage_outputs)
        held_out = load_source(spec.eval, recipe_path=recipe_path, stage_outputs=stage_outputs)
        train = train.shuffle(seed=seed)
    else:
        repeats = [max(source.weight, 1.0) for source in spec.sources]  # applied to the training side alone
        once = replace(spec, sources=[replace(s, weight=min(s.weight, 1.0)) for s in spec.sources])
        mixture = load_mixture(once, seed=seed, recipe_path=recipe_path, stage_outputs=stage_outputs, tagged=True)
        test_size = int(spec.test_size) if spec.test_size >= 1 else spec.test_size
        if len(mixture) < 2:
            raise DataError(f"{spec.sources[0].path}: {len(mixture)} row(s) is too few to hold out a split")
        split = mixture.train_test_split(test_size=test_size, seed=seed)
        train, held_out = split["train"], split["test"].remove_columns(SOURCE_COLUMN)
        if any(r > 1.0 for r in repeats):
            train = concatenate_datasets([_take_fraction(train.filter(lambda row, i=i: row[SOURCE_COLUMN] == i), r, seed)
                                          for i, r in enumerate(repeats)])
        train = train.remove_columns(SOURCE_COLUMN)
        held_out = _unseen(held_out, train, spec.sources[0].path)
    if spec.eval_samples is not None and spec.eval_samples < len(held_out):
        held_out = held_out.select(range(spec.eval_samples))
    return train, held_out


def _unseen(held_out: Dataset, train: Dataset, where: str) -> Dataset:
    """The held-out rows that no training row equals (a duplicated row split to both sides measures memory)."""
    def key(row: dict[str, Any]) -> str:
        return json.dumps(row, sort_keys=True, default=str)
    seen = {key(row) for row in train}
    keep = [i for i, row in enumerate(held_out) if key(row) not in seen]
    if len(keep) < len(held_out):
        PartialState().print(f"{where}: {len(held_out) - len(keep)} of {len(held_out)} held-out rows equal a "
                             f"training row (duplicates in the data) and are left out of the held-out split",
                             flush=True)
    return held_out.select(keep)


def require_reward_columns(terms: list[RewardTermSpec], columns: list[str], where: str) -> None:
    """A DataError where a reward term reads a column the rows lack (the `exact_match` reward's `answer`)."""
    for term in terms:
        missing = [c for c in term.columns if c not in columns]
        if missing:
            raise DataError(f"{where}: the {term.function} reward needs column(s) {missing}; columns are {columns}")


def require_columns(dataset: Dataset, formats: dict[str, tuple[str, ...]], where: str) -> str:
    """Name of the first format whose columns the dataset has; a DataError listing the options otherwise."""
    for name, columns in formats.items():
        if all(c in dataset.column_names for c in columns):
            return name
    options = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in formats.items())
    raise DataError(f"{where}: dataset has columns {dataset.column_names}; expected one of these formats: {options}")
