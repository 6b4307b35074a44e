"""The recipe keys of every stage type, typed and documented once (like TRL's config classes).

Kept free of heavy imports so `pipeline validate` is fast; `args` are checked against the
library class named by `args_class`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.recipe import DatasetSpec, StageSpec, TrainStageSpec

SFT_FORMATS = {
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "self-instruct": ("instruction", "instances"),  # one row per instance {input, output}
    "text": ("text",),
}


@dataclass(kw_only=True)
class TokenizerSpec(StageSpec):
    """Train a byte-level BPE tokenizer on a corpus, or load an existing one."""

    dataset: DatasetSpec | None = None  # corpus to train on
    load: str | None = None  # instead of training: a local folder or Hub id to load
    text_column: str = "text"
    vocab_size: int = 1024
    min_frequency: int = 2
    chat_template: str | None = None  # Jinja template; default ChatML (<|im_start|>role ... <|im_end|>)
    model_max_length: int = 2048
    trust_remote_code: bool = False

    ref_fields = ("load",)

    def check(self) -> list[str]:
        from pipeline.stages.tokenizer import MIN_VOCAB_SIZE

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


@dataclass(kw_only=True)
class PretrainSpec(TrainStageSpec):
    """Causal-LM training on plain text packed into fixed-length blocks."""

    # A mapping builds a fresh model: {architecture: llama|mixtral|<any model_type>, **config fields};
    # a string continues pretraining of an earlier stage, local folder or Hub id.
    model: str | dict[str, Any]
    tokenizer: str | None = None  # a tokenizer stage, folder or Hub id; default: the model's own
    text_column: str = "text"
    block_size: int = 128  # tokens per training sequence; documents are joined with EOS and cut into blocks

    ref_fields = ("model", "tokenizer")
    args_class = "transformers.TrainingArguments"

    def check(self) -> list[str]:
        problems = [] if self.block_size >= 1 else [f"block_size: must be >= 1, got {self.block_size}"]
        if isinstance(self.model, dict):
            problems += [] if self.tokenizer else ["a fresh `model:` config needs `tokenizer:`"]
            if "architecture" not in self.model:
                problems.append("model: a fresh config needs `architecture` (e.g. llama, mixtral)")
        return problems

    def formats(self) -> dict[str, tuple[str, ...]]:
        return {"text": (self.text_column,)}


@dataclass(kw_only=True)
class SFTSpec(TrainStageSpec):
    """Supervised fine-tuning with `trl.SFTTrainer`; loss on completions only."""

    # Alpaca-style rows (instruction/input/output) are rendered with this template; `{instruction}`
    # and `{input}` are filled in. Default: the model's chat template (one user turn), or where the
    # tokenizer has none, the Alpaca templates (with and without input).
    prompt_template: str | None = None

    args_class = "trl.SFTConfig"

    def formats(self) -> dict[str, tuple[str, ...]]:
        return SFT_FORMATS


PREFERENCE_FORMATS = {
    "pairwise": ("chosen", "rejected"),
    "pointwise": ("prompt", "response", "score"),
    "listwise": ("prompt", "responses"),
}
PROMPT_FORMATS = {"prompts": ("prompt",)}


@dataclass(kw_only=True)
class RewardSpec(TrainStageSpec):
    """Sequence-classification reward model (one score) trained with `trl.RewardTrainer` (Bradley-Terry)."""

    args_class = "trl.RewardConfig"

    def formats(self) -> dict[str, tuple[str, ...]]:
        return PREFERENCE_FORMATS


@dataclass(kw_only=True)
class DPOSpec(TrainStageSpec):
    """Direct preference optimisation with `trl.DPOTrainer` against a frozen reference.

    With `peft`, the reference is the same base with the adapter disabled (one copy of the
    weights); without it, TRL keeps a frozen copy of the starting model.
    """

    args_class = "trl.DPOConfig"

    def formats(self) -> dict[str, tuple[str, ...]]:
        return PREFERENCE_FORMATS


@dataclass(kw_only=True)
class RewardTermSpec:
    """One weighted reward term. Give exactly one of `reward_model` or `function`."""

    reward_model: str | None = None  # a reward stage, local folder or Hub id: its scalar score
    function: str | None = None  # built-in (exact_match, format) or `package.module:function`
    weight: float = 1.0

    def check(self) -> list[str]:
        if (self.reward_model is None) == (self.function is None):
            return ["each reward needs exactly one of `reward_model` or `function`"]
        return []


@dataclass(kw_only=True)
class AnswerExtractorSpec:
    """How the `exact_match` reward and held-out accuracy read the answer in a response (`pipeline.answers`).

    Give one of `regex` or `function`. Without `answer_extractor:` a stage uses the quickstart's rule: the first
    word of the first line, trailing punctuation and a leading "A:" dropped.
    """

    regex: str | None = None  # the first capture group (or the whole match) of the first match; e.g. "####\\s*(\\S+)"
    function: str | None = None  # `package.module:function`, response text -> answer text

    def check(self) -> list[str]:
        import re

        from pipeline.recipe import callable_problems

        if (self.regex is None) == (self.function is None):
            return ["answer_extractor: give exactly one of `regex` or `function`"]
        if self.function is not None:
            return [f"answer_extractor.function: {p}" for p in callable_problems(self.function)]
        try:
            re.compile(self.regex)
        except re.error as err:
            return [f"answer_extractor.regex: {self.regex!r} is not a valid regular expression: {err}"]
        return []


def answer_extractor_problems(extractor: AnswerExtractorSpec | None) -> list[str]:
    return extractor.check() if extractor is not None else []


@dataclass(kw_only=True)
class GRPOSpec(TrainStageSpec):
    """Group-relative policy optimisation with `trl.GRPOTrainer` on prompts (with `answer` for rule rewards)."""

    rewards: list[RewardTermSpec]
    max_new_tokens_eval: int = 16  # greedy held-out accuracy before/after training, where rows have `answer`
    answer_extractor: AnswerExtractorSpec | None = None  # for `exact_match` and held-out accuracy

    args_class = "trl.GRPOConfig"

    def refs(self) -> list[tuple[str, str]]:
        return super().refs() + [("rewards.reward_model", r.reward_model) for r in self.rewards if r.reward_model]

    def check(self) -> list[str]:
        problems = [] if self.rewards else ["`rewards` must list at least one reward"]
        return problems + reward_term_problems(self.rewards) + answer_extractor_problems(self.answer_extractor)

    def formats(self) -> dict[str, tuple[str, ...]]:
        return PROMPT_FORMATS


def reward_term_problems(terms: list[RewardTermSpec]) -> list[str]:
    """Each `rewards` entry's own problems, and those of a named reward function (importable, callable)."""
    from pipeline.reward_functions import check_function

    problems = []
    for i, term in enumerate(terms):
        problems += [f"rewards[{i}]: {p}" for p in term.check()]
        if term.function:
            problems += [f"rewards[{i}].function: {p}" for p in check_function(term.function)]
    return problems


