"""The chat template this pipeline writes, giving a tokenizer a template by name or as Jinja, and reading tool
calls back (TRL is imported only for that: the template text is read by light commands)."""

from __future__ import annotations

# ChatML, with the tool-calling conventions of transformers' chat templating: `tools=` lists the functions in a
# system turn, an assistant message's `tool_calls` render as <tool_call>{"name": ..., "arguments": {...}}</tool_call>
# (the format TRL's Qwen3 response parser reads back; `arguments` may be a JSON string), and a `tool` message
# is a turn of its own. A conversation without tools renders exactly as plain ChatML. {% generation %} marks what the
# assistant wrote, so SFT can train on the assistant's turns alone (TRL's `assistant_only_loss`). Newlines after a tag
# are written as {{ '\n' }}: transformers renders with trim_blocks, which would drop a literal one.
CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>system{{ '\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ 'To call a function, answer with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>. Functions:' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}<|im_end|>{{ '\n' }}{% endif %}"
    "{% for message in messages %}{% if not (tools and loop.first and message['role'] == 'system') %}"
    "<|im_start|>{{ message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% if message['content'] or not message['tool_calls'] %}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set function = call['function'] if call['function'] is defined else call %}"
    "<tool_call>{\"name\": {{ function['name'] | tojson }}, \"arguments\": "
    "{{ function['arguments'] if function['arguments'] is string else function['arguments'] | tojson }}}</tool_call>"
    "{% endfor %}<|im_end|>{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] }}<|im_end|>{{ '\n' }}{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}"
)

# The same ChatML with a short tool list: `Functions:` and one line per tool, `add(a, b): Add two whole numbers.`,
# instead of the call format and each tool's JSON schema (~420 tokens for one two-argument tool with a small
# byte-level vocabulary). For small models trained on demonstrations of the calls, whose questions would otherwise
# sit hundreds of positions from the start.
CHATML_COMPACT_TEMPLATE = CHATML_TEMPLATE.replace(
    "{{ 'To call a function, answer with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>. Functions:' }}",
    "{{ 'Functions:' }}").replace(
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}",
    "{% for tool in tools %}{% set function = tool['function'] if tool['function'] is defined else tool %}"
    "{{ '\n' + function['name'] + '(' + (function['parameters']['properties'] | join(', ')) + '): ' }}"
    "{{ function['description'] }}{% endfor %}")

NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE, "chatml_compact": CHATML_COMPACT_TEMPLATE}


def template_text(template: str) -> str:
    """A template given by name (`chatml`) or as Jinja, as Jinja."""
    return NAMED_TEMPLATES.get(template, template)


def use_chat_template(tokenizer, template: str) -> None:
    """Give `tokenizer` the chat template `template` (a name or Jinja); a response template read for another one
    no longer applies."""
    tokenizer.chat_template = template_text(template)
    tokenizer.response_template = None


def read_tool_calls(tokenizer) -> None:
    """Make `tokenizer.parse_response` read the tokenizer's tool calls: this pipeline's ChatML writes them as Qwen's
    <tool_call>{json}</tool_call> (both its templates), which TRL's Qwen3 response template reads; a template TRL
    knows gets TRL's own (`add_response_schema`, which refuses one it does not know). Called only where tools are
    used: TRL parses every completion of a tokenizer that has a response template (and decodes it as text
    otherwise), which would change what rewards read in every other stage."""
    from trl.chat_template_utils import add_response_schema, qwen3_template  # lazy: see the module docstring

    if getattr(tokenizer, "response_template", None) is not None or getattr(tokenizer, "response_schema", None):
        return
    if tokenizer.chat_template in NAMED_TEMPLATES.values():
        tokenizer.response_template = qwen3_template
    else:
        add_response_schema(tokenizer)
