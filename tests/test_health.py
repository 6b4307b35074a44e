"""Run health for real: each finding raised by a tiny run built to cause it (a learning rate of ~0, a reward
that pays for length or refusals, a constant reward, coin-flip preference labels), and the thresholds and
`fail_on` read from the recipe."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import DATA, summary, tiny_stages, write_recipe

PROMPTS = {"path": str(DATA / "prompts.jsonl"), "eval": {"path": str(DATA / "eval.jsonl"), "max_samples": 64}}
STILL = 1e-9  # a learning rate at which nothing moves
LORA = {"r": 8, "lora_alpha": 16}


def coin_flip_pairs(path: Path, pairs: int = 400) -> Path:
    """The quickstart's preference pairs with chosen and rejected swapped at random: nothing to learn."""
    rng = random.Random(0)
    rows = [json.loads(line) for line in (DATA / "prefs.jsonl").read_text().splitlines()[:pairs]]
    for row in rows:
        if rng.random() < 0.5:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def random_answers(path: Path, rows: int = 40) -> Path:
    """SFT rows answered with random numbers: what is learnt of them by heart does not carry to held-out rows."""
    rng = random.Random(0)
    lines = [json.loads(line) for line in (DATA / "sft.jsonl").read_text().splitlines()[:rows]]
    for row in lines:
        row["messages"][-1]["content"] = str(rng.randrange(100))
    path.write_text("".join(json.dumps(row) + "\n" for row in lines))
    return path