@dataclass(kw_only=True)
class PPOSpec(TrainStageSpec):
    """RLHF with the project's own PPO: critic, GAE, clipping, KL to the reference.

    The trainer is `pipeline.algorithms.ppo_trainer`; `args` are fields of its `PPOConfig`."""

    reward_model: str | None = None  # shorthand for `rewards: [{reward_model: NAME}]`
    rewards: list[RewardTermSpec] = field(default_factory=list)  # weighted terms, as in `grpo`
    # The critic's starting point (TRL's `value_model`): a reward-model stage, folder or Hub id whose trunk and
    # score head become the critic (InstructGPT); it must share the policy's tokenizer. Default: the policy's
    # own trunk with a fresh value head (a LoRA adapter on the shared base when `peft` is set).
    value_model: str | None = None
    answer_extractor: AnswerExtractorSpec | None = None  # for `exact_match` and held-out accuracy

    ref_fields = ("model", "value_model")
    args_class = "pipeline.algorithms.ppo_trainer.PPOConfig"

    def reward_terms(self) -> list[RewardTermSpec]:
        own = [RewardTermSpec(reward_model=self.reward_model)] if self.reward_model else []
        return own + list(self.rewards)

    def refs(self) -> list[tuple[str, str]]:
        return super().refs() + [("rewards.reward_model", r.reward_model) for r in self.reward_terms() if r.reward_model]

    def check(self) -> list[str]:
        problems = [] if self.reward_terms() else ["give `reward_model` or `rewards`"]
        return problems + reward_term_problems(self.rewards) + answer_extractor_problems(self.answer_extractor)

    def formats(self) -> dict[str, tuple[str, ...]]:
        return PROMPT_FORMATS


