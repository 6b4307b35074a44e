"""Tools a policy may call while it generates: user functions, loaded by reference and made safe to call.

A tool is user code. Each call runs in a thread of its own with a time limit; a tool that raises, does not answer
in time, or returns something that is not text (a string, a number, or JSON-serialisable lists and mappings) gives
the model an `error: ...` message as the tool's answer instead, is counted in `ToolStats`, and never stops the
stage. A hung call's thread is left behind as a daemon (Python cannot stop a thread), so it does not hold the
process open at exit.

The wrapper keeps the function's name, signature, type hints and docstring, which is what TRL and transformers read
to describe the tool to the model (`transformers.utils.get_json_schema`; `tool_problems` checks each can be).
`renders_tools` checks that a chat template shows a model its tools, and `has_tool_turns` finds rows that use them.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.config.paths import callable_problems, import_object


@dataclass
class ToolStats:
    """What the tools did during a stage: calls, and the calls that gave the model an error instead."""

    calls: int = 0
    errors: int = 0  # the tool raised
    timeouts: int = 0  # no answer within the time limit
    not_text: int = 0  # an answer that is not text
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # calls may come from several threads

    def count(self, outcome: str | None = None) -> None:
        with self.lock:
            self.calls += 1
            if outcome is not None:
                setattr(self, outcome, getattr(self, outcome) + 1)

    def metrics(self) -> dict[str, float]:
        return {"tool_calls": float(self.calls), "tool_errors": float(self.errors), "tool_timeouts": float(self.timeouts),
                "tool_results_not_text": float(self.not_text)}


def tool_call_unanswered(completions: list[Any], **_: Any) -> list[float]:
    """1.0 for each completion that ends on a tool call it never saw answered, else 0.0.

    TRL's tool loop drops a tool's answer that would run past `max_completion_length` (or the model's context) and
    ends the completion on the call, and stops calling after `max_tool_calling_iterations`; neither counts as
    clipped. The grpo stage adds this to the rewards of a stage with tools with weight 0, so that it changes no
    advantage, and TRL logs its mean per step (`rewards/tool_call_unanswered/mean`) where run health reads it."""
    return [float(isinstance(c, list) and bool(c) and c[-1].get("role") == "assistant" and bool(c[-1].get("tool_calls")))
            for c in completions]


def as_text(result: Any) -> str | None:
    """A tool's answer as the text the model reads, or None when it is not text-like."""
    if isinstance(result, str):
        return result
    if isinstance(result, (bool, int, float)) or result is None:
        return json.dumps(result)
    if isinstance(result, (list, dict)):
        try:
            return json.dumps(result)
        except (TypeError, ValueError):
            return None
    return None


def guarded(function: Callable[..., Any], timeout: float, stats: ToolStats) -> Callable[..., str]:
    """`function` made safe to call: see the module docstring. Always returns text."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> str:
        return call_guarded(function.__name__, functools.partial(function, *args, **kwargs), timeout, stats)

    return call


def call_guarded(name: str, call: Callable[[], Any], timeout: float, stats: ToolStats) -> str:
    """The answer of tool `name` to one `call`, as text: its error, a time-out or a non-text answer becomes an
    `error: ...` message (see the module docstring)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = call()
        except Exception as err:  # the model is told what went wrong, as the tool's answer
            outcome["error"] = f"{type(err).__name__}: {err}"

    worker = threading.Thread(target=target, name=f"tool-{name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        stats.count("timeouts")
        return f"error: {name} did not answer within {timeout:g} s"
    if "error" in outcome:
        stats.count("errors")
        return f"error: {outcome['error']}"
    text = as_text(outcome.get("result"))
    if text is None:
        stats.count("not_text")
        return f"error: {name} returned a {type(outcome['result']).__name__}, not text"
    stats.count()
    return text


def schema_problem(function: Callable[..., Any], reference: str) -> str | None:
    """Why `function` cannot be described to the model (transformers builds its JSON schema from the signature
    and docstring), or None."""
    from transformers.utils import get_json_schema  # lazy: only where a recipe names tools

    try:
        get_json_schema(function)
    except Exception as err:  # its message names the missing type hint or docstring line
        return f"'{reference}' cannot be described to the model: {err}"
    return None


def tool_problems(tools: list[str]) -> list[str]:
    """Each tool importable, callable and describable to the model (transformers builds its JSON schema from the
    signature and docstring); the function is imported, never called."""
    problems = []
    for i, reference in enumerate(tools):
        found = callable_problems(reference)
        if not found:
            found = [p for p in [schema_problem(import_object(reference), reference)] if p]
        problems += [f"tools[{i}]: {p}" for p in found]
    return problems


def load_tools(references: list[str], timeout: float) -> tuple[list[Callable[..., str]], ToolStats]:
    """The functions `package.module:function` named by `references`, each guarded; and their shared stats."""
    stats = ToolStats()
    return [guarded(import_object(reference), timeout, stats) for reference in references], stats


# A conversation that uses every part of tool calling, with names found nowhere else. transformers' and TRL's own
# check (`trl.chat_template_utils.supports_tool_calling`) needs a loaded tokenizer and does not check that `tools=`
# renders; this one renders a template string, so a tokenizer stage's template is checked before it exists.
PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_q7", "description": "A probe.", "parameters": {
    "type": "object", "properties": {"probe_argument_k2": {"type": "string"}}, "required": ["probe_argument_k2"]}}}
PROBE = [{"role": "user", "content": "probe"},
         {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
             "name": "probe_tool_q7", "arguments": {"probe_argument_k2": "probe_value_m4"}}}]},
         {"role": "tool", "name": "probe_tool_q7", "content": "probe_result_z5"}]


def renders_tools(template: str) -> bool:
    """Whether a chat template shows the model its tools, its own tool calls and the tools' answers."""
    from transformers.utils.chat_template_utils import render_jinja_template  # lazy: only for stages with tools

    try:
        rendered = render_jinja_template([PROBE], tools=[PROBE_TOOL], chat_template=template)[0][0]
    except Exception:  # a template that cannot render the conversation at all
        return False
    return all(part in rendered for part in ("A probe.", "probe_argument_k2", "probe_value_m4", "probe_result_z5"))


def has_tool_turns(rows) -> bool:
    """Whether any `messages` row holds a tool call or a tool's answer."""
    if "messages" not in rows.column_names:
        return False
    return any(m.get("tool_calls") or m.get("role") == "tool" for messages in rows["messages"] for m in messages)
