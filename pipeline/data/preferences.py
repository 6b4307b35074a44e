"""Preference data in the forms users have it, converted to TRL's pairwise `prompt`/`chosen`/`rejected`.

Accepted forms (see `PREFERENCE_FORMATS`):

- pairwise: `chosen`, `rejected` and optionally `prompt`. Without a prompt, HH-RLHF transcripts
  ("\\n\\nHuman: ...\\n\\nAssistant: ...") are parsed into messages, message lists are split at their
  longest common prefix, and other plain strings get an empty prompt and stay whole.
- pointwise: `prompt`, `response`, `score`; every two responses to one prompt with different scores
  make a pair.
- listwise: `prompt`, `responses` and optionally `scores`; without scores the responses are best first.

Prompts and responses may be strings or message lists. If any value in a pair is a message list, plain
strings in it become single messages: TRL treats a string prompt next to conversational completions as
missing and re-extracts it, silently discarding the given one.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, Callable, Iterable

from accelerate import PartialState
from datasets import Dataset

from pipeline.data.loading import DataError

PREFERENCE_FORMATS: dict[str, tuple[str, ...]] = {
    "pairwise": ("chosen", "rejected"),
    "pointwise": ("prompt", "response", "score"),
    "listwise": ("prompt", "responses"),
}
_OPTIONAL = {"pairwise": "prompt", "listwise": "scores"}

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}

Pair = dict[str, Any]


def detect_preference_format(column_names: Iterable[str], where: str = "preference data") -> str:
    """Name of the first format in `PREFERENCE_FORMATS` whose required columns are all present."""
    columns = list(column_names)
    for name, required in PREFERENCE_FORMATS.items():
        if all(c in columns for c in required):
            return name
    options = "; ".join(f"{name}: {', '.join(required)}"
                        + (f" (optional {_OPTIONAL[name]})" if name in _OPTIONAL else "")
                        for name, required in PREFERENCE_FORMATS.items())
    raise DataError(f"{where}: dataset has columns {columns}; expected one of these preference formats: {options}")


def pairwise_splits(splits: tuple[Dataset, Dataset], where: str) -> tuple[Dataset, Dataset]:
    """A (train, held-out) split as pairs (`to_pairwise`). Only the training side must hold a preference: a few
    tied pairs in the data may all fall into a small held-out split."""
    train, held_out = splits
    return (to_pairwise(train, where) if len(train) else train,
            to_pairwise(held_out, f"{where} (held-out split)", all_tied_ok=True) if len(held_out) else held_out)


def to_pairwise(dataset: Dataset, where: str, row_label: Callable[[int], str] | None = None, *,
                all_tied_ok: bool = False) -> Dataset:
    """`dataset` in any accepted preference format as exactly the columns `prompt`, `chosen`, `rejected`.

    `row_label(i)` names row i in messages (preflight passes the file's line numbers); default `WHERE: row i`.
    Pairs whose chosen equals rejected are an error when they are all there is, unless `all_tied_ok`.
    """
    form = detect_preference_format(dataset.column_names, where)
    label = row_label or (lambda row: f"{where}: row {row}")
    convert = {"pairwise": _from_pairwise, "pointwise": _from_pointwise, "listwise": _from_listwise}[form]
    pairs = convert(dataset, where, label)
    if not pairs:
        hint = "" if form == "pairwise" else "; a prompt needs two responses with different scores to make a pair"
        raise DataError(f"{where}: no preference pairs from {len(dataset)} {form} row(s){hint}")
    if not all_tied_ok and all(pair["chosen"] == pair["rejected"] for pair in pairs):  # every gradient: zero
        raise DataError(f"{where}: in all {len(pairs)} pairs 'chosen' equals 'rejected', so there is no "
                        "preference to learn; check the columns")
    return Dataset.from_list(pairs)


def _values(dataset: Dataset, column: str, label: Callable[[int], str]) -> list[Any]:
    """A column's values, each checked to be a string or a list of {role, content} messages."""
    values = list(dataset[column])
    for row, value in enumerate(values):
        _check_value(value, f"{label(row)}: column '{column}'")
    return values


def _check_value(value: Any, what: str) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return
    raise DataError(f"{what}: expected a string or a list of {{role, content}} messages, got {value!r:.80}")


def _harmonize(prompt: Any, chosen: Any, rejected: Any) -> Pair:
    """One pair, with plain strings turned into messages when any of the three is a message list."""
    if not any(isinstance(v, list) for v in (prompt, chosen, rejected)):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    def as_messages(value: Any, role: str) -> list[dict[str, Any]]:
        return [{"role": role, "content": value}] if isinstance(value, str) else value

    prompt, chosen, rejected = as_messages(prompt, "user"), as_messages(chosen, "assistant"), as_messages(rejected, "assistant")
    if chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt and len(chosen) > len(prompt) < len(rejected):
        # whole conversations beside their prompt (both layouts are common): the prompt is not said twice
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _score(value: Any, what: str) -> float:
    # bool is an int subclass, but True/False scores are almost certainly a wrong column
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise DataError(f"{what}: expected a number, got {value!r}")
    return float(value)


def _ranked_pairs(prompt: Any, responses: list[Any], scores: list[float] | None) -> list[Pair]:
    """Every (better, worse) pair of `responses`: by score descending, ties skipped; else in the given order."""
    order = list(range(len(responses)))
    if scores is not None:
        order.sort(key=lambda i: -scores[i])  # stable: equal scores keep their input order
    return [_harmonize(prompt, responses[i], responses[j])
            for a, i in enumerate(order) for j in order[a + 1:]
            if scores is None or scores[i] > scores[j]]


def _from_pointwise(dataset: Dataset, where: str, label: Callable[[int], str]) -> list[Pair]:
    prompts = _values(dataset, "prompt", label)
    responses = _values(dataset, "response", label)
    scores = [_score(s, f"{label(row)}: column 'score'") for row, s in enumerate(dataset["score"])]
    # Group by a canonical JSON key so message-list prompts group too; dicts keep first-seen order
    groups: dict[str, tuple[Any, list[Any], list[float]]] = {}
    for prompt, response, score in zip(prompts, responses, scores):
        group = groups.setdefault(json.dumps(prompt, sort_keys=True), (prompt, [], []))
        group[1].append(response)
        group[2].append(score)
    return [pair for prompt, rs, ss in groups.values() for pair in _ranked_pairs(prompt, rs, ss)]


def _from_listwise(dataset: Dataset, where: str, label: Callable[[int], str]) -> list[Pair]:
    prompts = _values(dataset, "prompt", label)
    all_scores = list(dataset["scores"]) if "scores" in dataset.column_names else [None] * len(prompts)
    pairs = []
    for row, (prompt, responses, scores) in enumerate(zip(prompts, dataset["responses"], all_scores)):
        what = label(row)
        if not isinstance(responses, list):
            raise DataError(f"{what}: column 'responses' must be a list, got {responses!r:.80}")
        for response in responses:
            _check_value(response, f"{what}: column 'responses'")
        if scores is not None:  # a null in a `scores` column means this row is ordered best first
            if not isinstance(scores, list) or len(scores) != len(responses):
                raise DataError(f"{what}: column 'scores' must be a list of {len(responses)} numbers "
                                f"(one per response), got {scores!r:.80}")
            scores = [_score(s, f"{what}: column 'scores'") for s in scores]
        pairs.extend(_ranked_pairs(prompt, responses, scores))
    return pairs


def _from_pairwise(dataset: Dataset, where: str, label: Callable[[int], str]) -> list[Pair]:
    chosen = _values(dataset, "chosen", label)
    rejected = _values(dataset, "rejected", label)
    if "prompt" in dataset.column_names:
        return [_harmonize(p, c, r) for p, c, r in zip(_values(dataset, "prompt", label), chosen, rejected)]
    # Majority vote, so a few malformed transcripts are dropped rather than the whole set read as plain text
    if sum(isinstance(c, str) and isinstance(r, str) and looks_like_transcript(c)
           for c, r in zip(chosen, rejected)) * 2 > len(chosen):
        return _from_transcripts(chosen, rejected, where)
    return [_split_messages(c, r, label(row)) if isinstance(c, list) or isinstance(r, list)
            else {"prompt": "", "chosen": c, "rejected": r}  # TRL reads an empty prompt as "none"
            for row, (c, r) in enumerate(zip(chosen, rejected))]


def _common_prefix_len(a: list[Any], b: list[Any]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_messages(chosen: Any, rejected: Any, what: str) -> Pair:
    """The shared leading messages up to the last shared user turn as the prompt (it must end on a turn to reply
    to; conversations that diverge earlier keep their differing turns in the completions, as HH-RLHF transcripts
    do), the rest as the completions."""
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise DataError(f"{what}: 'chosen' and 'rejected' must both be strings or both be message lists")
    shared = _common_prefix_len(chosen, rejected)
    while shared and shared < min(len(chosen), len(rejected)) and chosen[shared - 1].get("role") == "assistant":
        shared -= 1
    # TRL cannot handle an empty conversational prompt, and an empty completion is no preference
    if shared == 0:
        raise DataError(f"{what}: 'chosen' and 'rejected' share no leading messages to use as the prompt; "
                        "add a 'prompt' column")
    if shared == len(chosen) or shared == len(rejected):
        raise DataError(f"{what}: nothing is left of 'chosen' or 'rejected' after their shared prompt "
                        f"({shared} message(s))")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


class UnusableTranscript(Exception):
    """An HH-RLHF transcript (or pair) that cannot be converted; the message is the reason."""


def looks_like_transcript(text: str) -> bool:
    return "\n\nHuman:" in text and "\n\nAssistant:" in text


def parse_transcript(text: str) -> list[dict[str, str]]:
    """HH-RLHF's "\\n\\nHuman: ...\\n\\nAssistant: ..." as {role, content} messages; `UnusableTranscript` if it is not one."""
    head, *turns = _TURN.split(text)
    if head.strip() or not turns:
        raise UnusableTranscript("not a Human/Assistant transcript")
    return [{"role": _ROLES[speaker], "content": content.strip()}
            for speaker, content in zip(turns[::2], turns[1::2])]


def _transcript_pair(chosen: str, rejected: str) -> Pair:
    """Shared turns up to the last shared user turn as the prompt; the rest of each transcript as its completion."""
    a, b = parse_transcript(chosen), parse_transcript(rejected)
    if a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
        raise UnusableTranscript("no final assistant reply")
    if not a[-1]["content"] or not b[-1]["content"]:
        raise UnusableTranscript("empty final assistant reply")
    # Usually everything but the final reply is shared; when the transcripts diverge earlier, the
    # differing turns stay in the completions. The prompt must end on a user turn to be generated from.
    shared = _common_prefix_len(a[:-1], b[:-1])
    while shared and a[shared - 1]["role"] != "user":
        shared -= 1
    if not shared:
        raise UnusableTranscript("no shared user turn")
    return {"prompt": a[:shared], "chosen": a[shared:], "rejected": b[shared:]}


def _from_transcripts(chosen: list[str], rejected: list[str], where: str) -> list[Pair]:
    return usable_transcripts(list(zip(chosen, rejected)), lambda pair: _transcript_pair(*pair), where,
                              "HH-RLHF transcript pairs")


def usable_transcripts(items: list[Any], convert: Callable[[Any], Any], where: str, what: str) -> list[Any]:
    """`convert` of every item it can use; the rest (`UnusableTranscript`) dropped and counted by reason, and a
    DataError if none is left."""
    converted, dropped = [], Counter()
    for item in items:
        try:
            converted.append(convert(item))
        except UnusableTranscript as reason:
            dropped[str(reason)] += 1
    reasons = ", ".join(f"{reason}: {n}" for reason, n in dropped.most_common())
    if not converted:
        raise DataError(f"{where}: none of the {len(items)} {what} could be used ({reasons})")
    if dropped:
        PartialState().print(f"{where}: hh-rlhf: dropped {dropped.total()} of {len(items)} {what} ({reasons})")
    return converted