@dataclass(kw_only=True)
class BestOfNSpec:
    """Best-of-N reranking: sample `n` responses per prompt and keep the one the reward model scores highest."""

    n: int = 4
    temperature: float = 1.0  # sampling temperature of the N candidates

    def check(self) -> list[str]:
        problems = [] if self.n >= 2 else [f"best_of_n.n: must be at least 2, got {self.n}"]
        return problems + ([] if self.temperature > 0 else [f"best_of_n.temperature: must be > 0, got {self.temperature}"])


@dataclass(kw_only=True)
class PassAtKSpec:
    """pass@k: sample `n` responses per prompt and estimate the chance that `k` of them hold a correct answer."""

    k: int = 8
    n: int | None = None  # samples per prompt, at least k (default k); more than k lowers the estimate's variance
    temperature: float = 1.0  # sampling temperature of the samples

    @property
    def samples(self) -> int:
        return self.k if self.n is None else self.n

    def check(self) -> list[str]:
        problems = [] if self.k >= 1 else [f"pass_at_k.k: must be at least 1, got {self.k}"]
        if self.samples < self.k:
            problems.append(f"pass_at_k.n: must be at least k ({self.k}), got {self.n}")
        return problems + ([] if self.temperature > 0 else [f"pass_at_k.temperature: must be > 0, got {self.temperature}"])


@dataclass(kw_only=True)
class EvalSpec(StageSpec):
    """Score models on held-out prompts: accuracy, reward, win rate, KL, perplexity, best-of-N, pass@k, samples.

    Metrics are named `<metric>/<model>`, with the model as written in `models`.
    """

    models: list[str]  # stage names, local folders or Hub ids; a LoRA adapter folder is merged into its base
    dataset: DatasetSpec  # every row is scored (no split): `prompt` and the checkable `answer`
    reward_model: str | None = None  # reward stage, folder or Hub id: reward/<model>, win rate and best-of-N judge
    baseline: str | None = None  # win_rate/<model> against this model's greedy responses (needs reward_model)
    reference: str | None = None  # kl/<model>: KL(model || reference) over responses sampled from the model
    best_of_n: BestOfNSpec | None = None  # accuracy/<model>@bon<N> and reward/<model>@bon<N> (needs reward_model)
    pass_at_k: PassAtKSpec | None = None  # accuracy/<model>@pass<k>: unbiased pass@k of n samples (no reward model)
    reference_column: str | None = None  # reference completions for perplexity/<model>; default `completion` if present
    max_new_tokens: int = 16
    batch_size: int = 64  # prompts per generation/scoring batch
    num_samples_table: int = 8  # prompts whose responses are saved to samples.json and shown in the report
    answer_extractor: AnswerExtractorSpec | None = None  # how accuracy/<model> reads the answer in a response
    trust_remote_code: bool = False

    ref_fields = ("models", "reward_model", "baseline", "reference")

    def check(self) -> list[str]:
        problems = [] if self.models else ["`models` must list at least one model"]
        problems += [f"models: '{m}' is listed twice" for m in sorted({m for m in self.models if self.models.count(m) > 1})]
        for key in ("baseline", "best_of_n"):
            if getattr(self, key) is not None and self.reward_model is None:
                problems.append(f"{key}: needs `reward_model` (it judges the responses)")
        for sampled in (self.best_of_n, self.pass_at_k):
            problems += sampled.check() if sampled is not None else []
        if self.dataset.eval is not None:
            problems.append("dataset.eval: an eval stage scores every row of `dataset`; list held-out files as its sources")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens: must be at least 1, got {self.max_new_tokens}")
        return problems + answer_extractor_problems(self.answer_extractor)

    def formats(self) -> dict[str, tuple[str, ...]]:
        return {"prompts with answers": ("prompt", "answer") + ((self.reference_column,) if self.reference_column else ())}


JUDGE_TEMPLATE = ("Rate the answer to the question from 1 (wrong or unhelpful) to {scale} (correct and helpful).\n\n"
                  "Question: {prompt}\nAnswer: {response}\n\nReply with one digit.")