def sick_stages(directory: Path) -> list[dict]:
    stages = tiny_stages(pretrain_steps=40, sft_steps=60)
    rl = {"model": "sft", "dataset": PROMPTS, "peft": LORA}
    grpo_args = {"max_steps": 8, "num_generations": 4, "per_device_train_batch_size": 16, "logging_steps": 1,
                 "max_completion_length": 12}
    ppo_args = {"max_steps": 8, "rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 2, "max_new_tokens": 12}
    return stages + [
        {"name": "sft_still", "type": "sft", "model": "base", "dataset": {"path": str(DATA / "sft.jsonl"), "max_samples": 400},
         "args": {"max_steps": 8, "learning_rate": STILL, "per_device_train_batch_size": 16, "max_length": 48,
                  "logging_steps": 1}},
        {"name": "sft_overfit", "type": "sft", "model": "sft",  # 20 rows of noise learnt by heart
         "dataset": {"path": str(random_answers(directory / "random.jsonl")), "test_size": 0.5},
         "args": {"max_steps": 60, "learning_rate": 1e-2, "per_device_train_batch_size": 16, "max_length": 48,
                  "logging_steps": 5, "eval_strategy": "steps", "eval_steps": 10}},
        {"name": "rm_coin", "type": "reward", "model": "sft",
         "dataset": {"path": str(coin_flip_pairs(directory / "coin.jsonl")), "test_size": 0.25},
         "args": {"max_steps": 6, "learning_rate": STILL, "per_device_train_batch_size": 16, "max_length": 48,
                  "logging_steps": 1}},
        {"name": "dpo_plain", "type": "dpo", "model": "sft", "dataset": {"path": str(DATA / "prefs.jsonl"), "max_samples": 300},
         "args": {"max_steps": 12, "learning_rate": 5e-3, "per_device_train_batch_size": 16, "max_length": 48,
                  "beta": 0.1, "logging_steps": 2}},
        {"name": "kto_still", "type": "kto", "model": "sft", "dataset": {"path": str(DATA / "prefs.jsonl"), "max_samples": 120},
         "args": {"max_steps": 6, "learning_rate": STILL, "per_device_train_batch_size": 16, "max_length": 48,
                  "logging_steps": 1}},
        {"name": "rloo_const", "type": "rloo", **rl, "rewards": [{"function": "tests.health_rewards:constant"}],
         "args": {**grpo_args, "learning_rate": STILL, "beta": 0.05}},
        {"name": "grpo_long", "type": "grpo", **rl, "rewards": [{"function": "tests.health_rewards:length"}],
         "health": {"max_kl": 1.0},
         "args": {**grpo_args, "max_steps": 16, "learning_rate": 1e-2, "beta": 0.04, "max_completion_length": 8}},
        {"name": "ppo_still", "type": "ppo", **rl, "rewards": [{"function": "tests.health_rewards:length"}],
         "args": {**ppo_args, "learning_rate": STILL, "value_head_init_std": 1.0}},
        {"name": "ppo_long", "type": "ppo", **rl, "health": {"max_kl": 2.0, "kl_growing_from": 1.0},
         "rewards": [{"function": "tests.health_rewards:length"}],
         "args": {**ppo_args, "max_steps": 12, "learning_rate": 1e-2, "kl_coef": 0.0, "missing_eos_penalty": None}},
        # paid for ending at once, with the length as a lightly weighted independent scorer, whose held-out score
        # falls; every weight trained, so the policy settles on one response (the LoRA adapter's entropy fell 25%)
        {"name": "ppo_short", "type": "ppo", "model": "sft", "dataset": PROMPTS,
         "rewards": [{"function": "tests.health_rewards:short"}, {"function": "tests.health_rewards:length", "weight": 0.01}],
         "args": {**ppo_args, "max_steps": 16, "ppo_epochs": 4, "learning_rate": 1e-2, "kl_coef": 0.0}},
    ]


@pytest.fixture(scope="module")
def sick(tmp_path_factory):
    directory = tmp_path_factory.mktemp("health")
    assert main(["run", str(write_recipe(directory, sick_stages(directory)))]) == 0
    return directory / "run", summary(directory / "run")["stages"]


def found(sick, stage: str) -> dict[str, dict]:
    return {f["finding"]: f for f in sick[1][stage]["health"]}


def test_absent_metrics_are_not_findings():
    """A PPO run without a critic or group estimator logs no explained_variance or zero_variance_fraction."""
    from pipeline.config.health import HealthSpec
    from pipeline.stages.ppo import PPOSpec
    from pipeline.training.health import Evidence, check

    rows = [{"step": s, "reward": 0.1 * s, "kl": 0.1, "approx_kl": 0.01, "clip_fraction": 0.1, "entropy": 1.0,
             "response_length": 5.0, "eos_fraction": 1.0} for s in range(1, 13)]
    assert check(PPOSpec.health_checks, Evidence(rows, {}, PPOSpec.health_names), HealthSpec()) == []
    assert check(PPOSpec.health_checks, Evidence([], {}, PPOSpec.health_names), HealthSpec()) == []


def test_reward_noise_is_not_a_trend():
    """A reward that rises by less than its step-to-step noise is flat; one that rises beyond it is not."""
    from pipeline.config.health import HealthSpec
    from pipeline.training.health import Evidence, reward_flat

    noisy = [{"step": s, "reward": (0.5 if s % 2 else -0.5) + 0.01 * s} for s in range(1, 17)]
    rising = [{"step": s, "reward": (0.5 if s % 2 else -0.5) + 0.3 * s} for s in range(1, 17)]
    names = {"reward": "reward"}
    assert reward_flat(Evidence(noisy, {}, names), HealthSpec())["finding"] == "reward_flat"
    assert reward_flat(Evidence(rising, {}, names), HealthSpec()) is None
    assert reward_flat(Evidence(rising[:3], {}, names), HealthSpec()) is None  # too few points to judge


def test_a_falling_reward_is_not_called_flat():
    """A reward falling beyond twice its noise is `reward_falling` (lower the step), not `reward_flat` (raise it);
    one falling by less than that is flat."""
    from pipeline.config.health import HealthSpec
    from pipeline.training.health import Evidence, reward_falling, reward_flat

    names = {"reward": "reward"}
    falling = Evidence([{"step": s, "reward": (0.05 if s % 2 else -0.05) - 0.05 * s} for s in range(1, 17)], {}, names)
    drifting = Evidence([{"step": s, "reward": (0.5 if s % 2 else -0.5) - 0.01 * s} for s in range(1, 17)], {}, names)
    assert reward_falling(falling, HealthSpec())["finding"] == "reward_falling"
    assert reward_flat(falling, HealthSpec()) is None
    assert reward_falling(drifting, HealthSpec()) is None
    assert reward_flat(drifting, HealthSpec())["finding"] == "reward_flat"


def test_responses_that_grow_by_learning_to_call_a_tool_are_not_length_growing():
    """GRPO teaching a policy to call a tool makes its responses longer (the call, the tool's answer, the reply):
    length growth that tool calls per response match is explained; the same growth without them, or with calls
    that grew less than the length, is `length_growing`."""
    from pipeline.config.health import HealthSpec
    from pipeline.stages.specs.grpo import GRPOSpec
    from pipeline.training.health import Evidence, length_growing

    learning_to_call = [0.2 + 0.05 * s for s in range(1, 17)]  # 0.25 -> 1.0 calls a response

    def run(calls: list[float] | None) -> Evidence:  # an answer alone is 6 tokens, a call with its answer 30 more
        rows = [{"step": s, "completions/mean_length": 6.0 + 30.0 * called}
                for s, called in zip(range(1, 17), learning_to_call)]
        for row, called in zip(rows, calls or []):
            row["tools/call_frequency"] = called
        return Evidence(rows, {}, GRPOSpec.health_names)

    assert length_growing(run(learning_to_call), HealthSpec()) is None
    assert length_growing(run([0.0] * 4 + [1.0] * 12), HealthSpec()) is None  # from no call at all
    assert length_growing(run(None), HealthSpec())["finding"] == "length_growing"
    assert length_growing(run([0.5 + 0.01 * s for s in range(1, 17)]), HealthSpec())["finding"] == "length_growing"


def test_held_out_accuracy_falling_without_a_rising_reward_is_reported_once():
    """Held-out accuracy down with no reward up: `held_out_fell`; with the training reward up it is reward hacking,
    reported as that alone."""
    from pipeline.config.health import HealthSpec
    from pipeline.training.health import Evidence, held_out_fell, reward_hacking

    worse = {"initial_eval_accuracy": 0.69, "eval_accuracy": 0.12, "train_reward_first": 0.6, "train_reward_last": 0.4}
    found_worse = held_out_fell(Evidence([], worse, {}), HealthSpec())
    assert found_worse["eval_accuracy_before"] == 0.69 and found_worse["eval_accuracy_after"] == 0.12
    assert reward_hacking(Evidence([], worse, {}), HealthSpec()) is None
    hacked = {**worse, "train_reward_last": 0.9}
    assert held_out_fell(Evidence([], hacked, {}), HealthSpec()) is None
    assert reward_hacking(Evidence([], hacked, {}), HealthSpec())["finding"] == "reward_hacking"
    level = {**worse, "eval_accuracy": 0.66}  # within the 0.05 bound
    assert held_out_fell(Evidence([], level, {}), HealthSpec()) is None


@pytest.mark.parametrize("stage, findings", [
    ("sft_still", ["loss_not_falling"]),
    ("sft_overfit", ["overfitting"]),
    ("rm_coin", ["loss_not_falling", "pair_accuracy_near_chance", "margin_collapse"]),
    ("dpo_plain", ["chosen_logp_falling"]),
    ("kto_still", ["loss_not_falling", "reward_accuracy_stuck"]),
    ("rloo_const", ["policy_not_moving", "reward_flat", "zero_variance_groups"]),
    ("grpo_long", ["kl_past_bound", "kl_growing", "responses_truncated"]),
    ("ppo_still", ["policy_not_moving", "reward_flat", "critic_not_learning"]),
    ("ppo_long", ["kl_past_bound", "kl_growing", "responses_truncated", "length_growing"]),
    ("ppo_short", ["reward_hacking", "entropy_collapse"]),
])
def test_each_finding_is_raised_by_a_run_built_to_cause_it(sick, stage, findings):
    assert sick[1][stage]["status"] == "completed"  # reported, not stopped
    assert set(findings) <= set(found(sick, stage)), sick[1][stage]["health"]


def test_healthy_stages_raise_nothing(sick):
    """The chain the sick stages start from learnt as it should: no finding."""
    assert {name: sick[1][name]["health"] for name in ("base", "sft")} == {"base": [], "sft": []}
    assert "health" not in sick[1]["tok"]  # not a training stage


def test_findings_carry_their_numbers(sick):
    still = found(sick, "ppo_still")["policy_not_moving"]
    assert still["approx_kl"] < 1e-5 and still["clip_fraction"] < 1e-4 and still["metric"] == "approx_kl"
    assert found(sick, "ppo_still")["critic_not_learning"]["explained_variance"] <= 0.0
    hacked = found(sick, "ppo_short")["reward_hacking"]
    assert hacked["eval_reward/length_before"] - hacked["eval_reward/length_after"] >= 0.05
    assert found(sick, "rloo_const")["zero_variance_groups"]["share"] == 1.0  # every group: one constant reward
    assert found(sick, "ppo_long")["kl_past_bound"]["kl_per_response"] > 2.0  # the recipe's own bound


def test_findings_print_once_and_the_command_reads_them_back(sick, capsys):
    run_dir = sick[0]
    assert main(["health", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "health: stage 'sft': healthy" in lines and "health: stage 'tok'" not in "\n".join(lines)
    still = [line for line in lines if line.startswith("health: stage 'ppo_still' step")]
    assert any("policy not moving [policy_not_moving] (approx_kl" in line and "try raise learning_rate" in line
               for line in still)
    report = (run_dir / "report.md").read_text()
    assert "| ppo_still | ppo | completed |" in report and "policy_not_moving, reward_flat" in report
    assert "plots/ppo_still_health.png" in report and (run_dir / "plots" / "ppo_still_health.png").is_file()


def test_older_runs_are_judged_from_their_logs(sick, tmp_path, capsys):
    """A run directory from before run health (no `health` in summary.json) gets the same findings."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(sick[0], old, ignore=shutil.ignore_patterns("output", "checkpoints"))
    data = json.loads((old / "summary.json").read_text())
    for record in data["stages"].values():
        record.pop("health", None)
    (old / "summary.json").write_text(json.dumps(data))
    assert main(["health", str(old)]) == 0
    assert "health: stage 'ppo_still': policy_not_moving, reward_flat, critic_not_learning" in capsys.readouterr().out


def test_fail_on_stops_the_stage(sick, tmp_path, capsys):
    """`health.fail_on` makes a finding fail the stage, reported in one line; its findings stay in summary.json.
    A threshold set in `defaults` reaches every training stage."""
    import shutil

    stages = sick_stages(tmp_path)
    keep = ["tok", "base", "sft_still"]
    (tmp_path / "run").mkdir()
    for name in keep[:2]:
        shutil.copytree(sick[0] / name, tmp_path / "run" / name)
    recipe = write_recipe(tmp_path, [s for s in stages if s["name"] in keep],
                          defaults={"health": {"fail_on": ["loss_not_falling"]}})
    assert main(["run", str(recipe)]) == 1
    assert "health.fail_on: loss_not_falling" in capsys.readouterr().err
    record = summary(tmp_path / "run")["stages"]["sft_still"]
    assert record["status"] == "failed" and record["health"][0]["finding"] == "loss_not_falling"
    assert main(["health", str(tmp_path / "run")]) == 0  # the failed stage's findings, as recorded
    assert "health: stage 'sft_still': loss_not_falling" in capsys.readouterr().out

    # the same `fail_on` added to a run whose stage trained without it: judged again from its logs, not retrained
    again = tmp_path / "again"
    (again / "run").mkdir(parents=True)
    for name in keep:
        shutil.copytree(sick[0] / name, again / "run" / name)
    recipe = write_recipe(again, [s for s in stages if s["name"] in keep],
                          defaults={"health": {"fail_on": ["loss_not_falling"]}})
    assert main(["run", str(recipe)]) == 1
    out, err = capsys.readouterr()
    assert "sft_still: skipped" in out and "[loss_not_falling]" in out and "health.fail_on: loss_not_falling" in err
    assert summary(again / "run")["stages"]["sft_still"]["status"] == "failed"


@pytest.mark.parametrize("health, where, expected", [
    ({"max_kll": 3}, "stage", "health: unknown key 'max_kll'; did you mean 'max_kl'?"),
    ({"fail_on": ["kl_past_bund"]}, "stage", "'kl_past_bund' is not one of a ppo stage's findings"),
    ({"fail_on": ["overfitting"], "trend_z": "two"}, "defaults", "defaults.health.trend_z: expected float"),
    ({"fail_on": ["critic_not_lerning"]}, "defaults", "did you mean 'critic_not_learning'?"),
])
def test_health_keys_are_checked_with_suggestions(tmp_path, capsys, health, where, expected):
    from tests.test_validate import validate

    stage = {"name": "ppo", "type": "ppo", "model": "sft", "dataset": PROMPTS,
             "rewards": [{"function": "exact_match"}], **({"health": health} if where == "stage" else {})}
    code, out = validate(tmp_path, capsys, tiny_stages() + [stage],
                         **({"defaults": {"health": health}} if where == "defaults" else {}))
    assert code != 0 and expected in out, out
