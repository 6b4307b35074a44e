"""`eval` stage type: its recipe keys."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.specs import AnswerExtractorSpec, DERIVED_PROMPT_FORMATS, DatasetSpec, JudgeSpec, RewardTermSpec, StageSpec, answer_extractor_problems, url_problems
from pipeline.models.environments import EnvironmentSpec, environment_problems
from pipeline.models.tools import tool_problems
from pipeline.stages.contract import StageType


def sampled_name(variant: str) -> str:
    """`bon4` -> `best-of-4`, `pass8` -> `pass@8`: the sampled accuracies of an eval stage, in words."""
    return variant.replace("bon", "best-of-", 1) if variant.startswith("bon") else variant.replace("pass", "pass@", 1)


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
    dataset: DatasetSpec  # every row is scored (no split): `prompt`, and `answer` where answers can be checked
    reward_model: str | None = None  # reward stage, folder or Hub id: reward/<model>, win rate and best-of-N judge
    reward_url: str | None = None  # instead of reward_model: a served reward model (`pipeline serve`)
    # Further reward models scoring the same greedy responses (a second opinion, without generating them again):
    # reward_<name>/<model> and, with a baseline, win_rate_<name>/<model>, <name> as `models` names a model
    extra_reward_models: list[str] = field(default_factory=list)
    judge: JudgeSpec | None = None  # judge/<model>: an LLM judge's mean expected rating, loaded here or served
    baseline: str | None = None  # win_rate/<model> against this model's greedy responses (needs reward_model)
    reference: str | None = None  # kl/<model>: KL(model || reference) over responses sampled from the model
    best_of_n: BestOfNSpec | None = None  # accuracy/<model>@bon<N> and reward/<model>@bon<N> (needs reward_model)
    pass_at_k: PassAtKSpec | None = None  # accuracy/<model>@pass<k>: unbiased pass@k of n samples (no reward model)
    reference_column: str | None = None  # reference completions for perplexity/<model>; default `completion` if present
    max_new_tokens: int = 16
    batch_size: int = 64  # prompts per generation/scoring batch
    num_samples_table: int = 8  # prompts whose responses are saved to samples.json and shown in the report
    answer_extractor: AnswerExtractorSpec | None = None  # how accuracy/<model> reads the answer in a response
    # Functions `package.module:function` every model may call while it answers (greedy, multi-turn: its calls run,
    # their answers are appended, and it goes on); adds tool_calls/, tool_malformed/ and tool_errors/<model>
    tools: list[str] = field(default_factory=list)
    tool_timeout: float = 10.0  # seconds a tool call may take; a slower one answers the model with an error
    max_tool_calls: int = 4  # rounds of calls per answer; then the model's last reply is its answer
    # `package.module:Class` or {factory: ..., args: {...}}: each prompt answered in an instance of its own, reset
    # with its row, its methods as tools; adds env_reward/<model> where it has `get_reward()`
    environment: str | EnvironmentSpec | None = None

    ref_fields = ("models", "reward_model", "extra_reward_models", "baseline", "reference")
    holds_out = False
    scores_models = True

    def check(self) -> list[str]:
        problems = [] if self.models else ["`models` must list at least one model"]
        problems += [f"models: '{m}' is listed twice" for m in sorted({m for m in self.models if self.models.count(m) > 1})]
        if self.reward_model is not None and self.reward_url is not None:
            problems.append("give one of `reward_model` or `reward_url`")
        problems += url_problems(self.reward_url, "reward_url") if self.reward_url is not None else []
        for key in ("baseline", "best_of_n", "extra_reward_models"):
            if getattr(self, key) and self.reward_model is None and self.reward_url is None:
                problems.append(f"{key}: needs `reward_model` or `reward_url` (it judges the responses)")
        problems += [f"extra_reward_models: '{m}' is listed twice, or is the stage's reward_model"
                     for m in sorted({m for m in self.extra_reward_models
                                      if self.extra_reward_models.count(m) > 1 or m == self.reward_model})]
        for sampled in (self.best_of_n, self.pass_at_k):
            problems += sampled.check() if sampled is not None else []
        if self.dataset.eval is not None:
            problems.append("dataset.eval: an eval stage scores every row of `dataset`; list held-out files as its sources")
        problems += self.judge.check() if self.judge else []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens: must be at least 1, got {self.max_new_tokens}")
        return problems + answer_extractor_problems(self.answer_extractor) + self.tool_use_problems()

    def tool_use_problems(self) -> list[str]:
        if not self.tools and not self.environment:
            return []
        problems = tool_problems(self.tools) + environment_problems(self.environment)
        acting = "tools" if self.tools else "environment"
        problems += [f"{acting}: {key} samples without tools; not with `{acting}` yet" for key in
                     ("best_of_n", "pass_at_k", "reference") if getattr(self, key) is not None]
        if self.tool_timeout <= 0:
            problems.append(f"tool_timeout: must be > 0 seconds, got {self.tool_timeout}")
        if self.max_tool_calls < 1:
            problems.append(f"max_tool_calls: must be >= 1, got {self.max_tool_calls}")
        return problems

    def prompt_models(self) -> list[str]:
        return list(dict.fromkeys(self.models + ([self.baseline] if self.baseline else [])))

    def reward_terms(self) -> list[RewardTermSpec]:
        served = [RewardTermSpec(reward_url=self.reward_url)] if self.reward_url else []
        return served + ([RewardTermSpec(judge=self.judge)] if self.judge else [])

    def formats(self) -> dict[str, tuple[str, ...]]:
        answers = ("answer",) if self.pass_at_k else ()  # pass@k counts correct samples; the rest scores without
        name = "prompts with answers" if answers else "prompts (answer optional)"
        given = {name: ("prompt",) + answers + ((self.reference_column,) if self.reference_column else ())}
        # Open-ended prompts may come from public formats (HH-RLHF transcripts, Alpaca rows), with their reply as
        # the reference `completion`
        return given if answers or self.reference_column else given | DERIVED_PROMPT_FORMATS

    @classmethod
    def headline(cls, metrics: dict[str, float]) -> str:
        """`accuracy sft 0.45, grpo 0.66; pass@8 sft 0.9; reward sft 1.5; win rate grpo 0.6; KL grpo 0.2`: pass@k
        beside the greedy accuracy it bounds; win rate and KL carry open-ended evaluations, which have no accuracy."""
        greedy: dict[str, list[str]] = {"accuracy": [], "reward": [], "judge": [], "win_rate": [], "kl": []}
        passes: dict[str, list[str]] = {}
        for key, value in metrics.items():
            family, _, label = key.partition("/")
            model, _, variant = label.partition("@")
            if family in greedy and not variant:
                greedy[family].append(f"{model} {value:.3g}")
            elif family == "accuracy" and variant.startswith("pass"):
                passes.setdefault(sampled_name(variant), []).append(f"{model} {value:.3g}")
        groups = {"accuracy": greedy["accuracy"], **passes, "reward": greedy["reward"], "judge": greedy["judge"],
                  "win rate": greedy["win_rate"], "KL": greedy["kl"]}
        return "; ".join(f"{name} " + ", ".join(values) for name, values in groups.items() if values)


STAGE = StageType("eval", EvalSpec, "pipeline.stages.eval")