@dataclass(kw_only=True)
class JudgeSpec:
    """LLM-as-a-judge: a causal LM prompted (through its chat template, if it has one) to rate a response.

    The score is the expected rating under the judge's next-token distribution over the digits 1..scale
    (as in G-Eval): smoother than one sampled rating, and it never fails to parse.
    """

    model: str  # a stage, local folder or Hub id
    template: str = JUDGE_TEMPLATE  # `{prompt}`, `{response}` and `{scale}` are filled in
    scale: int = 5  # ratings 1..scale; single digits, so at most 9
    weight: float = 1.0  # added to the `rewards` terms with this weight

    def check(self) -> list[str]:
        problems = [] if 2 <= self.scale <= 9 else [f"judge.scale: must be 2..9 (single-digit ratings), got {self.scale}"]
        try:
            filled = self.template.format(prompt="\0p", response="\0r", scale=self.scale)
            if "\0p" not in filled or "\0r" not in filled:
                problems.append("judge.template: must contain {prompt} and {response}")
        except (KeyError, IndexError, ValueError) as err:
            problems.append(f"judge.template: only {{prompt}}, {{response}} and {{scale}} can be filled in ({err!r}); "
                            "write literal braces as {{ and }}")
        return problems


@dataclass(kw_only=True)
class GenerateSpec(StageSpec):
    """Collect preference data (RLAIF): sample responses from a policy, score them, write preference pairs.

    The output folder's `data.jsonl` (pairwise by default) is read by any `reward` or `dpo` stage that
    names this stage as its dataset `path`; `pairwise.jsonl` and `listwise.jsonl` are always written too.
    """

    model: str  # the policy: a stage, local folder or Hub id; a LoRA adapter folder is merged into its base
    dataset: DatasetSpec  # prompts (`prompt`; `answer` for the exact_match reward); every row is used
    rewards: list[RewardTermSpec] = field(default_factory=list)  # weighted reward models and rule functions
    judge: JudgeSpec | None = None  # LLM-as-a-judge, added to `rewards` with its weight
    num_samples: int = 4  # k responses per prompt
    temperature: float = 1.0
    max_new_tokens: int = 16
    pairs: str = "best_worst"  # best_worst: one pair per prompt, top vs bottom score; all: every pair with a margin
    min_margin: float = 0.0  # a pair needs score(chosen) - score(rejected) > min_margin
    output_format: str = "pairwise"  # what data.jsonl holds: pairwise or listwise (all responses, best first)
    batch_size: int = 64  # prompts per generation batch
    answer_extractor: AnswerExtractorSpec | None = None  # for `exact_match` and the *_accuracy metrics
    trust_remote_code: bool = False

    ref_fields = ("model",)

    def refs(self) -> list[tuple[str, str]]:
        judge = [("judge.model", self.judge.model)] if self.judge else []
        return super().refs() + [("rewards.reward_model", r.reward_model) for r in self.rewards if r.reward_model] + judge

    def check(self) -> list[str]:
        problems = [] if self.rewards or self.judge else ["give `rewards` and/or `judge` to score the responses"]
        problems += reward_term_problems(self.rewards) + answer_extractor_problems(self.answer_extractor)
        problems += self.judge.check() if self.judge else []
        if self.num_samples < 2:
            problems.append(f"num_samples: must be at least 2 to make a pair, got {self.num_samples}")
        if self.temperature <= 0:
            problems.append(f"temperature: must be > 0 (identical greedy samples make no pairs), got {self.temperature}")
        for key, allowed in (("pairs", ("best_worst", "all")), ("output_format", ("pairwise", "listwise"))):
            if getattr(self, key) not in allowed:
                problems.append(f"{key}: must be one of {', '.join(allowed)}, got '{getattr(self, key)}'")
        if self.dataset.eval is not None:
            problems.append("dataset.eval: a generate stage samples for every row of `dataset`; list files as its sources")
        return problems

    def formats(self) -> dict[str, tuple[str, ...]]:
        return PROMPT_FORMATS


# Specs defined in their stage's module, which imports this one: imported once what they use is defined.
from pipeline.stages.kto import KTOSpec
from pipeline.stages.rloo import RLOOSpec

STAGE_SPECS: dict[str, type[StageSpec]] = {
    "tokenizer": TokenizerSpec,
    "pretrain": PretrainSpec,
    "sft": SFTSpec,
    "reward": RewardSpec,
    "dpo": DPOSpec,
    "kto": KTOSpec,
    "grpo": GRPOSpec,
    "rloo": RLOOSpec,
    "ppo": PPOSpec,
    "eval": EvalSpec,
    "generate": GenerateSpec,
}
