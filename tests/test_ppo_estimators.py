"""The PPO trainer's critic-free estimators, critic warm-up, separate gradient clipping and dynamic sampling, on a
tiny random model with the project's own tokenizer (the stage-level learning checks are in test_ppo.py)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.algorithms.ppo_trainer.config import PPOConfig
from pipeline.algorithms.ppo_trainer.trainer import PPOTrainer
from pipeline.config.specs import PeftSpec
from pipeline.models.loading import load_tokenizer
from pipeline.stages.ppo import PPOSpec, build_models
from tests.test_ppo_onpolicy import length_reward, make_tokenizer, prompts_for


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("estimators")
    make_tokenizer("quickstart", directory)
    tokenizer = load_tokenizer(str(directory))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def trainer_for(directory, peft: bool = True, reward=length_reward, **args) -> PPOTrainer:
    spec = PPOSpec(name="ppo", type="ppo", model=str(directory), dataset=None,
                   peft=PeftSpec(lora={"r": 4, "lora_alpha": 8}) if peft else None)
    config = PPOConfig(output_dir=str(directory / "ppo"), rollout_batch_size=16, mini_batch_size=8, max_new_tokens=6,
                       **args)
    torch.manual_seed(0)  # the same LoRA initialisation for every trainer built with the same arguments
    model, reference = build_models(spec, str(directory), init_std=0.0, critic=config.uses_critic)
    dataset = Dataset.from_dict({"prompt": prompts_for("quickstart")})
    return PPOTrainer(config, model, load_tokenizer(str(directory)), dataset, [reward], [1.0], ["length"],
                      ref_model=reference)


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def changed(before: list[torch.Tensor], params) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, params))


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_plus_plus", "grpo"])
@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_critic_free_estimators_build_no_critic_and_train_the_policy(model_dir, estimator, peft):
    trainer = trainer_for(model_dir, peft, advantage_estimator=estimator, samples_per_prompt=4, learning_rate=1e-2)
    model = trainer.unwrapped
    assert model.value_head is None and model.critic_trunk is None and not trainer.critic_params
    assert not any(".value." in n for n, _ in model.named_parameters())
    assert len(trainer.optimizer.param_groups) == 1
    before = snapshot(trainer.policy_params)
    metrics = trainer.step()
    assert changed(before, trainer.policy_params)
    assert "value_loss" not in metrics and "explained_variance" not in metrics
    assert 0.0 <= metrics["zero_variance_fraction"] <= 1.0


def test_groups_are_samples_of_one_prompt_and_their_advantages_sum_to_zero(model_dir):
    """rloo with gamma 1 and no KL: each response's advantage is its score against the others of its prompt."""
    trainer = trainer_for(model_dir, advantage_estimator="rloo", samples_per_prompt=4, kl_coef=0.0,
                          reward_normalization="none")
    rollout, _ = trainer.rollout()
    prompts = [str(p) for p in rollout.prompts]
    assert all(len(set(prompts[i:i + 4])) == 1 for i in range(0, 16, 4))
    trainer.score(rollout)
    trainer.advantages(rollout)
    first_token = rollout.advantages[:, 0].view(4, 4)
    assert torch.allclose(first_token.sum(1), torch.zeros(4), atol=1e-5)
    scores = rollout.scores.view(4, 4)
    expected = scores - (scores.sum(1, keepdim=True) - scores) / 3
    assert torch.allclose(first_token, expected, atol=1e-5)


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_critic_warmup_trains_only_the_critic(model_dir, peft):
    trainer = trainer_for(model_dir, peft, critic_warmup_steps=1, learning_rate=1e-2)
    policy, critic = snapshot(trainer.policy_params), snapshot(trainer.critic_params)
    metrics = trainer.step()
    assert metrics["critic_warmup"] == 1.0
    assert not changed(policy, trainer.policy_params), "the policy moved during critic warm-up"
    assert changed(critic, trainer.critic_params)
    metrics = trainer.step()  # warm-up over
    assert metrics["critic_warmup"] == 0.0 and changed(policy, trainer.policy_params)


def test_policy_and_critic_are_clipped_apart(model_dir):
    """The critic's clip threshold does not change the policy's step (one global norm over both did)."""
    policies = []
    for critic_norm in (1e-6, 1e3):
        trainer = trainer_for(model_dir, learning_rate=1e-2, critic_max_grad_norm=critic_norm, ppo_epochs=1)
        metrics = trainer.step()
        assert metrics["grad_norm/policy"] > 0 and metrics["grad_norm/critic"] > 0
        policies.append(snapshot(trainer.policy_params))
    assert all(torch.equal(a, b) for a, b in zip(*policies))


def test_the_critic_has_its_own_learning_rate(model_dir):
    trainer = trainer_for(model_dir, learning_rate=1e-3, critic_learning_rate=5e-2, lr_scheduler_type="constant")
    metrics = trainer.step()
    assert metrics["learning_rate"] == pytest.approx(1e-3) and metrics["critic_learning_rate"] == pytest.approx(5e-2)


