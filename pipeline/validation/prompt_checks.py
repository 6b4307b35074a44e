"""How each stage will render plain-text prompts, predicted before anything trains (`pipeline validate`).

The rule is `pipeline.data.prompts.renders_chat`'s: a user turn through the chat template where the model's
tokenizer has one, unless the recipe says `prompt_format: raw`. Plain text given to a model trained on chat rows
is the silent failure this guards against: the model continues the text instead of answering it.
"""

from __future__ import annotations

from pipeline.config.paths import resolve_local
from pipeline.config.recipe import Recipe
from pipeline.config.specs import StageSpec
from pipeline.data.loading import DataError, load_source
from pipeline.validation.preflight import has_chat_template, is_conversational, template_source, tool_template_problem


def lineage(recipe: Recipe, ref: str) -> tuple[list[StageSpec], str | None]:
    """(the stages a model reference was trained through, nearest first; the folder or Hub id it starts from,
    None where a `tokenizer` stage made its tokenizer)."""
    stages = {s.name: s for s in recipe.stages}
    chain: list[StageSpec] = []
    while ref in stages:
        chain.append(stages[ref])
        ref = stages[ref].tokenizer_ref()
    return chain, ref


def chat_trained(recipe: Recipe, chain: list[StageSpec]) -> str | None:
    """The first stage of `chain` that trains on chat rows (messages, chat prompts, HH-RLHF transcripts, or Alpaca
    rows, which a chat model gets as turns), read from its first local source; None if none does."""
    for stage in chain:
        for _, spec in stage.data_specs():
            source = spec.sources[0]
            if source.path in {s.name for s in recipe.stages} or resolve_local(source.path, recipe.path) is None:
                continue
            try:
                row = load_source(source, recipe_path=recipe.path)[0]
            except DataError:
                continue  # reported by the data checks
            if is_conversational(row) or "instruction" in row:
                return stage.name
    return None


def prompt_renderings(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(one line per stage and model it generates from: how its plain-text prompts are rendered; warnings)."""
    lines: list[str] = []
    warnings: list[str] = []
    for stage in recipe.stages:
        for ref in stage.prompt_models():
            chain, origin = lineage(recipe, ref)
            local = resolve_local(origin, recipe.path) if origin else None
            setter, _ = template_source(recipe, ref)  # a template set on the way: a tokenizer stage, `chat_template`
            template = True if origin is None or setter is not None else has_chat_template(
                str(local or origin), local is None, stage.trust_remote_code)
            taught = chat_trained(recipe, chain)
            if template is False:
                how = "plain text (its tokenizer has no chat template)"
            elif recipe.prompt_format == "raw":
                how = "plain text (prompt_format: raw)"
                if taught:
                    warnings.append(f"stage '{stage.name}': '{ref}' was trained on chat rows (stage '{taught}') "
                                    "but gets plain-text prompts (prompt_format: raw): it may continue them "
                                    "instead of answering; drop `prompt_format: raw`")
            else:
                how = "a user turn through its chat template" + ("" if template else ", if it has one")
            lines.append(f"stage '{stage.name}': plain-text prompts to '{ref}': {how}")
    return lines, warnings


def tool_template_problems(recipe: Recipe, stage: StageSpec) -> list[str]:
    """A stage with `tools` (or an `environment`, whose methods are tools) needs models whose chat templates render
    them (`preflight.tool_template_problem`): the model it trains, or each one it generates from."""
    if not getattr(stage, "tools", None) and not getattr(stage, "environment", None):
        return []
    refs = stage.prompt_models() or [stage.tokenizer_ref()]
    own = getattr(stage, "chat_template", None)
    problems = [(ref, tool_template_problem(recipe, ref, stage.trust_remote_code, own)) for ref in refs]
    return [f"tools: {problem}" if len(refs) == 1 else f"tools: model '{ref}': {problem}"
            for ref, problem in problems if problem]
