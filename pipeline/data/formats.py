"""Public datasets' own row formats as the columns a stage reads, so that a recipe names them as published.

- HH-RLHF transcripts (`chosen`, a whole "\\n\\nHuman: ...\\n\\nAssistant: ..." conversation): `sft_messages` makes
  each chosen transcript one `messages` row (SFT on the chosen replies); `as_prompts` makes the turns before its
  final reply the `prompt` and that reply the `completion` (RL prompts; eval prompts with a reference reply).
- Alpaca rows (`instruction`, optional `input`, `output`): `as_prompts` makes the request the `prompt` (written
  as the `sft` stage writes it for a chat model's user turn, or, for a model that takes plain text, through the
  templates its SFT rendered the rows with, as its tokenizer records them) and the output the `completion`.

GSM8K needs nothing here: `columns: {question: prompt}` renames its question, and `pipeline.data.answers` reads its
`answer` column (a worked solution ending in `#### 72`) by the final answer.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from datasets import Dataset

from pipeline.config.specs import DERIVED_PROMPT_FORMATS, PROMPT_FORMATS
from pipeline.data.loading import require_columns
from pipeline.data.preferences import UnusableTranscript, parse_transcript, usable_transcripts
from pipeline.data.prompts import alpaca_templates

Messages = list[dict[str, str]]


ALPACA_TEMPLATES = (  # (with an input, without one): Stanford Alpaca's prompts
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n",
)


def alpaca_request(instruction: str, extra: str | None) -> str:
    """An Alpaca row's request as one user turn: the instruction, then its input where it has one."""
    extra = (extra or "").strip()
    return instruction.strip() + (f"\n\n{extra}" if extra else "")


def alpaca_prompt(instruction: str, extra: str | None, templates: tuple[str, str] | None) -> str:
    """An Alpaca row's prompt: through `templates` (with an input, without one), or as the bare request."""
    extra = (extra or "").strip()
    if templates is None:
        return alpaca_request(instruction, extra)
    return (templates[0] if extra else templates[1]).format(instruction=instruction.strip(), input=extra)


def final_reply_split(text: Any) -> tuple[Messages, Messages]:
    """(the turns before the final assistant reply, that reply) of one transcript; `UnusableTranscript` if none."""
    if not isinstance(text, str):
        raise UnusableTranscript("not a Human/Assistant transcript")
    messages = parse_transcript(text)
    if messages[-1]["role"] != "assistant":
        raise UnusableTranscript("no final assistant reply")
    if not messages[-1]["content"]:
        raise UnusableTranscript("empty final assistant reply")
    if len(messages) < 2:
        raise UnusableTranscript("no user turn before the reply")
    return messages[:-1], messages[-1:]


def _from_transcripts(dataset: Dataset, where: str, row: Callable[[Messages, Messages], dict[str, Any]]) -> Dataset:
    """One row per usable `chosen` transcript, made by `row(prompt, reply)`; the rest dropped, and counted."""
    rows = usable_transcripts(list(dataset["chosen"]), lambda text: row(*final_reply_split(text)), where,
                              "HH-RLHF transcripts in 'chosen'")
    return Dataset.from_list(rows)


def sft_messages(dataset: Dataset, where: str) -> Dataset:
    """HH-RLHF rows as `messages` rows: each chosen transcript whole, its final assistant reply the one trained on."""
    return _from_transcripts(dataset, where, lambda prompt, reply: {"messages": prompt + reply})


def as_prompts(dataset: Dataset, where: str, tokenizer=None) -> Dataset:
    """Rows with a `prompt` as they are; HH-RLHF transcripts and Alpaca rows as `prompt` and `completion` rows,
    Alpaca prompts as `tokenizer`'s model was trained on them (`alpaca_templates`; without one, the request)."""
    formats = PROMPT_FORMATS | DERIVED_PROMPT_FORMATS
    data_format = require_columns(dataset, formats, where)
    if data_format in PROMPT_FORMATS:
        return dataset
    if data_format == "hh-rlhf transcripts":
        return _from_transcripts(dataset, where, lambda prompt, reply: {"prompt": prompt, "completion": reply})
    inputs = dataset["input"] if "input" in dataset.column_names else [None] * len(dataset)
    templates = alpaca_templates(tokenizer) if tokenizer is not None else None
    return Dataset.from_dict({"prompt": [alpaca_prompt(i, x, templates) for i, x in zip(dataset["instruction"], inputs)],
                              "completion": list(dataset["output"])})


def tool_conversations(dataset: Dataset, tools: list[dict[str, Any]]) -> Dataset:
    """`messages` rows that call tools, kept whole (every assistant turn is trained on; the rest is masked by TRL's
    `assistant_only_loss`). Each call's `arguments` become a JSON string without null keys: Arrow stores the rows'
    arguments as one struct, so a row calling `add(a, b)` beside one calling `lookup(word)` would otherwise render
    `{"a": 1, "b": 2, "word": null}`. `tools` (JSON schemas) fill a `tools` column, as JSON, where a row has none."""
    def tidy(row: dict[str, Any]) -> dict[str, Any]:
        messages = []
        for message in row["messages"]:
            calls = []
            for call in message.get("tool_calls") or []:
                function = dict(call.get("function") or call)
                arguments = function.get("arguments")
                if isinstance(arguments, dict):
                    function["arguments"] = json.dumps({k: v for k, v in arguments.items() if v is not None})
                calls.append({"type": "function", "function": {"name": function["name"], "arguments": function["arguments"]}})
            messages.append({k: v for k, v in message.items() if v is not None and k != "tool_calls"}
                            | ({"tool_calls": calls} if calls else {}))
        given = row.get("tools")
        return {"messages": messages,
                "tools": given if isinstance(given, str) else json.dumps(given if given is not None else tools)}
    return dataset.map(tidy, remove_columns=dataset.column_names)
