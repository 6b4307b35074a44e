"""The recipe's building blocks as typed dataclasses: datasets, the stage contract (`StageSpec`) and the
parts several stage types share (reward terms, answer extractors, LoRA quantization, Hub push).

Plain data: nothing here imports an ML library. Each stage type's own spec lives in its module in
`pipeline.stages`, next to the code that runs it.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.config.paths import HUB_ID, callable_problems
from pipeline.config.schema import suggest


def url_problems(url: str, key: str) -> list[str]:
    """An http(s) URL with a host, as a served model's address must be."""
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # raises on a port that is not a number in range
    except ValueError:
        return [f"{key}: '{url}' has no valid port"]
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [f"{key}: '{url}' is not an http:// or https:// URL with a host"]
    return []


# ----------------------------------------------------------------------------- data specs
@dataclass(kw_only=True)
class SourceSpec:
    """One dataset source: a local file or a Hub dataset id."""

    path: str  # .jsonl/.json/.parquet/.csv file, a Hub dataset id, or the name of a data-producing stage
    name: str | None = None  # Hub dataset configuration
    data_dir: str | None = None  # a folder of a Hub dataset's repository (Anthropic/hh-rlhf's subsets: harmless-base)
    split: str = "train"  # split to read from a Hub dataset or local file
    columns: dict[str, str] = field(default_factory=dict)  # rename columns {old: new}
    weight: float = 1.0  # in a mixture: fraction of this source's rows to take (>1 repeats rows)
    max_samples: int | None = None  # cap on rows read from this source

@dataclass(kw_only=True)
class DatasetSpec:
    """Training data (one source or a weighted mixture) and where the held-out split comes from."""

    sources: list[SourceSpec]
    test_size: float = 0.1  # held-out fraction (< 1) or number of rows (>= 1), split off with the recipe seed
    eval: SourceSpec | None = None  # explicit held-out source; replaces the split when given
    # Held-out rows a training stage evaluates on, before and after training (default: all it holds out); 0: no
    # held-out evaluation, and no rows held out. The training rows are as `test_size` says whatever N is.
    eval_samples: int | None = None


