"""`eval` stage: score models on held-out prompts, open-ended or with checkable answers.

For each model in `models` (a stage, local folder or Hub id; LoRA adapters are merged into their base):

- `accuracy/<m>`: exact match of the answer stated in the greedy response, over the rows with a non-empty
  `answer` (none without one: open-ended prompts are scored by reward, win rate and KL);
- `reward/<m>`: mean reward-model score of the greedy responses (`reward_model`, or served: `reward_url`);
- `judge/<m>`: mean expected rating of the greedy responses by an LLM `judge` (loaded here, or served);
- `win_rate/<m>`: greedy responses against the baseline's on the same prompts, judged by the reward model
  (ties count half);
- `reward_<r>/<m>`, `win_rate_<r>/<m>`: the same greedy responses scored by each of `extra_reward_models` (<r>: its
  name), a second opinion that costs a scoring pass, not another generation;
- `kl/<m>`: KL(m || reference), estimated from one response per prompt sampled from m at temperature 1:
  the mean over responses of sum_t log p_m(y_t) - log p_ref(y_t) (greedy responses would bias it);
- `perplexity/<m>`: of the reference completions, where the rows have them;
- `accuracy/<m>@bon<N>`, `reward/<m>@bon<N>`: best-of-N, the reward model's pick among N samples.
- `accuracy/<m>@pass<k>`: pass@k, the chance that k samples hold at least one correct answer (what RL can
  collect beyond greedy), estimated without bias from n >= k samples per prompt (Chen et al. 2021).
- with `tools`, every greedy response is a conversation with them (`pipeline.models.tool_use`), answers read from
  the model's own turns, and `tool_calls/<m>`, `tool_malformed/<m>`, `tool_errors/<m>` are per-answer means of the
  calls made, of the replies whose call could not be read (or named no tool), and of the calls that answered an error.
- with an `environment`, each prompt is answered in an environment of its own, reset with its row, whose methods
  are tools as above; `env_reward/<m>` is the mean of its `get_reward()` after each answer, where it has one.

Under `accelerate launch` each process scores its share of the prompts and the results are gathered:
the greedy metrics equal a single process's; the sampled ones (`kl`, best-of-N, pass@k) draw from each process's
random stream, so they vary with the process count as with the seed.

Computations `evaluate` can express are local `evaluate` modules (`pipeline/metrics/`). Greedy responses
to the first `num_samples_table` prompts are saved to `samples.json` in the output folder for the report (with
tools, each with its `turns`: the model's replies, their calls and the tools' answers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from accelerate import PartialState
from datasets import Dataset

from pipeline.config.paths import resolve_local
from pipeline.data.answers import AnswerCheck, answer_check, reference_answer
from pipeline.data.formats import as_prompts
from pipeline.data.loading import DataError, require_columns
from pipeline.data.prompts import alpaca_templates, as_model_prompt
from pipeline.metrics import load_metric
from pipeline.models.decoding import generate, generate_ids, prompt_text, response_logprobs
from pipeline.models.environments import environment_factory, episode_reward, episodes
from pipeline.models.loading import load_causal_lm, load_tokenizer
from pipeline.models.judges import LocalJudge, RemoteJudge, judge_scorer
from pipeline.models.remote import RemoteRewardScorer
from pipeline.models.tool_use import generate_with_tools
from pipeline.models.tools import load_tools
from pipeline.models.reward_functions import RewardModelScorer
from pipeline.models.sampling import first_stop, stop_token_ids
from pipeline.runtime.distributed import map_shards
from pipeline.stages.context import StageContext
from pipeline.stages.specs.eval import EvalSpec
from pipeline.training.length_checks import check_prompt_lengths


def reference_pairs(tokenizer, prompts: list[Any], completions: list[Any],
                    stops: list[int]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) as the model would see them after generation (plain-text prompts rendered as
    `pipeline.data.prompts.as_model_prompt` says): chat through the template, completion up to and including its
    first stop id (`pipeline.models.sampling.stop_token_ids`: where generation would have ended); plain strings
    with an EOS appended."""
    pairs = []
    for prompt, completion in zip(prompts, completions):
        prompt = as_model_prompt(tokenizer, prompt)
        if isinstance(prompt, list):
            reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": str(completion)}]
            head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
            head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
            full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            shared = next((i for i, (a, b) in enumerate(zip(head_ids, full_ids)) if a != b), len(head_ids))
            tail = full_ids[shared:]
            pairs.append((full_ids[:shared], first_stop(tail, stops)))  # not what the template adds after it
        else:
            text = completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
            tail = tokenizer(text, add_special_tokens=False)["input_ids"]
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            pairs.append((tokenizer(prompt, add_special_tokens=False)["input_ids"], tail + eos))
    return pairs


