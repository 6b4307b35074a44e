"""Generating with tools: a model answers, calls tools, reads their answers and goes on, up to a number of calls.

The loop TRL's GRPOTrainer runs while it trains (its `_tool_call_loop`), for greedy evaluation: each reply is read
with the tokenizer's response template through `trl.chat_template_utils.parse_response` (as in training), each
call runs through a guarded tool (`pipeline.models.tools`: an error, a hang or a non-text answer becomes an error
message for the model), and the conversation goes on with the tools' answers until the model replies without a
call or has made `max_calls` rounds of calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from trl.chat_template_utils import parse_response

from pipeline.models.chat_templates import read_tool_calls
from pipeline.models.decoding import completion_text, generate_ids


@dataclass
class ToolRun:
    """One prompt's conversation with its tools, and what went wrong in it."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # the assistant's and the tools' turns
    calls: int = 0
    malformed: int = 0  # replies with a call the response template could not read, or naming no known tool
    errors: int = 0  # calls whose tool answered with an error

    @property
    def response(self) -> str:
        """What the model wrote (its turns, not the tools'): what answers are read from."""
        return completion_text(self.messages)


def unreadable(tokenizer, prompt_ids: list[int], reply_ids: list[int]) -> bool:
    """Whether the reply's tool calls cannot be read: TRL's `parse_response` then falls back to plain text."""
    try:
        tokenizer.parse_response(tokenizer.decode(reply_ids), prefix=tokenizer.decode(prompt_ids))
    except Exception:  # the parser's own error: a call whose JSON does not parse, an unclosed tag
        return True
    return False


def call_tools(run: ToolRun, calls: list[dict[str, Any]], tools: dict[str, Callable[..., str]]) -> None:
    """Run each call (through its guarded tool, which always answers text) and add the answers to the run."""
    for call in calls:
        function = call.get("function") or {}
        name, arguments = function.get("name"), function.get("arguments")
        tool = tools.get(name)
        run.calls += 1
        if tool is None or not isinstance(arguments, dict):
            run.malformed += 1
            answer = f"error: no tool named {name!r}" if tool is None else "error: the arguments are not a mapping"
        else:
            answer = tool(**arguments)
            run.errors += answer.startswith("error: ")  # raised, hung or answered no text (see `guarded`)
        run.messages.append({"role": "tool", "name": name, "content": answer})


def generate_with_tools(model, tokenizer, prompts: list[Any], tools: list[list[Callable[..., str]]], *,
                        max_new_tokens: int, max_calls: int, batch_size: int = 64) -> list[ToolRun]:
    """Greedy conversations, one per prompt, each with its own `tools` (guarded functions; an environment's methods
    differ per prompt): see the module docstring."""
    read_tool_calls(tokenizer)
    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    by_name = [{tool.__name__: tool for tool in own} for own in tools]
    runs = [ToolRun() for _ in prompts]
    active = list(range(len(prompts)))
    for round_ in range(max_calls + 1):
        if not active:
            break
        pairs = generate_ids(model, tokenizer, [conversations[i] + runs[i].messages for i in active],
                             tools=[tools[i] for i in active], max_new_tokens=max_new_tokens, batch_size=batch_size)
        calling = []
        for i, (prompt_ids, reply_ids) in zip(active, pairs):
            reply = parse_response(tokenizer, reply_ids, prefix=prompt_ids, tools=tools[i])
            calls = reply.get("tool_calls") or []
            runs[i].malformed += not calls and unreadable(tokenizer, prompt_ids, reply_ids)
            runs[i].messages.append({"role": "assistant", "content": reply.get("content") or ""}
                                    | ({"tool_calls": calls} if calls else {}))
            if calls and round_ < max_calls:
                call_tools(runs[i], calls, by_name[i])
                calling.append(i)
        active = calling
    return runs
