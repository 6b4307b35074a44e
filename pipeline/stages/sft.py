"""`sft` stage: supervised fine-tuning with `trl.SFTTrainer`, loss on completions only.

Every input format becomes prompt/completion, which TRL trains with completion-only loss:
- `messages`: the last (assistant) message is the completion, the turns before it the prompt; a conversation that
  calls tools is trained whole, on every assistant turn, with the tools' answers masked (TRL's
  `assistant_only_loss`), and `tools` are shown to the model in rows without their own `tools` column;
- `instruction`/`input`/`output` (Alpaca): a user turn (instruction, then input) and the assistant's reply,
  through the chat template, when the model's tokenizer has one and no `prompt_template` is given (the model
  is then trained in the format it is served with); otherwise the prompt is rendered through `prompt_template`
  (default: the Alpaca templates);
- `instruction`/`instances` (Self-Instruct): one Alpaca row per instance `{input, output}`;
- `chosen` (HH-RLHF transcripts): each chosen transcript as a `messages` row, its final reply trained on
  (`pipeline.data.formats`);
- `prompt`/`completion`: as given, plain-text rows as a user turn and the reply when the tokenizer has a chat
  template (`pipeline.data.prompts`); `text`: plain language modelling on the whole text.

What the prompts were trained as (chat turns or plain text) is recorded in the saved tokenizer, so that every
later stage renders plain-text prompts the same way (`pipeline.data.prompts.renders_chat`).
"""

from __future__ import annotations

from typing import Any

from transformers.utils import get_json_schema
from trl import SFTTrainer

from pipeline.config.paths import import_object
from pipeline.data.formats import ALPACA_TEMPLATES, alpaca_prompt, alpaca_request, sft_messages, tool_conversations
from pipeline.data.loading import DataError, require_columns
from pipeline.data.prompts import record_alpaca_templates, record_prompt_format, renders_chat, user_turns
from pipeline.models.chat_templates import use_chat_template
from pipeline.models.loading import load_policy, load_tokenizer, starting_point
from pipeline.models.tools import has_tool_turns
from pipeline.stages.context import StageContext
from pipeline.stages.specs.sft import SFTSpec
from pipeline.training.length_checks import check_padding, check_sft_lengths
from pipeline.training.trainers import TrainerStage, evaluated

def alpaca_templates_for(template: str | None) -> tuple[str, str]:
    """The templates (with an input, without one) Alpaca rows are rendered by as plain text: the recipe's
    `prompt_template` for both, or Stanford Alpaca's."""
    return (template, template) if template else ALPACA_TEMPLATES


def to_prompt_completion(dataset, data_format: str, template: str | None, where: str, chat: bool = False):
    """Rewrite rows of any supported format as prompt/completion (or leave `text` as is).

    `chat`: the model takes chat turns, so Alpaca rows without a `template` and plain prompt/completion rows
    become chat messages.
    """
    if data_format == "text":
        return dataset.select_columns(["text"])
    if data_format == "hh-rlhf transcripts":
        dataset, data_format = sft_messages(dataset, where), "messages"
    if data_format == "prompt-completion":
        dataset = dataset.select_columns(["prompt", "completion"])
        return user_turns(dataset) if chat else dataset
    if data_format == "self-instruct":
        def flatten(batch: dict[str, list]) -> dict[str, list]:
            rows = [(ins, inst.get("input", ""), inst["output"])
                    for ins, instances in zip(batch["instruction"], batch["instances"]) for inst in instances]
            return {"instruction": [r[0] for r in rows], "input": [r[1] for r in rows], "output": [r[2] for r in rows]}
        dataset = dataset.map(flatten, batched=True, remove_columns=dataset.column_names)
        data_format = "alpaca"
    if data_format == "alpaca":
        def render(row: dict[str, Any]) -> dict[str, Any]:
            if chat and template is None:
                request = alpaca_request(row["instruction"], row.get("input"))
                return {"prompt": [{"role": "user", "content": request}],
                        "completion": [{"role": "assistant", "content": row["output"]}]}
            return {"prompt": alpaca_prompt(row["instruction"], row.get("input"), alpaca_templates_for(template)),
                    "completion": row["output"]}
        return dataset.map(render, remove_columns=dataset.column_names)

    def split_last_turn(row: dict[str, Any]) -> dict[str, list]:
        messages = row["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise DataError(f"{where}: every `messages` row must end with an assistant message")
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    return dataset.map(split_last_turn, remove_columns=dataset.column_names)


def run(spec: SFTSpec, ctx: StageContext) -> dict[str, float]:
    where = f"stage '{spec.name}'"
    train, held_out = ctx.splits(spec.dataset)
    data_format = require_columns(train, spec.formats(), where)
    model_path = starting_point(spec, ctx.stage_dir, ctx.resolve(spec.model))  # see modeling.stage_base
    tokenizer = load_tokenizer(model_path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    if spec.chat_template:
        use_chat_template(tokenizer, spec.chat_template)
    chat = renders_chat(tokenizer)
    # Conversations that call tools are trained whole, on every assistant turn (the call and the answer after the
    # tool's), the tools' answers masked; any other conversation, on its last assistant turn
    with_tools = data_format == "messages" and has_tool_turns(train)
    if with_tools:
        schemas = [get_json_schema(import_object(reference)) for reference in spec.tools]
        train, held_out = (tool_conversations(rows, schemas) for rows in (train, held_out))
    else:
        train = to_prompt_completion(train, data_format, spec.prompt_template, where, chat)
        held_out = to_prompt_completion(held_out, data_format, spec.prompt_template, where, chat)
    if data_format in ("messages", "hh-rlhf transcripts") and tokenizer.chat_template is None:
        raise DataError(f"{where}: conversational data needs a chat template, and the tokenizer of "
                        f"'{spec.model}' has none; add a `tokenizer` stage with `load:` to give it one")
    model, peft_config = load_policy(model_path, spec)
    stage = TrainerStage(spec, ctx, model, eval_on_start=len(held_out) > 0,
                         extra_args={"assistant_only_loss": True} if with_tools else None)
    trainer = stage.build(SFTTrainer, model=model, train_dataset=train, eval_dataset=evaluated(held_out),
                          processing_class=tokenizer, peft_config=peft_config)
    lengths = check_sft_lengths(trainer, (len(train), len(held_out)), where)  # over-long rows, before training
    check_padding(trainer, lambda row: len(row["input_ids"]), where)  # group_by_length measures input_ids itself

    def after_training(metrics: dict[str, float]) -> None:
        metrics.update(lengths)
        if data_format != "text":
            record_prompt_format(tokenizer, with_tools or isinstance(train[0]["prompt"], list))
        if data_format in ("alpaca", "self-instruct") and isinstance(train[0]["prompt"], str):
            record_alpaca_templates(tokenizer, alpaca_templates_for(spec.prompt_template))
    # initial_eval_loss: held-out loss of the starting model, so the gain from SFT is measured, not assumed.
    return stage.fit(trainer, tokenizer, initial=("eval_loss",), after_training=after_training)
