"""`generate` stage type: its recipe keys."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.specs import DatasetSpec, JudgeSpec, PROMPT_FORMATS, RewardTermSpec, RewardsSpec, StageSpec
from pipeline.stages.contract import StageType


@dataclass(kw_only=True)
class GenerateSpec(RewardsSpec, StageSpec):
    """Collect preference data (RLAIF): sample responses from a policy, score them, write preference pairs.

    The output folder's `data.jsonl` (pairwise by default) is read by any `reward` or `dpo` stage that
    names this stage as its dataset `path`; `pairwise.jsonl` and `listwise.jsonl` are always written too.
    """

    model: str  # the policy: a stage, local folder or Hub id; a LoRA adapter folder is merged into its base
    dataset: DatasetSpec  # prompts (`prompt`; `answer` for the exact_match reward); every row is used
    judge: JudgeSpec | None = None  # LLM-as-a-judge, added to `rewards` with its weight
    num_samples: int = 4  # k responses per prompt
    temperature: float = 1.0
    max_new_tokens: int = 16
    pairs: str = "best_worst"  # best_worst: one pair per prompt, top vs bottom score; all: every pair with a margin
    min_margin: float = 0.0  # a pair needs score(chosen) - score(rejected) > min_margin
    output_format: str = "pairwise"  # what data.jsonl holds: pairwise or listwise (all responses, best first)
    batch_size: int = 64  # prompts per generation batch

    ref_fields = ("model",)
    holds_out = False
    headline_metrics = (("sample exact match", None, "sample_accuracy"),)

    def tokenizer_ref(self) -> str | None:
        return self.model

    def prompt_models(self) -> list[str]:
        return super().prompt_models() + [ref for _, ref in (self.judge.model_ref() if self.judge else [])]

    def reward_terms(self) -> list[RewardTermSpec]:
        judged = [RewardTermSpec(judge=self.judge, weight=self.judge.weight)] if self.judge else []
        return self.rewards + judged

    def check(self) -> list[str]:
        problems = [] if self.rewards or self.judge else ["give `rewards` and/or `judge` to score the responses"]
        problems += self.reward_problems()
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


STAGE = StageType("generate", GenerateSpec, "pipeline.stages.generate")
