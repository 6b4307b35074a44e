"""Run health: whether a training stage learned, and learned the right thing, read from what it logged.

A check reads the stage's log history (Trainer's `log_history`, PPO's per-step rows) and its reported metrics
(held-out numbers before and after), and returns a finding, a dict with `finding` (its name), `metric` (the
logged quantity it is about), `step` and the numbers behind it, or None. A quantity the stage does not log
(a stage type's `health_names` lack the role, or this run did not log it) makes its check not apply: absence
is never a finding. Thresholds are `pipeline.config.health.HealthSpec`.

`HealthWatch` runs the checks while the stage trains (through `training.trainers.HealthCallback`, or a PPO step hook), prints each
finding once, as soon as it shows on at least half the run, and at the end checks the whole run again.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.config.health import HealthSpec
from pipeline.runtime.process import UserError

Finding = dict[str, Any]
Series = list[tuple[float, float]]  # (step, value)


class HealthFailure(UserError, RuntimeError):
    """A finding the recipe's `health.fail_on` names."""

    def __init__(self, message: str, findings: list[Finding]):
        super().__init__(message)
        self.findings = findings


@dataclass
class Evidence:
    """What a stage logged and reported, read by role through its type's `health_names`."""

    history: list[dict[str, Any]]
    metrics: dict[str, float]
    names: dict[str, str]

    def series(self, role: str) -> Series:
        """Every logged (step, value) of the role's quantity, in order; [] when it is not logged."""
        key = self.names.get(role)
        return [(float(row["step"]), float(row[key])) for row in self.history
                if key in row and "step" in row and _number(row[key])]

    def value(self, role: str) -> float | None:
        """The role's reported (end-of-stage) metric."""
        key = self.names.get(role)
        value = self.metrics.get(key) if key else None
        return float(value) if _number(value) else None

    def key(self, role: str) -> str:
        return self.names.get(role, role)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(points: Series) -> float:
    return sum(v for _, v in points) / len(points)