# ---------------------------------------------------------------------------- stage specs
@dataclass(kw_only=True)
class StageSpec:
    """The stage contract: what every stage type declares, with the defaults most types keep.

    A stage type is a subclass (its recipe keys as fields) registered in `pipeline.stages` with the
    function that runs it. Everything the runner, validation, report and Hub push need to know about a
    type is read from here, never from its name.
    """

    name: str
    type: str
    trust_remote_code: bool = False  # run code a model or tokenizer ships in its repo; off unless a recipe asks

    ref_fields: ClassVar[tuple[str, ...]] = ()  # fields naming another stage, a local folder or a Hub id
    args_class: ClassVar[str | None] = None  # dotted path of the config class `args` are checked against
    # What the output folder holds: "causal-lm" or "seq-cls" weights (loadable, pushable, mergeable), or None
    # (a tokenizer, data, or only metrics).
    model_task: ClassVar[str | None] = None
    continues_adapter: ClassVar[bool] = False  # `peft.adapter: continue` trains an upstream LoRA adapter further
    preference_data: ClassVar[bool] = False  # reads pairwise/pointwise/listwise preferences (pipeline.data.preferences)
    # Chat rows need the tokenizer's chat template; False: rendered as plain text where there is none (reward
    # models on encoders).
    chat_needs_template: ClassVar[bool] = True
    holds_out: ClassVar[bool] = True  # splits `test_size` off its dataset; False: it reads every row (eval, generate)
    scores_models: ClassVar[bool] = False  # its metrics are `<metric>/<model>` for each model it scores (eval)
    zero3_unsupported: ClassVar[str | None] = None  # why the type cannot run under DeepSpeed ZeRO-3, if it cannot
    # trains on responses it samples (online RL): its `args` sampling settings decide what it learns from
    learns_from_own_samples: ClassVar[bool] = False
    # The console and report's key metrics: (label, metric before or None, metric after); a trailing `*`
    # matches every metric with that prefix (one per reward term, say).
    headline_metrics: ClassVar[tuple[tuple[str, str | None, str], ...]] = ()
    # Run health (`pipeline.training.health`): the findings this type is checked for, and the logged or reported
    # name of each quantity they read, by role (`reward`, `entropy`, `pair_accuracy`, ...); absent: not applicable.
    health_checks: ClassVar[tuple[str, ...]] = ()
    health_names: ClassVar[dict[str, str]] = {}

    def check(self) -> list[str]:
        """Problems in this stage's own keys, one line each (cross-stage and library checks run elsewhere)."""
        return []

    def formats(self) -> dict[str, tuple[str, ...]]:
        """Accepted data formats: name -> required columns. Empty: the stage reads no dataset."""
        return {}

    def reward_terms(self) -> list[RewardTermSpec]:
        """The weighted reward terms this stage scores responses with."""
        return []

    def tokenizer_ref(self) -> str | None:
        """The stage, folder or Hub id this stage's tokenizer comes from, if it has one."""
        return None

    def prompt_models(self) -> list[str]:
        """The models this stage generates from given its rows' prompts (`validate` says how they are rendered):
        by default the stage's own model where it reads the `prompts` format."""
        reads_prompts = self.tokenizer_ref() is not None and PROMPT_FORMATS.items() <= self.formats().items()
        return [self.tokenizer_ref()] if reads_prompts else []

    def fresh_model_config(self, tokens: dict[str, Any]) -> Any:
        """The transformers config of the model this stage builds from scratch (None: it loads one), with the
        tokenizer's vocabulary and special token ids in `tokens`."""
        return None

    def refs(self) -> list[tuple[str, str]]:
        """(field, value) for every model/tokenizer reference this stage makes."""
        out: list[tuple[str, str]] = []
        for name in self.ref_fields:
            value = getattr(self, name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str):
                    out.append((name, item))
        out += [("rewards.reward_model", r.reward_model) for r in self.reward_terms() if r.reward_model]
        return out + [(f"rewards.{key}", ref) for r in self.reward_terms() if r.judge for key, ref in r.judge.model_ref()]

    def data_specs(self) -> list[tuple[str, DatasetSpec]]:
        """(field, spec) for every dataset this stage reads."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), DatasetSpec)]

    @classmethod
    def headline(cls, metrics: dict[str, float]) -> str:
        """The key metrics, before -> after where both were measured: `pair accuracy 0.52 -> 0.74`."""
        parts = []
        for label, before, after in cls.headline_metrics:
            prefix = after.removesuffix("*")
            for key in [after] if prefix == after else [k for k in metrics if k.startswith(prefix)]:
                if key not in metrics:
                    continue
                name = label if prefix == after else f"{label} {key.removeprefix(prefix)}"
                was = before.replace("*", key.removeprefix(prefix)) if before else None
                change = f"{metrics[was]:.3g} -> " if was in metrics else ""
                parts.append(f"{name} {change}{metrics[key]:.3g}")
        return ", ".join(parts)


@dataclass(kw_only=True)
class QuantizationSpec:
    """bitsandbytes k-bit loading of the base weights (QLoRA when combined with `peft`)."""

    bits: int = 4  # 4 or 8
    quant_type: str = "nf4"  # 4-bit: nf4 or fp4
    double_quant: bool = True  # 4-bit: quantise the quantisation constants too
    compute_dtype: str | None = None  # default: bfloat16 on GPUs that support it, else float32

ADAPTER_MODES = ("stack", "continue")  # values of `peft.adapter`
LORA_DEFAULTS: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


@dataclass(kw_only=True)
class PeftSpec:
    """LoRA adapters on a stage's model, written flat in a recipe (`peft: {r: 16, lora_alpha: 32, merge: true}`):
    `adapter` and `merge` are the pipeline's keys, every other key a `peft.LoraConfig` field (checked against that
    class by `pipeline validate`)."""

    # What a stage starting from an upstream LoRA adapter does with it: "stack" merges it into its base and trains a
    # fresh adapter on top; "continue" trains that same adapter further (stage types with `continues_adapter`)
    adapter: str = "stack"
    merge: bool | None = None  # save the adapter merged into its base (full weights); null: the stage type's choice
    lora: dict[str, Any] = field(default_factory=dict)  # peft.LoraConfig fields, over LORA_DEFAULTS

    @classmethod
    def fields_from(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The recipe's flat mapping as this class's fields: LoraConfig's keys gathered under `lora`."""
        own = {key: data[key] for key in ("adapter", "merge") if key in data}
        return {**own, "lora": {key: value for key, value in data.items() if key not in own}}

    @property
    def continues(self) -> bool:
        return self.adapter == "continue"

    def merges(self, stage_default: bool) -> bool:
        return self.merge if self.merge is not None else stage_default

    @property
    def target_modules(self) -> Any:
        return self.lora.get("target_modules", LORA_DEFAULTS["target_modules"])

    def lora_config(self, task_type: str):
        """The `peft.LoraConfig` for a model of `task_type` ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")."""
        from peft import LoraConfig  # lazy: the config layer imports no ML library (validate and --help stay fast)

        return LoraConfig(task_type=task_type, **{**LORA_DEFAULTS, **self.lora})

    def check(self) -> list[str]:
        problems = [] if self.adapter in ADAPTER_MODES else [
            f"adapter: must be one of {', '.join(ADAPTER_MODES)}, got {self.adapter!r}"]
        if self.continues:
            problems += [f"{key}: a continued adapter keeps its own LoraConfig; remove this key" for key in self.lora]
        return problems


