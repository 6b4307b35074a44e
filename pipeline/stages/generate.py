"""`generate` stage: collect preference data from a policy (RLAIF; on-policy DPO in iterated rounds).

Sample `num_samples` responses per prompt at `temperature`, score each with the weighted `rewards`
(reward-model stages, rule functions such as `exact_match`) and/or an LLM `judge`, and write to the
output folder:

- `pairwise.jsonl`: `prompt`, `chosen`, `rejected`, `score_chosen`, `score_rejected` (+ the row's other columns);
  `best_worst` keeps one pair per prompt (top vs bottom score), `all` every pair whose margin exceeds `min_margin`;
- `listwise.jsonl`: `prompt`, `responses` (best first), `scores`;
- `data.jsonl`: a copy of one of them (`output_format`), which `reward`/`dpo` stages read when their dataset
  `path` names this stage.

Under `accelerate launch` each process samples and scores its share of the prompts; the main process writes
all of them, in prompt order. Responses to chat prompts are written as assistant messages, so the pairs match the prompt's format.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from accelerate import PartialState
from datasets import Dataset

from pipeline.data.answers import answer_check, reference_answer
from pipeline.data.loading import DataError, require_columns, require_reward_columns
from pipeline.models.decoding import completion_text, generate
from pipeline.models.loading import load_causal_lm, load_tokenizer
from pipeline.models.reward_functions import build_reward_terms
from pipeline.runtime.distributed import map_shards
from pipeline.stages.context import StageContext
from pipeline.stages.specs.generate import GenerateSpec
from pipeline.training.length_checks import check_prompt_lengths

OUTPUT_KEYS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected", "responses", "scores")


def make_pairs(responses: list[Any], scores: list[float], mode: str, min_margin: float) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs among one prompt's responses."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: earlier sample first on ties
    if mode == "best_worst":
        candidates = [(order[0], order[-1])]
    else:
        candidates = list(itertools.combinations(order, 2))
    return [(c, r) for c, r in candidates if scores[c] - scores[r] > min_margin and responses[c] != responses[r]]


def sample_responses(spec: GenerateSpec, ctx: StageContext, prompts: list[Any]) -> list[str]:
    """`num_samples` sampled responses to each prompt, each prompt's consecutive. Each process samples its share
    of the prompts and every process gets all of them (pipeline.runtime.distributed)."""
    k = spec.num_samples
    path = ctx.resolve(spec.model)
    # this process's accelerator under `accelerate launch`, else the CPU
    model = load_causal_lm(path, trust_remote_code=spec.trust_remote_code).to(PartialState().device)
    tokenizer = load_tokenizer(path, trust_remote_code=spec.trust_remote_code)
    check_prompt_lengths(model.config, tokenizer, prompts, spec.max_new_tokens, f"stage '{spec.name}'", "prompts",
                         "max_new_tokens")

    def sample(share: list[int]) -> list[list[str]]:
        texts = generate(model, tokenizer, [prompts[i] for i in share], max_new_tokens=spec.max_new_tokens,
                         batch_size=max(spec.batch_size // k, 1), do_sample=True, temperature=spec.temperature,
                         num_return_sequences=k) if share else []
        return [texts[j * k:(j + 1) * k] for j in range(len(share))]
    return [text for group in map_shards(list(range(len(prompts))), sample) for text in group]


def score_responses(spec: GenerateSpec, ctx: StageContext, rows: Dataset, completions: list[Any]) -> list[float]:
    """The weighted score of every response (`rewards`, plus the judge's rating with its weight), each process
    scoring its share of the prompts."""
    k, prompts = spec.num_samples, list(rows["prompt"])
    functions, weights, _ = build_reward_terms(spec.reward_terms(), ctx.resolve, answer_check(spec.answer_extractor))

    def score(share: list[int]) -> list[list[float]]:
        if not share:
            return []
        # Scored the way TRL reward functions are called: repeated prompts, each row's columns alongside.
        subset = rows.select(share)
        flat_prompts = [prompts[i] for i in share for _ in range(k)]
        mine = [j * k + s for j in share for s in range(k)]
        columns = {c: [v for v in subset[c] for _ in range(k)] for c in rows.column_names if c != "prompt"}
        total = [0.0] * len(mine)
        for function, weight in zip(functions, weights):
            scores = function(flat_prompts, [completions[j] for j in mine], **columns)
            total = [t + weight * float(s) for t, s in zip(total, scores)]
        return [total[j * k:(j + 1) * k] for j in range(len(share))]
    return [value for group in map_shards(list(range(len(prompts))), score) for value in group]


def preference_data(spec: GenerateSpec, rows: Dataset, completions: list[Any], total: list[float]
                    ) -> tuple[list[dict], list[dict], int]:
    """(pairwise rows, listwise rows, how many prompts gave a pair); each row keeps its source row's other columns."""
    k = spec.num_samples
    pairwise, listwise, paired_rows = [], [], 0
    for i, row in enumerate(rows):
        extra = {key: value for key, value in row.items() if key not in OUTPUT_KEYS}
        responses, scores = completions[i * k:(i + 1) * k], total[i * k:(i + 1) * k]
        pairs = make_pairs(responses, scores, spec.pairs, spec.min_margin)
        paired_rows += bool(pairs)
        for c, r in pairs:
            pairwise.append({"prompt": row["prompt"], "chosen": responses[c], "rejected": responses[r],
                             "score_chosen": scores[c], "score_rejected": scores[r], **extra})
        order = sorted(range(k), key=lambda j: -scores[j])
        listwise.append({"prompt": row["prompt"], "responses": [responses[j] for j in order],
                         "scores": [scores[j] for j in order], **extra})
    return pairwise, listwise, paired_rows


def label_metrics(spec: GenerateSpec, rows: Dataset, texts: list[str], total: list[float], pairwise: list[dict],
                  paired_rows: int) -> dict[str, float]:
    """How many pairs, how far apart, how varied the samples; with answers, how often the labels agree with them."""
    k = spec.num_samples
    margins = [pair["score_chosen"] - pair["score_rejected"] for pair in pairwise]
    metrics = {"prompts": float(len(rows)), "pairs": float(len(pairwise)), "pair_rate": paired_rows / len(rows),
               "mean_score": sum(total) / len(total), "mean_margin": sum(margins) / len(margins),
               "distinct_responses": sum(len(set(texts[i * k:(i + 1) * k])) for i in range(len(rows))) / len(texts)}
    if "answer" in rows.column_names:  # over the rows that have one (`reference_answer`)
        is_correct = answer_check(spec.answer_extractor)
        answers = list(rows["answer"])
        answered = [j for j in range(len(texts)) if reference_answer(answers[j // k])]
        pairs = [p for p in pairwise if reference_answer(p["answer"])]
        if answered:
            metrics["sample_accuracy"] = sum(is_correct(texts[j], answers[j // k]) for j in answered) / len(answered)
        for side in ("chosen", "rejected"):
            if pairs:
                metrics[f"{side}_accuracy"] = sum(is_correct(completion_text(p[side]), p["answer"])
                                                  for p in pairs) / len(pairs)
    return metrics


def run(spec: GenerateSpec, ctx: StageContext) -> dict[str, float]:
    where = f"stage '{spec.name}'"
    rows = ctx.rows(spec.dataset)
    require_columns(rows, spec.formats(), where)
    require_reward_columns(spec.rewards, rows.column_names, where)
    k, prompts = spec.num_samples, list(rows["prompt"])
    texts = sample_responses(spec, ctx, prompts)
    # Responses to chat prompts are assistant messages, as the pairs' prompts are chat
    completions = [[{"role": "assistant", "content": t}] if isinstance(prompts[j // k], list) else t
                   for j, t in enumerate(texts)]
    total = score_responses(spec, ctx, rows, completions)
    pairwise, listwise, paired_rows = preference_data(spec, rows, completions, total)
    if not pairwise:
        raise DataError(f"{where}: no preference pairs: for every prompt the {k} samples scored within "
                        f"min_margin={spec.min_margin} of each other; raise temperature or num_samples")
    metrics = label_metrics(spec, rows, texts, total, pairwise, paired_rows)
    if ctx.is_main_process:
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        for name, data in (("pairwise", pairwise), ("listwise", listwise)):
            text = "".join(json.dumps(item) + "\n" for item in data)
            (ctx.output_dir / f"{name}.jsonl").write_text(text)
            if name == spec.output_format:
                (ctx.output_dir / "data.jsonl").write_text(text)
    return metrics
