"""`pipeline validate` on eval, generate and push_to_hub keys: clear errors before anything trains."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from tests.conftest import DATA, tiny_stages, write_recipe

PROMPTS = str(DATA / "prompts.jsonl")


def stages_with(extra: dict) -> list[dict]:
    stages = tiny_stages()
    stages.append({"name": "rm", "type": "reward", "model": "sft", "dataset": str(DATA / "prefs.jsonl")})
    return stages + [extra]


def evaluation(**keys) -> dict:
    return {"name": "ev", "type": "eval", "models": ["sft"], "dataset": str(DATA / "eval.jsonl"), **keys}


def generation(**keys) -> dict:
    return {"name": "gen", "type": "generate", "model": "sft", "dataset": PROMPTS,
            "rewards": [{"reward_model": "rm"}], **keys}


CASES = {
    "win rate without a judge": (evaluation(baseline="sft"), ["stage 'ev'", "baseline: needs `reward_model`"]),
    "best-of-N without a judge": (evaluation(best_of_n={"n": 4}), ["best_of_n: needs `reward_model`"]),
    "best-of-1": (evaluation(reward_model="rm", best_of_n={"n": 1}), ["best_of_n.n: must be at least 2"]),
    "pass@k from fewer than k samples": (evaluation(pass_at_k={"k": 8, "n": 4}),
                                         ["stage 'ev'", "pass_at_k.n: must be at least k (8), got 4"]),
    "pass@0": (evaluation(pass_at_k={"k": 0}), ["pass_at_k.k: must be at least 1, got 0"]),
    "unknown model": (evaluation(models=["sft", "sfy"]), ["stage 'ev'", "models: unknown stage 'sfy'", "did you mean 'sft'"]),
    "model listed twice": (evaluation(models=["sft", "sft"]), ["models: 'sft' is listed twice"]),
    "eval typo": (evaluation(reward_modle="rm"), ["unknown key 'reward_modle'", "did you mean 'reward_model'"]),
    "pass@k on data without answers": (evaluation(dataset=str(DATA / "prefs.jsonl"), pass_at_k={"k": 2}),
                                       ["stage 'ev'", "expected one of these formats: prompts with answers: prompt, answer"]),
    "eval data without prompts": (evaluation(dataset=str(DATA / "sft.jsonl")),
                                  ["stage 'ev'", "expected one of these formats: prompts (answer optional): prompt"]),
    "nothing to label with": (generation(rewards=[]), ["stage 'gen'", "give `rewards` and/or `judge`"]),
    "one sample per prompt": (generation(num_samples=1), ["num_samples: must be at least 2"]),
    "greedy sampling": (generation(temperature=0.0), ["temperature: must be > 0"]),
    "unknown pairing": (generation(pairs="best"), ["pairs: must be one of best_worst, all"]),
    "judge prompt without the response": (generation(judge={"model": "sft", "prompt": "Rate {prompt}"}),
                                           ["judge.prompt: must contain {prompt} and {response}"]),
    "judge scale too large": (generation(judge={"model": "sft", "scale": 10}), ["judge.scale: must be 2..9"]),
    "judge typo": (generation(judge={"model": "sfy"}), ["judge.model: unknown stage 'sfy'; did you mean 'sft'"]),
    "bad reward function": (generation(rewards=[{"function": "exact_mtch"}]), ["did you mean 'exact_match'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_eval_or_generate_stage_is_reported(case, tmp_path, capsys):
    extra, expected = CASES[case]
    code = main(["validate", str(write_recipe(tmp_path, stages_with(extra)))])
    out = capsys.readouterr()
    assert code != 0
    for fragment in expected:
        assert fragment in out.out + out.err, f"{fragment!r} not in:\n{out.err}"


def test_generated_data_feeds_a_later_stage_by_name(tmp_path, capsys):
    stages = stages_with(generation())
    stages.append({"name": "dpo", "type": "dpo", "model": "sft", "dataset": "gen"})
    stages.append(evaluation(reward_model="rm", baseline="sft", reference="sft", best_of_n={"n": 4}, models=["sft", "dpo"],
                             pass_at_k={"k": 8, "n": 16}))
    assert main(["validate", str(write_recipe(tmp_path, stages))]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("push, expected", [
    ({"repo_id": "not a repo"}, "push_to_hub.repo_id: 'not a repo' is not a Hub repo id"),
    ({"repo": "me/model"}, "unknown key 'repo'; did you mean 'repo_id'"),
    ({"repo_id": "me/model", "private": "yes"}, "push_to_hub.private: expected bool"),
])
def test_bad_push_to_hub_is_reported(push, expected, tmp_path, capsys):
    stages = tiny_stages()
    stages[2]["push_to_hub"] = push
    assert main(["validate", str(write_recipe(tmp_path, stages))]) != 0
    assert expected in capsys.readouterr().err


def test_push_to_hub_does_not_change_the_fingerprint(tmp_path):
    """Publishing settings are not inputs: adding them to a finished stage must not retrain it."""
    from pipeline.run.runner import fingerprint
    from pipeline.validation.recipe_checks import load_recipe

    plain = load_recipe(write_recipe(tmp_path, tiny_stages()))
    stages = tiny_stages()
    stages[2]["push_to_hub"] = {"repo_id": "me/model", "private": True}
    pushed = load_recipe(write_recipe(tmp_path, stages))
    assert fingerprint(plain, plain.stage("sft"), {}) == fingerprint(pushed, pushed.stage("sft"), {})
    stages[2]["args"]["learning_rate"] = 1e-4  # while a real change does
    changed = load_recipe(write_recipe(tmp_path, stages))
    assert fingerprint(changed, changed.stage("sft"), {}) != fingerprint(pushed, pushed.stage("sft"), {})