@dataclass(kw_only=True)
class PushSpec:
    """Upload a finished stage's output and a model card to the Hugging Face Hub (see `pipeline.outputs.hub`)."""

    repo_id: str  # owner/name; the token comes from HF_TOKEN or the saved login, never from the recipe
    private: bool = False  # create the repo as private (an existing repo keeps its visibility)
    revision: str | None = None  # branch to commit to, created if missing; default: the main branch
    merge_adapter: bool = False  # upload a LoRA adapter output merged into its base, as full weights

    def check(self) -> list[str]:
        problems = [] if HUB_ID.match(self.repo_id) else [f"repo_id: '{self.repo_id}' is not a Hub repo id (owner/name)"]
        return problems + ([] if self.revision != "" else ["revision: must be a branch name or left out"])

@dataclass(kw_only=True)
class TrainStageSpec(StageSpec):
    """Keys every model-training stage has."""

    model: str  # a previous stage's name, a local folder, or a Hub id
    dataset: DatasetSpec
    args: dict[str, Any] = field(default_factory=dict)  # fields of the stage's TRL/transformers config
    peft: PeftSpec | None = None  # LoRA adapters: peft.LoraConfig fields, `merge` and `adapter` (see PeftSpec)
    quantization: QuantizationSpec | None = None
    revision: str | None = None  # Hub revision of `model`
    push_to_hub: PushSpec | None = None  # publishing only: not part of the stage's fingerprint
    # Run-health thresholds and `fail_on` (pipeline.config.health.HealthSpec), over `defaults.health`; judging
    # only: not part of the stage's fingerprint
    health: dict[str, Any] = field(default_factory=dict)

    # Which keys of the recipe's `defaults:` reach this stage's config: None, every field of `args_class` (the
    # Trainer configs, where a shared name means the same thing); a tuple, only those named (PPO: its steps are
    # whole rollouts, so Trainer step counts must not become PPO step counts by name).
    shared_defaults: ClassVar[tuple[str, ...] | None] = None
    arg_defaults: ClassVar[dict[str, Any]] = {}  # config values of this stage type, under `defaults:` and `args`

    ref_fields = ("model",)
    model_task = "causal-lm"
    health_checks = ("loss_not_falling", "overfitting")
    health_names = {"loss": "loss", "eval_loss": "eval_loss"}

    def tokenizer_ref(self) -> str | None:
        return self.model

    def config_keys(self) -> dict[str, Any]:
        """Stage keys that set fields of `args_class` (they override `args` and `defaults`)."""
        return {}


PREFERENCE_FORMATS = {
    "pairwise": ("chosen", "rejected"),
    "pointwise": ("prompt", "response", "score"),
    "listwise": ("prompt", "responses"),
}

PROMPT_FORMATS = {"prompts": ("prompt",)}
# Public formats the RL and eval stages also take prompts from (`pipeline.data.formats.as_prompts`): the turns before
# the final reply of an HH-RLHF `chosen` transcript, an Alpaca row's request.
DERIVED_PROMPT_FORMATS = {"hh-rlhf transcripts": ("chosen",), "alpaca": ("instruction", "output")}

# What every online RL stage (grpo, rloo, ppo) is checked for; their loss is no learning signal, their reward is.
RL_HEALTH_CHECKS = ("policy_not_moving", "reward_flat", "reward_falling", "reward_hacking", "held_out_fell",
                    "kl_past_bound", "kl_growing", "entropy_collapse", "responses_truncated", "length_growing",
                    "zero_variance_groups")

JUDGE_TEMPLATE = ("Rate the answer to the question from 1 (wrong or unhelpful) to {scale} (correct and helpful).\n\n"
                  "Question: {prompt}\nAnswer: {response}\n\nReply with one digit.")


