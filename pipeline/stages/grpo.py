"""`grpo` stage: group-relative policy optimisation with `trl.GRPOTrainer`.

Rewards are a weighted list of reward-model stages, built-in rule rewards and user functions
(see `pipeline.models.reward_functions`). Group size (`num_generations`), KL coefficient (`beta`) and clipping
(`epsilon`) come through `args`. The stage reports held-out greedy accuracy before and after
training, since a rising sampled reward alone can hide a worse policy. `train_with_rewards` also
runs the `rloo` stage: TRL's RLOOTrainer takes the same model, rewards and prompts. `dynamic_sampling:` adds
DAPO's dynamic sampling to either trainer (`pipeline.algorithms.dynamic_sampling`). `tools:` lets the policy call
functions while it generates (TRL's tool loop, GRPOTrainer only), each guarded by `pipeline.models.tools`;
`environment:` gives each rollout an environment whose methods are its tools and which may score it
(`pipeline.models.environments`, TRL's `environment_factory`).
"""

from __future__ import annotations

from trl import GRPOTrainer
from trl.models.utils import unwrap_model_for_generation

from pipeline.algorithms.dynamic_sampling import with_dynamic_sampling
from pipeline.data.answers import AnswerCheck, answer_check
from pipeline.data.formats import as_prompts
from pipeline.data.loading import require_reward_columns
from pipeline.data.prompts import as_model_rows
from pipeline.models.decoding import accuracy, generate
from pipeline.models.environments import environment_factory, episode_reward, episodes, owns_reward
from pipeline.models.chat_templates import read_tool_calls, use_chat_template
from pipeline.models.loading import autocast_as_trained, load_policy, load_tokenizer, starting_point
from pipeline.models.reward_functions import build_reward_terms
from pipeline.models.shared_prompts import share_prompts
from pipeline.models.tool_use import generate_with_tools
from pipeline.models.tools import load_tools, tool_call_unanswered
from pipeline.runtime.distributed import map_shards, summed_over_processes
from pipeline.runtime.progress import held_out_evaluation
from pipeline.stages.context import StageContext
from pipeline.stages.specs.grpo import GRPOSpec
from pipeline.training.health import first_and_last_quarter
from pipeline.training.length_checks import check_prompt_lengths
from pipeline.training.trainers import TrainerStage


def held_out_scores(trainer, tokenizer, held_out, max_new_tokens: int, is_correct: AnswerCheck | None,
                    tools: list | None = None, make_environment=None) -> dict[str, float]:
    """The trainer's policy on the held-out rows, greedily, each process answering its share: exact match
    (`accuracy`, where rows have `answer`) and, with an environment that scores, its mean reward (`env_reward`).
    With `tools` or an environment, each answer is a conversation with them (as many rounds of calls as training
    allows), each row in an environment of its own, reset with the row as in training.

    `unwrap_model_for_generation` hands generation the plain model, with its full weights gathered once
    under ZeRO-3: called layer by layer through DeepSpeed's hooks instead, processes generating different
    numbers of tokens would wait on each other's gathers forever.
    """
    rows = held_out.to_list()
    with held_out_evaluation("held-out greedy accuracy", len(held_out), trainer.is_world_process_zero()), \
            unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
        def answer(share: list[dict]) -> list[tuple[str, float | None]]:
            if not share:
                return []
            if not tools and make_environment is None:
                return [(text, None) for text in generate(model, tokenizer, [r["prompt"] for r in share],
                                                          max_new_tokens=max_new_tokens)]
            environments, conversations, own_tools = episodes([r["prompt"] for r in share], share, tools or [],
                                                              make_environment)
            runs = generate_with_tools(model, tokenizer, conversations, own_tools, max_new_tokens=max_new_tokens,
                                       max_calls=trainer.args.max_tool_calling_iterations or 1)
            return [(run.response, episode_reward(env)) for run, env in zip(runs, environments)]
        answers = map_shards(rows, answer)
    scores = {}
    if is_correct is not None:
        scores["accuracy"] = accuracy([text for text, _ in answers], [r["answer"] for r in rows], is_correct)
    rewards = [reward for _, reward in answers if reward is not None]
    if rewards:
        scores["env_reward"] = sum(rewards) / len(rewards)
    return scores