def best_of_n(texts: list[str], scores: list[float], n: int) -> tuple[list[str], list[float]]:
    """Per prompt, the highest-scored of its `n` consecutive candidates (the first one on ties)."""
    picks, best = [], []
    for start in range(0, len(texts), n):
        group = scores[start:start + n]
        i = group.index(max(group))
        picks.append(texts[start + i])
        best.append(group[i])
    return picks, best


def metric_names(refs: list[str], ctx: StageContext) -> dict[str, str]:
    """The name each model goes by in metric keys: a stage or Hub id as written, a local folder or file by its
    own name (`accuracy/my-model`, not the whole path), unless two would share one."""

    names = {ref: ref if ctx.stage_output(ref) is not None or resolve_local(ref, ctx.recipe.path) is None
             else Path(ref).name.removesuffix(".gguf") for ref in refs}
    shared = {name for name in names.values() if list(names.values()).count(name) > 1}
    return {ref: ref if name in shared else name for ref, name in names.items()}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass
class EvalRows:
    """The rows an eval stage scores."""

    prompts: list[Any]  # as people, judges and reward models read them
    answers: list[str]  # "" where a row has no answer to check
    completions: list[Any] | None  # reference completions (perplexity), where the rows have them
    records: list[dict[str, Any]]  # the whole rows: what an environment is reset with
    source: Dataset  # the rows as read, before `as_prompts`

    @property
    def answered(self) -> list[int]:
        return [i for i, answer in enumerate(self.answers) if answer.strip()]

    def for_model(self, tokenizer, where: str) -> list[Any]:
        """The prompts as the model of `tokenizer` was trained on them: Alpaca rows through the templates its SFT
        rendered them by, for a model that takes plain text (`pipeline.data.formats.as_prompts`)."""
        return list(as_prompts(self.source, where, tokenizer)["prompt"]) if alpaca_templates(tokenizer) else self.prompts


@dataclass
class Judges:
    """What every model's responses are measured against, loaded once for all of them."""

    is_correct: AnswerCheck
    reward: RewardModelScorer | RemoteRewardScorer | None  # reward_model or reward_url: reward, win rate, best-of-N
    extra: dict[str, RewardModelScorer]  # extra_reward_models by metric family (`reward_<name>`)
    reference: tuple[Any, Any] | None  # reference: (model, tokenizer) for KL
    judge: LocalJudge | RemoteJudge | None  # judge: its expected rating


def read_rows(spec: EvalSpec, ctx: StageContext, where: str) -> EvalRows:
    source = ctx.rows(spec.dataset)
    require_columns(source, spec.formats(), where)
    rows = as_prompts(source, where)
    prompts = list(rows["prompt"])
    # An empty answer (`answer: ""`, a workaround for open-ended data) is no answer.
    answers = [reference_answer(a) for a in rows["answer"]] if "answer" in rows.column_names else [""] * len(prompts)
    column = spec.reference_column or ("completion" if "completion" in rows.column_names else None)
    return EvalRows(prompts, answers, list(rows[column]) if column else None, rows.to_list(), source)


def load_model(spec: EvalSpec, ctx: StageContext, ref: str) -> tuple[Any, Any]:
    """(model on this process's device, tokenizer): the accelerator under `accelerate launch`, else the CPU."""
    path = ctx.resolve(ref)
    return (load_causal_lm(path, trust_remote_code=spec.trust_remote_code).to(PartialState().device),
            load_tokenizer(path, trust_remote_code=spec.trust_remote_code))