def half_constant_reward(prompts, completions, **_):
    """Pays for length on "letter" questions and nothing anywhere else: half the groups carry no gradient."""
    return [float(len(c)) if "letter" in str(p) else 1.0 for p, c in zip(prompts, completions)]


def test_dynamic_sampling_fills_the_batch_with_groups_that_carry_gradient(model_dir):
    trainer = trainer_for(model_dir, reward=half_constant_reward, advantage_estimator="grpo", samples_per_prompt=4,
                          dynamic_sampling_max_draws=8, missing_eos_penalty=None)
    rollout, metrics = trainer.rollout()
    assert len(rollout) == 16 and rollout.query.shape[0] == rollout.response.shape[0] == 16
    assert 0.2 < metrics["zero_variance_fraction"] < 0.9  # constant for 3 of the 4 question kinds
    assert metrics["dynamic_sampling/filled_fraction"] == 1.0 and metrics["dynamic_sampling/draws"] > 1
    scores = rollout.scores.view(4, 4)
    assert (scores.max(1).values > scores.min(1).values).all()  # no zero-variance group left
    assert all("letter" in str(rollout.prompts[i]) for i in range(16))
    trainer.score(rollout)  # the concatenated batch is scored on-policy: ratio exactly 1 before an update
    trainer.advantages(rollout)
    logprobs, _, _ = trainer.policy_outputs(trainer.unwrapped, rollout)
    mask = rollout.mask.bool()
    assert torch.allclose(logprobs[mask], rollout.logprobs[mask], atol=1e-5)


def test_dynamic_sampling_stops_at_its_cap_and_keeps_the_batch_full(model_dir):
    trainer = trainer_for(model_dir, reward=lambda completions, **_: [1.0] * len(completions),
                          advantage_estimator="rloo", samples_per_prompt=4, dynamic_sampling_max_draws=3,
                          missing_eos_penalty=None)
    rollout, metrics = trainer.rollout()
    assert len(rollout) == 16
    assert metrics["dynamic_sampling/draws"] == 3 and metrics["dynamic_sampling/filled_fraction"] == 0.0
    assert metrics["zero_variance_fraction"] == 1.0


ESTIMATOR_CASES = {
    "critic-free with one sample per prompt": (
        {"advantage_estimator": "grpo", "samples_per_prompt": 1}, {}, "set samples_per_prompt >= 2"),
    "critic keys without a critic": (
        {"advantage_estimator": "rloo"}, {"critic_learning_rate": 1e-3, "critic_warmup_steps": 2},
        "advantage_estimator 'rloo' trains no critic, so args.critic_learning_rate, args.critic_warmup_steps"),
    "dynamic sampling cap below 1": (
        {"advantage_estimator": "rloo"}, {"dynamic_sampling_max_draws": 0}, "dynamic_sampling_max_draws must be >= 1"),
    "dynamic sampling without groups": (
        {}, {"dynamic_sampling_max_draws": 2}, "use advantage_estimator rloo, reinforce_plus_plus or grpo"),
    "GRPO's scaling without GRPO": (
        {"advantage_estimator": "rloo"}, {"scale_rewards": "group"}, "args.scale_rewards scales GRPO's advantages"),
    "unknown estimator": ({"advantage_estimator": "vtrace"}, {}, "advantage_estimator must be one of"),
    "estimator in args": ({}, {"advantage_estimator": "rloo"}, "args.advantage_estimator: a key of the stage itself"),
}


@pytest.mark.parametrize("case", list(ESTIMATOR_CASES))
def test_validate_refuses_what_does_not_fit_the_estimator(case, tmp_path, capsys):
    from pipeline.cli import main
    from tests.conftest import DATA, tiny_stages, write_recipe

    keys, args, message = ESTIMATOR_CASES[case]
    stages = tiny_stages() + [{"name": "ppo", "type": "ppo", "model": "sft", "dataset": str(DATA / "prompts.jsonl"),
                               "rewards": [{"function": "exact_match"}], **keys, "args": args}]
    assert main(["validate", str(write_recipe(tmp_path, stages))]) != 0
    out = capsys.readouterr()
    assert "stage 'ppo'" in out.err + out.out and message in out.err + out.out, out


def test_the_estimator_is_a_stage_key_that_reaches_the_trainer(tmp_path):
    from pipeline.validation.recipe_checks import load_recipe
    from tests.conftest import DATA, tiny_stages, write_recipe

    stages = tiny_stages() + [{"name": "ppo", "type": "ppo", "model": "sft", "dataset": str(DATA / "prompts.jsonl"),
                               "rewards": [{"function": "exact_match"}], "advantage_estimator": "rloo",
                               "samples_per_prompt": 8, "args": {"rollout_batch_size": 16, "mini_batch_size": 8}}]
    recipe = load_recipe(write_recipe(tmp_path, stages))
    args = recipe.stage_args(recipe.stage("ppo"))
    assert args["advantage_estimator"] == "rloo" and args["samples_per_prompt"] == 8
