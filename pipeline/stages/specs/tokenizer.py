"""`tokenizer` stage type: its recipe keys."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.specs import DatasetSpec, StageSpec
from pipeline.stages.contract import StageType


@dataclass(kw_only=True)
class TokenizerSpec(StageSpec):
    """Train a byte-level BPE tokenizer on a corpus, or load an existing one."""

    dataset: DatasetSpec | None = None  # corpus to train on
    load: str | None = None  # instead of training: a local folder or Hub id to load
    text_column: str = "text"
    vocab_size: int = 1024
    min_frequency: int = 2
    chat_template: str | None = None  # Jinja template; default ChatML with tool calls (CHATML_TEMPLATE)
    model_max_length: int = 2048

    ref_fields = ("load",)
    headline_metrics = (("chars/token", None, "eval_chars_per_token"),)

    def check(self) -> list[str]:
        if (self.dataset is None) == (self.load is None):
            return ["give exactly one of `dataset` (train a tokenizer) or `load` (use an existing one)"]
        problems = []
        if self.dataset is not None and self.vocab_size < MIN_VOCAB_SIZE:
            problems.append(f"vocab_size: must be at least {MIN_VOCAB_SIZE} (256 bytes and 4 special tokens, "
                            f"before any merge), got {self.vocab_size}")
        if self.min_frequency < 1:
            problems.append(f"min_frequency: must be >= 1, got {self.min_frequency}")
        if self.model_max_length < 1:
            problems.append(f"model_max_length: must be >= 1, got {self.model_max_length}")
        return problems

    def formats(self) -> dict[str, tuple[str, ...]]:
        return {"text": (self.text_column,)}

    def tokenizer_ref(self) -> str | None:
        return None  # the tokenizer is this stage's own output, which always has a chat template

BOS, EOS, PAD, IM_START = "<|endoftext|>", "<|im_end|>", "<|pad|>", "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START]
# Byte-level BPE starts from all 256 bytes plus the special tokens: a smaller `vocab_size` cannot be met
# (the trainer silently returns this many tokens and no merges).
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# ChatML, with the tool-calling conventions of transformers' chat templating: `tools=` lists the functions in a
# system turn, an assistant message's `tool_calls` render as <tool_call>{"name": ..., "arguments": {...}}</tool_call>
# (the format TRL's Qwen3 response parser reads back; `arguments` may be a JSON string), and a `tool` message
# is a turn of its own. A conversation without tools renders exactly as plain ChatML. {% generation %} marks what the assistant wrote, so SFT can train on
# the assistant's turns alone (TRL's `assistant_only_loss`). Newlines after a tag are written as {{ '\n' }}:
# transformers renders with trim_blocks, which would drop a literal one.
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


STAGE = StageType("tokenizer", TokenizerSpec, "pipeline.stages.tokenizer")
