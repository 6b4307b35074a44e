"""The recipe's vocabulary: a `defaults:` key reaches a stage only where its config means the same thing by it
(a Trainer step count never becomes a count of PPO steps), and `pipeline explain` / `validate --explain` say
what every key is and where every value came from."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.algorithms.ppo_trainer.config import PPOConfig
from pipeline.config.recipe import names_taken_from_defaults
from pipeline.config.specs import RewardsSpec, RewardTermSpec
from pipeline.models.reward_functions import resolve_function
from pipeline.stages import STAGE_TYPES
from pipeline.stages.context import StageContext
from pipeline.stages.ppo import PPOSpec
from pipeline.training.trainers import TrainerStage, make_config
from pipeline.validation.explain import declared_help
from pipeline.validation.recipe_checks import load_recipe
from tests.conftest import DATA, tiny_stages, write_recipe

# Every PPOConfig field that a transformers Trainer config also has, with a value unlike either default.
SHARED_NAMES = {"max_steps": 3, "learning_rate": 0.5, "lr_scheduler_type": "cosine", "warmup_steps": 2,
                "weight_decay": 0.3, "max_grad_norm": 0.7, "seed": 5, "logging_steps": 7, "save_steps": 100,
                "report_to": "tensorboard", "bf16": True, "activation_checkpointing": True}


def ppo_recipe(tmp_path, defaults: dict, **ppo_keys):
    tmp_path.mkdir(parents=True, exist_ok=True)
    stages = tiny_stages() + [{"name": "ppo", "type": "ppo", "model": "sft", "dataset": str(DATA / "prompts.jsonl"),
                               "rewards": [{"function": "exact_match"}], **ppo_keys}]
    return load_recipe(write_recipe(tmp_path, stages, defaults=defaults))


def ppo_config(recipe, tmp_path) -> PPOConfig:
    return make_config(PPOSpec.args_class, recipe.stage_args(recipe.stage("ppo")), output_dir=str(tmp_path / "out"),
                       seed=recipe.seed)


def test_every_shared_trainer_name_is_listed():
    from transformers import TrainingArguments

    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert {f.name for f in dataclasses.fields(PPOConfig)} & trainer_fields - {"output_dir"} == set(SHARED_NAMES)


@pytest.mark.parametrize("name", list(SHARED_NAMES))
def test_a_default_reaches_ppo_only_where_ppo_declares_it(tmp_path, name):
    """`defaults: {NAME: value}` changes the SFT stage and leaves PPO's config as without it, unless PPO
    declares NAME as meaning the same (seed, report_to, ...)."""
    plain = ppo_config(ppo_recipe(tmp_path / "plain", {}), tmp_path)
    recipe = ppo_recipe(tmp_path / "defaults", {name: SHARED_NAMES[name]})
    shared = ppo_config(recipe, tmp_path)
    if name in PPOSpec.shared_defaults:
        assert getattr(shared, name) == SHARED_NAMES[name] != getattr(plain, name)
    else:
        assert getattr(shared, name) == getattr(plain, name)
    assert name in names_taken_from_defaults(recipe.stage("sft"))  # the Trainer stage takes it


def test_ppo_keeps_its_own_step_counts_without_defaults(tmp_path):
    """The pipeline's Trainer-sized logging and checkpoint intervals are not PPO's either."""
    config = ppo_config(ppo_recipe(tmp_path, {}), tmp_path)
    assert (config.logging_steps, config.save_steps) == (PPOConfig.logging_steps, PPOConfig.save_steps) == (1, 20)


def test_stage_args_layers(tmp_path):
    """stage type < defaults < args < stage keys, each value with its source."""
    recipe = ppo_recipe(tmp_path, {"seed": 5, "save_steps": 100}, advantage_estimator="rloo",
                        args={"seed": 6, "max_steps": 2})
    sources = recipe.stage_arg_sources(recipe.stage("ppo"))
    assert sources["seed"] == (6, "args") and sources["max_steps"] == (2, "args")
    assert sources["advantage_estimator"] == ("rloo", "stage key") and "save_steps" not in sources
    stages = tiny_stages() + [{"name": "dpo", "type": "dpo", "model": "sft", "dataset": str(DATA / "prefs.jsonl")}]
    (tmp_path / "dpo").mkdir()
    dpo = load_recipe(write_recipe(tmp_path / "dpo", stages))
    assert dpo.stage_arg_sources(dpo.stage("dpo"))["truncation_mode"] == ("keep_end", "stage type")


def test_every_ppo_field_is_documented():
    helps = declared_help(PPOConfig)
    assert [f.name for f in dataclasses.fields(PPOConfig) if f.name != "output_dir" and not helps.get(f.name)] == []
    assert helps["clip_range"] == "policy ratio clipping epsilon"
    assert "`ppo_epochs`" in helps["max_steps"]
    assert not helps["kl_coef"].startswith("---")  # section headings are not help


def test_library_configs_are_documented_from_their_metadata():
    from trl import DPOConfig

    beta = next(f for f in dataclasses.fields(DPOConfig) if f.name == "beta")
    assert declared_help(DPOConfig)["beta"] == " ".join(beta.metadata["help"].split()) != ""


def test_explain_prints_every_key_of_a_stage_type(capsys):
    from pipeline.cli import main

    assert main(["explain", "ppo"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(PPOSpec):
        if f.name not in ("name", "type"):
            assert f"\n  {f.name}: " in out
    assert "  args.clip_range: float = 0.2\n      policy ratio clipping epsilon" in out
    assert "args.advantage_estimator" not in out  # a stage key, not an `args` field
    assert "reach this stage only for: seed, report_to" in out
    # the blocks keys take as values, each key with its help: a reward term, the judge inside it, a data source
    for block, key in (("RewardTermSpec", "reward_url"), ("JudgeSpec", "base_url"), ("SourceSpec", "name")):
        assert f"\n{block} (" in out and f"\n  {key}: str | None = None\n      " in out.split(f"\n{block} (")[1]
    assert main(["explain", "ppx"]) == 2
    assert "no stage type 'ppx'; did you mean 'ppo'" in capsys.readouterr().err


def test_validate_explain_says_where_each_value_came_from(tmp_path, capsys):
    from pipeline.cli import main

    stages = tiny_stages() + [{"name": "ppo", "type": "ppo", "model": "sft", "dataset": str(DATA / "prompts.jsonl"),
                               "rewards": [{"function": "exact_match"}], "args": {"max_steps": 3}}]
    recipe = write_recipe(tmp_path, stages, defaults={"save_steps": 100, "weight_decay": 0.01})
    assert main(["validate", str(recipe), "--explain"]) == 0
    out = capsys.readouterr().out
    sft, ppo = out.split("stage 'sft' (sft, SFTConfig):")[1].split("stage 'ppo' (ppo, PPOConfig):")
    assert "  save_steps = 10  [args]" in sft and "  bf16 = False  [pipeline]" in sft
    assert "  weight_decay = 0.01  [defaults]" in sft and "  weight_decay = 0.01  [defaults]" in ppo
    assert "  max_steps = 3  [args]" in ppo and "  save_steps = 20  [library]" in ppo
    assert "  advantage_estimator = 'gae'  [stage key]" in ppo
    assert "not taken from defaults: save_steps" in ppo


def test_peft_is_typed_and_read_nowhere_by_key():
    """`peft:` is a PeftSpec built from the recipe's flat mapping; no module outside `config/` reads its keys by
    string (the adapter mode, merge and LoRA fields each have one owner)."""
    import re

    from pipeline.config.specs import PeftSpec
    from tests.conftest import REPO

    reads = re.compile(r"""peft(\s*or\s*\{\})?\)?\s*(\.get\(|\[)|\.lora(\.get\(|\[)|PEFT_EXTRA_KEYS""")
    offenders = [f"{path.relative_to(REPO)}:{number}" for path in (REPO / "pipeline").rglob("*.py")
                 if "config" not in path.relative_to(REPO / "pipeline").parts[:1]
                 for number, line in enumerate(path.read_text().splitlines(), start=1) if reads.search(line)]
    assert offenders == []
    spec = PeftSpec(**PeftSpec.fields_from({"r": 8, "merge": True}))
    assert (spec.lora, spec.merge, spec.adapter, spec.continues) == ({"r": 8}, True, "stack", False)
    config = spec.lora_config("SEQ_CLS")
    assert (config.r, config.lora_alpha, config.task_type) == (8, 32, "SEQ_CLS")  # LORA_DEFAULTS under the recipe's


def test_a_recipes_peft_mapping_becomes_a_peft_spec(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.config.specs import PeftSpec

    recipe = ppo_recipe(tmp_path / "ok", {}, peft={"r": 8, "lora_alpha": 16, "merge": True})
    assert recipe.stage("ppo").peft == PeftSpec(merge=True, lora={"r": 8, "lora_alpha": 16})
    stages = tiny_stages() + [{"name": "ppo", "type": "ppo", "model": "sft", "dataset": str(DATA / "prompts.jsonl"),
                               "rewards": [{"function": "exact_match"}], "peft": {"r": 8, "adapter": "stacked"}}]
    assert main(["validate", str(write_recipe(tmp_path, stages))]) == 2
    assert "peft.adapter: must be one of stack, continue, got 'stacked'" in capsys.readouterr().err


@pytest.mark.parametrize("stage_type", ["grpo", "rloo", "ppo", "generate"])
def test_every_scoring_stage_declares_the_reward_vocabulary_once(stage_type):
    """`rewards` and `answer_extractor` are RewardsSpec's (its fields, their help, its checks), in every stage that
    scores responses, and each built-in reward name it accepts is one `resolve_function` builds."""
    spec = STAGE_TYPES[stage_type].spec
    assert issubclass(spec, RewardsSpec)
    declared = {f.name: f for f in dataclasses.fields(spec)}
    assert declared["rewards"] == {f.name: f for f in dataclasses.fields(RewardsSpec)}["rewards"]
    assert "weighted reward models" in declared_help(spec)["rewards"]
    for name in RewardTermSpec.BUILTIN:
        assert callable(resolve_function(name))


def test_reward_terms_are_checked_where_they_are_declared():
    assert RewardTermSpec(function="exact_mtch").check() == [
        "function: 'exact_mtch' is not a built-in (exact_match, format); did you mean 'exact_match'? "
        "nor a `package.module:function` path"]
    assert "cannot import" in RewardTermSpec(function="no_such_module:f").check()[0]
    assert RewardTermSpec(function="format", reward_model="rm").check() == [
        "each reward needs exactly one of `reward_model`, `function`, `reward_url` or `judge`"]
    assert RewardTermSpec(reward_url="localhost:8000").check() == [
        "reward_url: 'localhost:8000' is not an http:// or https:// URL with a host"]
    assert RewardTermSpec(reward_url="http://rm:80x").check() == ["reward_url: 'http://rm:80x' has no valid port"]
    assert RewardTermSpec(reward_url="http://rm-node:8000", weight=0.5).check() == []
    assert RewardTermSpec(function="exact_match").columns == ("answer",)
    rewards = RewardsSpec(rewards=[RewardTermSpec(function="format"), RewardTermSpec(function="nope")])
    assert rewards.reward_problems()[0].startswith("rewards[1]: function: 'nope' is not a built-in")


def test_a_trainer_stage_refuses_a_trainer_it_did_not_build(tmp_path):
    """The Trainer stages' protocol (`TrainerStage`): a Trainer made without its args and callbacks (so without
    the divergence guard and the run-health watch) is refused before it trains."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    recipe = load_recipe(write_recipe(tmp_path, tiny_stages(pretrain_steps=1, sft_steps=1)))
    spec = recipe.stage("base")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    stage = TrainerStage(spec, StageContext(recipe, spec, tmp_path / "run"), model)
    assert stage.args.max_steps == 1 and stage.args.output_dir.endswith("checkpoints")
    built = stage.build(Trainer, model=model)
    assert built.args is stage.args and all(c in built.callback_handler.callbacks for c in stage.callbacks)
    for unbuilt in (Trainer(model=model, args=stage.args), Trainer(model=model, args=stage.args.__class__(
            output_dir=str(tmp_path / "other"), use_cpu=True), callbacks=stage.callbacks)):
        with pytest.raises(RuntimeError, match="its Trainer was not made by `TrainerStage.build`"):
            stage.fit(unbuilt, tokenizer=None)