@dataclass(kw_only=True)
class JudgeSpec:
    """LLM-as-a-judge: a causal LM prompted (through its chat template, if it has one) to rate a response.

    The score is the expected rating under the judge's next-token distribution over the digits 1..scale
    (as in G-Eval): smoother than one sampled rating, and it never fails to parse. With `base_url` the judge
    is served (`pipeline serve`, vLLM, TGI, llama.cpp's server) and asked through the OpenAI chat-completions
    API for its first token's `top_logprobs`, which give the same expectation (`pipeline.models.judges`).
    """

    model: str  # a stage, local folder or Hub id; with base_url, the name the server knows the model by
    base_url: str | None = None  # an OpenAI-compatible server's API root, e.g. http://judge-node:8000/v1
    prompt: str = JUDGE_TEMPLATE  # what the judge is asked: `{prompt}`, `{response}` and `{scale}` are filled in
    scale: int = 5  # ratings 1..scale; single digits, so at most 9
    weight: float = 1.0  # generate's `judge:` only: its weight among the rewards (a `rewards` entry has its own)
    timeout: float = 60.0  # with base_url: seconds to wait for one rating before asking again
    api_key_env: str = "OPENAI_API_KEY"  # with base_url: the environment variable holding the API key (if any)

    def check(self) -> list[str]:
        problems = [] if 2 <= self.scale <= 9 else [f"judge.scale: must be 2..9 (single-digit ratings), got {self.scale}"]
        try:
            filled = self.prompt.format(prompt="\0p", response="\0r", scale=self.scale)
            if "\0p" not in filled or "\0r" not in filled:
                problems.append("judge.prompt: must contain {prompt} and {response}")
        except (KeyError, IndexError, ValueError) as err:
            problems.append(f"judge.prompt: only {{prompt}}, {{response}} and {{scale}} can be filled in ({err!r}); "
                            "write literal braces as {{ and }}")
        if self.base_url is not None:
            problems += [f"judge.{p}" for p in url_problems(self.base_url, "base_url")]
            problems += [] if self.timeout > 0 else [f"judge.timeout: must be > 0, got {self.timeout}"]
        return problems

    def model_ref(self) -> list[tuple[str, str]]:
        """The judge's model as a reference to check and resolve, when it is loaded here (not served)."""
        return [] if self.base_url else [("judge.model", self.model)]


@dataclass(kw_only=True)
class RewardTermSpec:
    """One weighted reward term. Give exactly one of `reward_model`, `function`, `reward_url` or `judge`."""

    reward_model: str | None = None  # a reward stage, local folder or Hub id: its scalar score
    function: str | None = None  # built-in (exact_match, format) or `package.module:function`
    reward_url: str | None = None  # a served reward model (`pipeline serve`), e.g. http://rm-node:8000
    judge: JudgeSpec | None = None  # an LLM judge's expected rating 1..scale, loaded here or served (`base_url`)
    weight: float = 1.0
    timeout: float = 60.0  # with reward_url: seconds to wait for a batch's scores before retrying

    # The built-in rule rewards (`pipeline.models.reward_functions`) and the dataset columns each reads
    BUILTIN: ClassVar[dict[str, tuple[str, ...]]] = {"exact_match": ("answer",), "format": ()}

    @property
    def columns(self) -> tuple[str, ...]:
        """The dataset columns this term reads from each row (beside the prompt)."""
        return self.BUILTIN.get(self.function or "", ())

    def check(self) -> list[str]:
        if sum(source is not None for source in (self.reward_model, self.function, self.reward_url, self.judge)) != 1:
            return ["each reward needs exactly one of `reward_model`, `function`, `reward_url` or `judge`"]
        if self.judge is not None:
            moved = [] if self.judge.weight == 1.0 else ["judge.weight: give the weight on the reward term, beside `judge`"]
            return moved + self.judge.check()
        if self.reward_url is not None:
            return url_problems(self.reward_url, "reward_url") + (
                [] if self.timeout > 0 else [f"timeout: must be > 0, got {self.timeout}"])
        if self.function is None or self.function in self.BUILTIN:
            return []
        if ":" not in self.function:
            return [f"function: '{self.function}' is not a built-in ({', '.join(self.BUILTIN)})"
                    f"{suggest(self.function, self.BUILTIN)} nor a `package.module:function` path"]
        return [f"function: {p}" for p in callable_problems(self.function)]


@dataclass(kw_only=True)
class AnswerExtractorSpec:
    """How the `exact_match` reward and held-out accuracy read the answer in a response (`pipeline.data.answers`).

    Give one of `regex` or `function`. Without `answer_extractor:` a stage uses the quickstart's rule: the first
    word of the first line, trailing punctuation and a leading "A:" dropped.
    """

    regex: str | None = None  # the first capture group (or the whole match) of the first match; e.g. "####\\s*(\\S+)"
    function: str | None = None  # `package.module:function`, response text -> answer text

    def check(self) -> list[str]:
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
class RewardsSpec:
    """The reward vocabulary of a stage that scores responses (grpo, rloo, ppo, generate), declared once: its keys,
    their defaults and checks, and the dataset columns the terms read. A stage spec lists it before its base
    (`class GRPOSpec(RewardsSpec, TrainStageSpec)`) so that `reward_terms` here wins over `StageSpec`'s."""

    rewards: list[RewardTermSpec] = field(default_factory=list)  # weighted reward models and rule functions
    answer_extractor: AnswerExtractorSpec | None = None  # how `exact_match` and held-out accuracy read an answer

    def reward_terms(self) -> list[RewardTermSpec]:
        return list(self.rewards)

    def reward_problems(self) -> list[str]:
        """Each term's problems (a named function importable and callable) and the answer extractor's."""
        problems = [f"rewards[{i}]: {p}" for i, term in enumerate(self.rewards) for p in term.check()]
        return problems + answer_extractor_problems(self.answer_extractor)
