"""`sft` stage type: its recipe keys."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.specs import TrainStageSpec
from pipeline.models.tools import tool_problems
from pipeline.stages.contract import StageType

SFT_FORMATS = {
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "self-instruct": ("instruction", "instances"),  # one row per instance {input, output}
    "text": ("text",),
    "hh-rlhf transcripts": ("chosen",),  # each chosen transcript as `messages`: SFT on the chosen replies
}


@dataclass(kw_only=True)
class SFTSpec(TrainStageSpec):
    """Supervised fine-tuning with `trl.SFTTrainer`; loss on completions only (with tool calls: on every assistant
    turn, the tools' answers masked)."""

    # Alpaca-style rows (instruction/input/output) are rendered with this template; `{instruction}`
    # and `{input}` are filled in. Default: the model's chat template (one user turn), or where the
    # tokenizer has none, the Alpaca templates (with and without input).
    prompt_template: str | None = None
    # Functions `package.module:function` the conversations call: shown to the model in every row without a `tools`
    # column of its own (JSON schemas), as a grpo stage with the same `tools` shows them
    tools: list[str] = field(default_factory=list)
    # Replaces the chat template of the model's tokenizer (saved with this stage's output, so later stages use it):
    # Jinja, or `chatml` (`chatml_compact`: a short tool list), this pipeline's ChatML with tool calls (for a model
    # whose own template shows no tools)
    chat_template: str | None = None

    args_class = "trl.SFTConfig"
    continues_adapter = True
    headline_metrics = (("held-out loss", "initial_eval_loss", "eval_loss"),)

    def check(self) -> list[str]:
        return tool_problems(self.tools)

    def formats(self) -> dict[str, tuple[str, ...]]:
        return SFT_FORMATS


STAGE = StageType("sft", SFTSpec, "pipeline.stages.sft")