def run(spec: GRPOSpec, ctx: StageContext) -> dict[str, float]:
    return train_with_rewards(spec, ctx, GRPOTrainer)


def train_with_rewards(spec: GRPOSpec, ctx: StageContext, trainer_class) -> dict[str, float]:
    """Train with an online RL trainer of TRL's GRPO family (`GRPOTrainer`, `RLOOTrainer`) on the spec's
    prompts and weighted rewards; held-out greedy accuracy before and after, and the training reward's trend."""

    where = f"stage '{spec.name}'"
    splits = ctx.splits(spec.dataset)
    path = starting_point(spec, ctx.stage_dir, ctx.resolve(spec.model))  # see modeling.stage_base
    tokenizer = load_tokenizer(path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    if spec.chat_template:
        use_chat_template(tokenizer, spec.chat_template)
    train, held_out = (as_prompts(rows, where, tokenizer) for rows in splits)  # as the policy was trained on them
    require_reward_columns(spec.rewards, train.column_names, where)
    if spec.tools or spec.environment:
        read_tool_calls(tokenizer)
    # TRL renders a plain-text prompt as plain text: a chat model gets it as a user turn, as it was trained
    train = as_model_rows(train, tokenizer)
    model, peft_config = load_policy(path, spec)
    is_correct = answer_check(spec.answer_extractor)
    functions, weights, _ = build_reward_terms(spec.rewards, ctx.resolve, is_correct)
    if spec.tools or spec.environment:  # logged, never rewarded: see tool_call_unanswered
        functions, weights = [*functions, tool_call_unanswered], [*weights, 0.0]
    if spec.dynamic_sampling:
        trainer_class = with_dynamic_sampling(trainer_class, spec.dynamic_sampling.max_draws)
    stage = TrainerStage(spec, ctx, model, extra_args={"reward_weights": weights})
    tools, tool_stats = load_tools(spec.tools, spec.tool_timeout)
    acting = {"tools": tools} if tools else {}
    if spec.environment:
        acting["environment_factory"] = environment_factory(spec.environment, spec.tool_timeout, tool_stats)
    trainer = stage.build(trainer_class, model=model, reward_funcs=functions, train_dataset=train,
                          processing_class=tokenizer, peft_config=peft_config, **acting)
    check_prompt_lengths(trainer.model.config, tokenizer, list(trainer.train_dataset["prompt"]),
                         trainer.args.max_completion_length, where)
    # TRL generates num_generations rows per prompt: each prompt is read once, under the autocast TRL trains with
    share_prompts(trainer.model, lambda: autocast_as_trained(trainer.accelerator, trainer.model))
    # apart from training's: the stage's tool counts are training's
    held_out_tools, held_out_stats = load_tools(spec.tools, spec.tool_timeout)
    make_environment = environment_factory(spec.environment, spec.tool_timeout, held_out_stats) \
        if spec.environment else None
    answers = "answer" in held_out.column_names
    measure = len(held_out) > 0 and (answers or owns_reward(spec.environment))

    def score_held_out() -> dict[str, float]:
        return held_out_scores(trainer, tokenizer, held_out, spec.max_new_tokens_eval,
                               is_correct if answers else None, held_out_tools, make_environment)

    initial = score_held_out() if measure else {}

    def after_training(metrics: dict[str, float]) -> None:
        metrics.update(first_and_last_quarter(trainer.state.log_history, ("reward",)))
        if tools or spec.environment:  # each process ran the tools of its own completions
            metrics.update(summed_over_processes(tool_stats.metrics()))
        if measure:
            for name, value in score_held_out().items():
                metrics.update({f"initial_eval_{name}": initial[name], f"eval_{name}": value})
    return stage.fit(trainer, tokenizer, after_training=after_training)