def load_judges(spec: EvalSpec, ctx: StageContext) -> Judges:
    scorer = RewardModelScorer(ctx.resolve(spec.reward_model), batch_size=spec.batch_size) if spec.reward_model \
        else RemoteRewardScorer(spec.reward_url, batch_size=spec.batch_size) if spec.reward_url else None
    extra = {f"reward_{name}": RewardModelScorer(ctx.resolve(ref), batch_size=spec.batch_size)
             for ref, name in metric_names(spec.extra_reward_models, ctx).items()}
    return Judges(answer_check(spec.answer_extractor), scorer, extra,
                  load_model(spec, ctx, spec.reference) if spec.reference else None,
                  judge_scorer(spec.judge, ctx.resolve, batch_size=spec.batch_size,
                               trust_remote_code=spec.trust_remote_code) if spec.judge else None)


def sample(spec: EvalSpec, model, tokenizer, prompts: list[Any], n: int, temperature: float) -> list[str]:
    """`n` sampled responses per prompt, each prompt's consecutive."""
    return generate(model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens,
                    batch_size=max(spec.batch_size // n, 1), do_sample=True, temperature=temperature,
                    num_return_sequences=n)


@dataclass
class Acting:
    """What a model may act with while it answers: the stage's tools, and an environment per prompt."""

    tools: list[Callable[..., str]]
    make_environment: Callable[[], Any] | None


def load_acting(spec: EvalSpec) -> Acting:
    tools, stats = load_tools(spec.tools, spec.tool_timeout)
    return Acting(tools, environment_factory(spec.environment, spec.tool_timeout, stats) if spec.environment else None)


def respond(spec: EvalSpec, acting: Acting, model, tokenizer, rows: EvalRows, share: list[int],
            model_prompts: list[Any]) -> list[dict]:
    """Each prompt's greedy response ({"response"}) to `model_prompts` (`EvalRows.for_model`); with tools or an
    environment, a conversation with them, its tool counts and the environment's reward."""
    prompts = [model_prompts[i] for i in share]
    if not acting.tools and acting.make_environment is None:
        return [{"response": r} for r in generate(model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens,
                                                  batch_size=spec.batch_size)]
    environments, conversations, own_tools = episodes(prompts, [rows.records[i] for i in share], acting.tools,
                                                      acting.make_environment)
    runs = generate_with_tools(model, tokenizer, conversations, own_tools, max_new_tokens=spec.max_new_tokens,
                               max_calls=spec.max_tool_calls, batch_size=spec.batch_size)
    out = [{"response": run.response, "turns": run.messages, "tool_calls": run.calls, "tool_malformed": run.malformed,
            "tool_errors": run.errors} for run in runs]
    for row, reward in zip(out, map(episode_reward, environments)):
        if reward is not None:
            row["env_reward"] = reward
    return out


def per_prompt(spec: EvalSpec, rows: EvalRows, judges: Judges, acting: Acting, model, tokenizer,
               model_prompts: list[Any], share: list[int]) -> list[dict]:
    """One model's results on the prompts `share` (this process's part of them), one dict per prompt: generated
    from `model_prompts` (as the model was trained on them), scored on the prompts as judges read them."""
    if not share:
        return []
    mine, theirs = [rows.prompts[i] for i in share], [model_prompts[i] for i in share]
    out = add_reward_scores(judges, mine, respond(spec, acting, model, tokenizer, rows, share, model_prompts))
    if judges.judge is not None:
        for row, rating in zip(out, judges.judge(mine, [row["response"] for row in out])):
            row["judge"] = rating
    if judges.reference is not None:
        sampled = generate_ids(model, tokenizer, theirs, max_new_tokens=spec.max_new_tokens,
                               batch_size=spec.batch_size, do_sample=True, temperature=1.0)
        for row, logp, ref_logp in zip(out, response_logprobs(model, sampled, spec.batch_size),
                                       response_logprobs(judges.reference[0], sampled, spec.batch_size)):
            row.update(logp=logp, ref_logp=ref_logp)
    if rows.completions is not None:
        pairs = reference_pairs(tokenizer, theirs, [rows.completions[i] for i in share], stop_token_ids(model, tokenizer))
        for row, logp in zip(out, response_logprobs(model, pairs, spec.batch_size)):
            row["completion_logp"] = logp
    if spec.best_of_n is not None:
        n = spec.best_of_n.n
        candidates = sample(spec, model, tokenizer, theirs, n, spec.best_of_n.temperature)
        picks, best = best_of_n(candidates, judges.reward([p for p in mine for _ in range(n)], candidates), n)
        for row, pick, score in zip(out, picks, best):
            row.update(bon_pick=pick, bon_score=score)
    if spec.pass_at_k is not None:
        n = spec.pass_at_k.samples
        candidates = sample(spec, model, tokenizer, theirs, n, spec.pass_at_k.temperature)
        for j, (row, i) in enumerate(zip(out, share)):
            row["pass_correct"] = sum(judges.is_correct(c, rows.answers[i]) for c in candidates[j * n:(j + 1) * n])
    return out


def reward_scorers(judges: Judges) -> dict[str, RewardModelScorer | RemoteRewardScorer]:
    """Every reward model by metric family: `reward` for the stage's own, `reward_<name>` for the extra ones."""
    return ({"reward": judges.reward} if judges.reward is not None else {}) | judges.extra


def add_reward_scores(judges: Judges, prompts: list[Any], out: list[dict]) -> list[dict]:
    """`out` (one dict per prompt, with its `response`), each with every reward model's score under its family."""
    responses = [row["response"] for row in out]
    for family, scorer in reward_scorers(judges).items():
        for row, score in zip(out, scorer(prompts, responses)):
            row[family] = score
    return out


def model_metrics(spec: EvalSpec, label: str, rows: EvalRows, results: list[dict],
                  reward_families: list[str]) -> dict[str, float]:
    """One model's `<metric>/<label>` values from its per-prompt results (every process's, gathered)."""
    answered, metrics = rows.answered, {}

    def accuracy(key: str) -> float:
        return load_metric("exact_match").compute(
            predictions=[results[i][key] for i in answered], references=[rows.answers[i] for i in answered],
            answer_extractor=spec.answer_extractor)["exact_match"]
    if answered:
        metrics[f"accuracy/{label}"] = accuracy("response")
    for family in reward_families:
        metrics[f"{family}/{label}"] = mean([row[family] for row in results])
    if spec.judge is not None:
        metrics[f"judge/{label}"] = mean([row["judge"] for row in results])
    if spec.tools or spec.environment:  # per answer
        for key in ("tool_calls", "tool_malformed", "tool_errors"):
            metrics[f"{key}/{label}"] = mean([row[key] for row in results])
    if results and "env_reward" in results[0]:
        metrics[f"env_reward/{label}"] = mean([row["env_reward"] for row in results])
    if spec.reference is not None:
        metrics[f"kl/{label}"] = load_metric("sequence_kl").compute(
            predictions=[row["logp"] for row in results], references=[row["ref_logp"] for row in results])["kl"]
    if rows.completions is not None:
        metrics[f"perplexity/{label}"] = load_metric("perplexity").compute(
            predictions=[row["completion_logp"] for row in results])["perplexity"]
    if spec.best_of_n is not None:
        n = spec.best_of_n.n
        if answered:
            metrics[f"accuracy/{label}@bon{n}"] = accuracy("bon_pick")
        metrics[f"reward/{label}@bon{n}"] = mean([row["bon_score"] for row in results])
    if spec.pass_at_k is not None and answered:
        k, n = spec.pass_at_k.k, spec.pass_at_k.samples
        metrics[f"accuracy/{label}@pass{k}"] = load_metric("pass_at_k").compute(
            predictions=[results[i]["pass_correct"] for i in answered], references=[n] * len(answered),
            k=k)["pass_at_k"]
    return metrics


@dataclass
class Judged:
    """One model's greedy responses, every prompt's, and their scores by reward family."""

    responses: list[str]
    scores: dict[str, list[float]]

    def against(self, baseline: Judged, family: str) -> list[float]:
        """This model's scores, with the baseline's where both wrote the same response: a tie, not a float's
        last bits (a response is scored in a batch of similar lengths, and batches differ between models)."""
        return [theirs if mine == same else score for score, theirs, mine, same in
                zip(self.scores[family], baseline.scores[family], self.responses, baseline.responses)]


def win_rates(spec: EvalSpec, ctx: StageContext, rows: EvalRows, judges: Judges, acting: Acting,
              judged: dict[str, Judged], named: dict[str, str]) -> dict[str, float]:
    """`win_rate/<model>` (and `win_rate_<r>/<model>`): each model's greedy responses against the baseline's,
    judged by the reward model (and by each extra one)."""
    if spec.baseline not in judged:  # the baseline is not among the models: its greedy responses scored here
        model, tokenizer = load_model(spec, ctx, spec.baseline)
        baseline_prompts = rows.for_model(tokenizer, f"stage '{spec.name}'")

        def baseline_results(share: list[int]) -> list[dict[str, Any]]:
            if not share:
                return []
            return add_reward_scores(judges, [rows.prompts[i] for i in share],
                                     respond(spec, acting, model, tokenizer, rows, share, baseline_prompts))
        results = map_shards(list(range(len(rows.prompts))), baseline_results)
        judged[spec.baseline] = Judged([row["response"] for row in results],
                                       {family: [row[family] for row in results] for family in reward_scorers(judges)})
    win_rate, baseline = load_metric("win_rate"), judged[spec.baseline]
    return {f"{family.replace('reward', 'win_rate', 1)}/{named[ref]}": win_rate.compute(
                predictions=judged[ref].against(baseline, family), references=baseline.scores[family])["win_rate"]
            for ref in spec.models if ref != spec.baseline for family in judged[ref].scores}


def run(spec: EvalSpec, ctx: StageContext) -> dict[str, float]:
    where = f"stage '{spec.name}'"
    rows = read_rows(spec, ctx, where)
    judges = load_judges(spec, ctx)
    acting = load_acting(spec)
    named = metric_names(list(dict.fromkeys(spec.models + ([spec.baseline] if spec.baseline else []))), ctx)
    metrics: dict[str, float] = {}
    judged: dict[str, Judged] = {}
    shown = range(min(spec.num_samples_table, len(rows.prompts)))
    table = [{"prompt": prompt_text(rows.prompts[i]), "answer": rows.answers[i] or None, "responses": {}} for i in shown]

    for ref in spec.models:
        model, tokenizer = load_model(spec, ctx, ref)
        model_prompts = rows.for_model(tokenizer, where)
        check_prompt_lengths(model.config, tokenizer, model_prompts, spec.max_new_tokens, f"{where}, model '{ref}'",
                             "prompts", "max_new_tokens")
        if judges.reference is not None and judges.reference[1].get_vocab() != tokenizer.get_vocab():
            raise DataError(f"{where}: KL needs the same tokenizer, and '{ref}' and '{spec.reference}' differ")
        # Each process scores its share of the prompts; every process gets all the results (pipeline.runtime.distributed).
        results = map_shards(list(range(len(rows.prompts))),
                             partial(per_prompt, spec, rows, judges, acting, model, tokenizer, model_prompts))
        families = list(reward_scorers(judges))
        metrics |= model_metrics(spec, named[ref], rows, results, families)
        judged[ref] = Judged([row["response"] for row in results],
                             {family: [row[family] for row in results] for family in families})
        for i, row in zip(shown, table):
            response, answer = results[i]["response"], rows.answers[i]
            row["responses"][named[ref]] = {"response": response, "reward": results[i].get("reward"),
                                            "correct": judges.is_correct(response, answer) if answer.strip() else None}
            if "turns" in results[i]:  # with tools: the whole conversation, calls and the tools' answers
                row["responses"][named[ref]]["turns"] = results[i]["turns"]
        del model

    if spec.baseline is not None:
        metrics |= win_rates(spec, ctx, rows, judges, acting, judged, named)
    if ctx.is_main_process:
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        (ctx.output_dir / "samples.json").write_text(json.dumps(
            {"models": [named[ref] for ref in spec.models], "baseline": named.get(spec.baseline), "rows": table},
            indent=1))
    return metrics