def quarters(points: Series) -> tuple[Series, Series]:
    """(first quarter, last quarter) of the logged points, at least one point each."""
    q = max(len(points) // 4, 1)
    return points[:q], points[-q:]


def first_and_last_quarter(history: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    """`train_<key>_first` and `train_<key>_last`: each logged key's mean over the first and last quarter of the
    rows that log it (a stage's trend in its summary)."""
    trend = {}
    for key in keys:
        values = [(0.0, float(row[key])) for row in history if _number(row.get(key))]
        if values:
            first, last = quarters(values)
            trend |= {f"train_{key}_first": _mean(first), f"train_{key}_last": _mean(last)}
    return trend


def second_half(points: Series) -> Series:
    end = points[-1][0]
    return [p for p in points if p[0] > end / 2] or points[-1:]


def change(points: Series, spec: HealthSpec) -> tuple[float, float, float] | None:
    """(first-quarter mean, last-quarter mean, standard error of their difference) of a logged series, or None with
    fewer than `min_points` points. The noise is the step-to-step spread (differences remove a trend)."""
    if len(points) < spec.min_points:
        return None
    first, last = quarters(points)
    values = [v for _, v in points]
    steps = [b - a for a, b in zip(values, values[1:])]
    noise = statistics.pstdev(steps) / math.sqrt(2)
    return _mean(first), _mean(last), noise * math.sqrt(1 / len(first) + 1 / len(last))


def rising_every_quarter(points: Series) -> list[float] | None:
    """The four quarter means when each is above the one before, else None (fewer than 4 points: None)."""
    if len(points) < 4:
        return None
    n = len(points)
    means = [_mean(points[i * n // 4:(i + 1) * n // 4]) for i in range(4)]
    return means if all(b > a for a, b in zip(means, means[1:])) else None


def finding(name: str, metric: str, points: Series | None = None, **numbers: float) -> Finding:
    step = points[-1][0] if points else None
    return {"finding": name, "metric": metric, "step": int(step) if step is not None else None,
            **{k: round(v, 6) if isinstance(v, float) else v for k, v in numbers.items()}}


def trend(e: Evidence, role: str, spec: HealthSpec, name: str, fires: Callable[[float, float, float], bool],
          **numbers: float) -> Finding | None:
    """A finding on a logged series' change from its first quarter to its last, when `fires(first, last, noise)`."""
    points = e.series(role)
    measured = change(points, spec)
    if measured is None or not fires(*measured):
        return None
    first, last, error = measured
    return finding(name, e.key(role), points, first=first, last=last, noise=error, **numbers)


def below(e: Evidence, role: str, bound: float, name: str, label: str) -> Finding | None:
    """A finding on a reported end-of-stage metric below its bound."""
    value = e.value(role)
    if value is not None and value < bound:
        return finding(name, e.key(role), **{label: value}, bound=bound)
    return None


# ------------------------------------------------------------------------------------------------ checks
def loss_not_falling(e: Evidence, spec: HealthSpec) -> Finding | None:
    return trend(e, "loss", spec, "loss_not_falling",
                 lambda first, last, error: first - last < max(spec.loss_min_drop * abs(first), spec.trend_z * error))


def overfitting(e: Evidence, spec: HealthSpec) -> Finding | None:
    held_out, train = e.series("eval_loss"), e.series("loss")
    if len(held_out) < 2 or not train:
        return None
    best_step, best = min(held_out[:-1], key=lambda p: p[1])
    end = held_out[-1][1]
    train_at_best = [v for s, v in train if s <= best_step] or [train[0][1]]
    if end > best * (1 + spec.overfit_rise) and train[-1][1] < train_at_best[-1]:
        return finding("overfitting", e.key("eval_loss"), held_out, best_eval_loss=best, best_step=best_step,
                       eval_loss=end, train_loss_then=train_at_best[-1], train_loss=train[-1][1])
    return None


def pair_accuracy_near_chance(e: Evidence, spec: HealthSpec) -> Finding | None:
    return below(e, "pair_accuracy", 0.5 + spec.chance_margin, "pair_accuracy_near_chance", "accuracy")


def margin_collapse(e: Evidence, spec: HealthSpec) -> Finding | None:
    return below(e, "margin", spec.min_margin, "margin_collapse", "margin")


def chosen_logp_falling(e: Evidence, spec: HealthSpec) -> Finding | None:
    return trend(e, "chosen_logp", spec, "chosen_logp_falling",
                 lambda first, last, error: first - last > max(spec.chosen_logp_drop, spec.trend_z * error),
                 bound=spec.chosen_logp_drop)


def reward_accuracy_stuck(e: Evidence, spec: HealthSpec) -> Finding | None:
    """Held-out implicit-reward pair accuracy below `min_pair_accuracy`; where no accuracy is logged (KTO), the
    held-out margin below `min_margin`."""
    if e.value("pair_accuracy") is not None:
        return below(e, "pair_accuracy", spec.min_pair_accuracy, "reward_accuracy_stuck", "accuracy")
    return below(e, "margin", spec.min_margin, "reward_accuracy_stuck", "margin")


def policy_not_moving(e: Evidence, spec: HealthSpec) -> Finding | None:
    kl, clip = e.series("movement_kl"), e.series("movement_clip")
    if len(kl) < spec.min_points:
        return None
    kl_mean = _mean(second_half(kl))
    clip_mean = _mean(second_half(clip)) if clip else 0.0
    if kl_mean < spec.still_kl and clip_mean < spec.still_clip:
        numbers = {e.key("movement_kl"): kl_mean, **({e.key("movement_clip"): clip_mean} if clip else {})}
        return finding("policy_not_moving", e.key("movement_kl"), kl, **numbers, bound=spec.still_kl)
    return None


def reward_falling(e: Evidence, spec: HealthSpec) -> Finding | None:
    """The sampled reward fell by more than twice `trend_z` standard errors: twice, because its remedy (a smaller
    step) is the opposite of a flat reward's, so a noisy flat run must not read as falling."""
    return trend(e, "reward", spec, "reward_falling",
                 lambda first, last, error: first - last > 2 * spec.trend_z * error)


def reward_flat(e: Evidence, spec: HealthSpec) -> Finding | None:
    """Neither rising beyond its noise nor falling (that is `reward_falling`)."""
    return trend(e, "reward", spec, "reward_flat", lambda first, last, error:
                 last - first <= spec.trend_z * error and first - last <= 2 * spec.trend_z * error)


def reward_hacking(e: Evidence, spec: HealthSpec) -> Finding | None:
    """A reward rose (the training reward, or a term's held-out score) while held-out accuracy, or the held-out
    score of another reward term (an independent scorer), fell by at least `hacking_accuracy_drop`."""
    m = e.metrics
    terms = {key: (m.get(f"initial_{key}"), m[key]) for key in m if key.startswith("eval_reward/")}
    held_out = {"eval_accuracy": (m.get("initial_eval_accuracy"), m.get("eval_accuracy")), **terms}
    fell = {k: ab for k, ab in held_out.items() if _number(ab[0]) and _number(ab[1])
            and ab[0] - ab[1] >= spec.hacking_accuracy_drop}
    rewards = {"train_reward": (m.get("train_reward_first"), m.get("train_reward_last")), **terms}
    rose = {k: ab for k, ab in rewards.items() if _number(ab[0]) and _number(ab[1]) and ab[1] > ab[0]}
    if not fell or not set(rose) - set(fell):
        return None
    up, down = next(k for k in rose if k not in fell), next(iter(fell))
    return finding("reward_hacking", up, **{f"{up}_before": rose[up][0], f"{up}_after": rose[up][1],
                                            f"{down}_before": fell[down][0], f"{down}_after": fell[down][1]})


def held_out_fell(e: Evidence, spec: HealthSpec) -> Finding | None:
    """Held-out accuracy fell by at least `hacking_accuracy_drop` while no reward rose (when one rose, that is
    `reward_hacking`): the stage's output is worse than its input."""
    m = e.metrics
    before, after = m.get("initial_eval_accuracy"), m.get("eval_accuracy")
    if not (_number(before) and _number(after)) or before - after < spec.hacking_accuracy_drop:
        return None
    if reward_hacking(e, spec) is not None:
        return None
    return finding("held_out_fell", "eval_accuracy", eval_accuracy_before=before, eval_accuracy_after=after,
                   bound=spec.hacking_accuracy_drop)


def response_kl(e: Evidence) -> tuple[str, Series]:
    """(logged name, KL to the reference in nats per response): logged so (PPO), or per token times the mean
    length (TRL)."""
    if "kl" in e.names:
        return e.key("kl"), e.series("kl")
    lengths = dict(e.series("length"))
    return e.key("kl_per_token"), [(s, v * lengths[s]) for s, v in e.series("kl_per_token") if s in lengths]


def kl_past_bound(e: Evidence, spec: HealthSpec) -> Finding | None:
    key, points = response_kl(e)
    if len(points) < spec.min_points:
        return None
    last = _mean(quarters(points)[1])
    if last > spec.max_kl:
        return finding("kl_past_bound", key, points, kl_per_response=last, bound=spec.max_kl)
    return None


def kl_growing(e: Evidence, spec: HealthSpec) -> Finding | None:
    key, points = response_kl(e)
    means = rising_every_quarter(points) if len(points) >= spec.min_points else None
    if means and means[3] > spec.kl_growing_from:
        return finding("kl_growing", key, points, quarter_means=[round(m, 4) for m in means], bound=spec.kl_growing_from)
    return None


def entropy_collapse(e: Evidence, spec: HealthSpec) -> Finding | None:
    points = e.series("entropy")
    if len(points) < spec.min_points:
        return None
    first, last = (_mean(q) for q in quarters(points))
    if first > 0 and last < spec.min_entropy_ratio * first:
        return finding("entropy_collapse", e.key("entropy"), points, first=first, last=last,
                       bound=spec.min_entropy_ratio)
    return None


def truncated_share(e: Evidence) -> tuple[str, Series]:
    """(logged name, share of responses cut at the token limit): logged so (TRL), or 1 - the share that ended
    with EOS (PPO). With tools, TRL's share leaves out the completions it ended on a call whose answer it dropped
    for the token (or turn) limit; they are added where logged (`tool_call_unanswered`)."""
    if "truncated" not in e.names:
        return e.key("finished"), [(s, 1.0 - v) for s, v in e.series("finished")]
    unanswered = dict(e.series("tool_unanswered"))
    if not unanswered:
        return e.key("truncated"), e.series("truncated")
    return (f"{e.key('truncated')} + {e.key('tool_unanswered')}",
            [(s, v + unanswered.get(s, 0.0)) for s, v in e.series("truncated")])


def responses_truncated(e: Evidence, spec: HealthSpec) -> Finding | None:
    key, points = truncated_share(e)
    if len(points) < spec.min_points:
        return None
    share = _mean(quarters(points)[1])
    if share > spec.max_truncated:
        return finding("responses_truncated", key, points, truncated_share=share, bound=spec.max_truncated)
    return None


def length_growing(e: Evidence, spec: HealthSpec) -> Finding | None:
    points = e.series("length")
    means = rising_every_quarter(points) if len(points) >= spec.min_points else None
    if means and means[3] >= spec.length_growth * means[0] and not grown_by_tool_calls(e, means[3] / means[0]):
        return finding("length_growing", e.key("length"), points, quarter_means=[round(m, 3) for m in means],
                       bound=spec.length_growth)
    return None


def grown_by_tool_calls(e: Evidence, length_growth: float) -> bool:
    """Whether tool calls per response grew at least as much as the length: a policy learning to call a tool
    writes longer responses (each call, its answer, the reply after it), which is what a tool reward pays for."""
    calls = e.series("tool_calls")
    if len(calls) < 4:
        return False
    first, last = (_mean(quarter) for quarter in quarters(calls))
    return last > first and (first == 0 or last / first >= length_growth)


def zero_variance_groups(e: Evidence, spec: HealthSpec) -> Finding | None:
    points = e.series("zero_variance")
    if len(points) < spec.min_points:
        return None
    share = _mean(points)
    if share > spec.max_zero_variance:
        return finding("zero_variance_groups", e.key("zero_variance"), points, share=share,
                       bound=spec.max_zero_variance)
    return None


def critic_not_learning(e: Evidence, spec: HealthSpec) -> Finding | None:
    points = e.series("explained_variance")
    if len(points) < spec.min_points:
        return None
    mean = _mean(second_half(points))
    if mean <= spec.min_explained_variance:
        return finding("critic_not_learning", e.key("explained_variance"), points, explained_variance=mean,
                       bound=spec.min_explained_variance)
    return None


@dataclass(frozen=True)
class Check:
    run: Callable[[Evidence, HealthSpec], Finding | None]
    what: str  # the finding in words
    remedy: str  # what to try


CHECKS: dict[str, Check] = {
    "loss_not_falling": Check(loss_not_falling, "training loss not falling",
                              "raise learning_rate, or check that the loss is on the tokens you mean"),
    "overfitting": Check(overfitting, "held-out loss rising while training loss falls",
                         "fewer epochs or steps, more data, or a lower learning_rate"),
    "pair_accuracy_near_chance": Check(pair_accuracy_near_chance, "held-out pair accuracy near chance",
                                       "check that chosen and rejected are not swapped or random; train longer"),
    "margin_collapse": Check(margin_collapse, "held-out reward margin collapsed: chosen and rejected scored alike",
                             "raise learning_rate or train longer; check the pairs differ"),
    "chosen_logp_falling": Check(chosen_logp_falling, "chosen log-prob falling (likelihood displacement)",
                                 "add the SFT loss (loss_type: [sigmoid, sft]), or a lower learning_rate"),
    "reward_accuracy_stuck": Check(reward_accuracy_stuck, "implicit reward does not rank held-out pairs",
                                   "raise learning_rate or beta; check chosen and rejected are not swapped"),
    "policy_not_moving": Check(policy_not_moving, "policy not moving",
                               "raise learning_rate; check that rewards differ between samples of a prompt"),
    "reward_flat": Check(reward_flat, "sampled reward flat",
                         "raise learning_rate or temperature; check that the reward can be earned"),
    "reward_falling": Check(reward_falling, "sampled reward falling",
                            "a lower learning_rate with warmup_steps, or LoRA adapters (peft:), for smaller first steps"),
    "held_out_fell": Check(held_out_fell, "held-out accuracy fell: the stage's output is worse than its input",
                           "a lower learning_rate with warmup_steps, or LoRA adapters (peft:); compare before using it"),
    "reward_hacking": Check(reward_hacking, "reward up while held-out accuracy or another scorer falls (reward hacking)",
                            "a higher KL coefficient (kl_coef/beta), fewer steps, or a reward closer to the task"),
    "kl_past_bound": Check(kl_past_bound, "KL to the reference past its bound",
                           "a higher KL coefficient (kl_coef/beta, or adaptive_kl) or a lower learning_rate"),
    "kl_growing": Check(kl_growing, "KL to the reference growing without limit",
                        "a higher KL coefficient (kl_coef/beta, or adaptive_kl) or a lower learning_rate"),
    "entropy_collapse": Check(entropy_collapse, "entropy collapse",
                              "a lower learning_rate, a higher KL coefficient, or an entropy bonus"),
    "responses_truncated": Check(responses_truncated, "responses cut at the token limit",
                                 "raise max_new_tokens/max_completion_length (with tools: room for every call, "
                                 "answer and reply, and max_tool_calling_iterations), or penalise missing EOS"),
    "length_growing": Check(length_growing, "response length growing every step",
                            "a reward that does not pay for length, or a length penalty"),
    "zero_variance_groups": Check(zero_variance_groups, "sample groups whose rewards are all equal (no gradient)",
                                  "more samples per prompt, a higher temperature, or a graded reward"),
    "critic_not_learning": Check(critic_not_learning, "critic explains none of the return's variance",
                                 "raise the critic's learning (vf_coef, learning_rate) or start it from a reward model"),
}


def check(checks: tuple[str, ...], evidence: Evidence, spec: HealthSpec) -> list[Finding]:
    """The findings of the named checks, in their order."""
    return [f for name in checks if (f := CHECKS[name].run(evidence, spec)) is not None]


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return " -> ".join(_shown(v) for v in value)
    return str(value)


def describe(stage: str, found: Finding) -> str:
    """One line: stage, step, what, the numbers, what to try."""
    known = CHECKS[found["finding"]]
    numbers = ", ".join(f"{k} {_shown(v)}" for k, v in found.items() if k not in ("finding", "metric", "step"))
    at = f" step {found['step']}" if found.get("step") is not None else ""
    return f"health: stage '{stage}'{at}: {known.what} [{found['finding']}] ({numbers}); try {known.remedy}"


def verdict(findings: list[Finding]) -> str:
    return ", ".join(f["finding"] for f in findings) if findings else "healthy"


def enforce_fail_on(stage: str, findings: list[Finding], spec: HealthSpec) -> None:
    """Raise HealthFailure if a finding is one that `health.fail_on` names."""
    failing = [f for f in findings if f["finding"] in spec.fail_on]
    if failing:
        raise HealthFailure(f"stage '{stage}': health.fail_on: {verdict(failing)}", findings)


class HealthWatch:
    """A stage's health while it trains and at its end: each finding printed once, `fail_on` findings raised."""

    def __init__(self, stage: str, checks: tuple[str, ...], names: dict[str, str], spec: HealthSpec,
                 log: Callable[[str], None] = print):
        self.stage, self.checks, self.names, self.spec, self.log = stage, checks, names, spec, log
        self.reported: set[str] = set()
        self.rows: list[dict[str, Any]] = []  # PPO steps, as its hook hands them over

    def observe(self, history: list[dict[str, Any]], metrics: dict[str, float], *, final: bool = False) -> list[Finding]:
        findings = check(self.checks, Evidence(history, metrics, self.names), self.spec)
        for found in findings:
            if found["finding"] not in self.reported:
                self.reported.add(found["finding"])
                self.log(describe(self.stage, found))
        enforce_fail_on(self.stage, findings, self.spec)
        if final:
            self.log(f"health: stage '{self.stage}': {verdict(findings)}")
        return findings

    def during(self, history: list[dict[str, Any]], step: int, max_steps: int) -> None:
        """Check the run so far, once at least half of it is done (before that, trends are not yet clear)."""
        if self.checks and max_steps > 0 and 2 * step >= max_steps:
            self.observe(history, {})

    def step_hook(self, max_steps: int) -> Callable[[int, dict[str, float]], None]:
        """A PPO `on_step_end` hook: each step's metrics, checked as they come."""
        def on_step_end(step: int, metrics: dict[str, float]) -> None:
            self.rows.append({**metrics, "step": step})
            self.during(self.rows, step, max_steps)
        return on_step_end
