"""kto and rloo stages chained from SFT on the quickstart data, for real (tiny models, few steps), and the
recipes `pipeline validate` refuses for them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from pipeline.cli import main
from pipeline.data.loading import DataError
from pipeline.models.loading import is_adapter
from pipeline.stages.kto import unpaired
from tests.conftest import DATA, summary, tiny_stages, write_recipe
from tests.test_preference_stages import PREFS
from tests.test_validate import validate

PROMPTS = {"path": str(DATA / "prompts.jsonl"), "eval": str(DATA / "eval.jsonl")}
KTO_ARGS = {"max_steps": 12, "learning_rate": 5e-3, "per_device_train_batch_size": 16, "max_length": 48,
            "beta": 0.1, "logging_steps": 5}


def write_unpaired(path: Path, pairs: int = 600) -> Path:
    """Unpaired KTO rows from the quickstart's preference pairs: one reply per prompt, every other one the rejected."""
    lines = [json.loads(line) for line in (DATA / "prefs.jsonl").read_text().splitlines()[:pairs]]
    rows = [{"prompt": row["prompt"], "completion": row["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
            for i, row in enumerate(lines)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def kto_rloo_stages(unpaired_file: Path) -> list[dict]:
    stages = tiny_stages(pretrain_steps=60, sft_steps=150)
    stages[2]["args"].update(learning_rate=5e-3)  # until most samples are a number or "I don't know." (as in the data)
    stages[2]["dataset"].update(max_samples=1500)
    return stages + [
        {"name": "rm", "type": "reward", "model": "sft", "dataset": PREFS,
         "args": {"max_steps": 60, "learning_rate": 3e-3, "per_device_train_batch_size": 16, "max_length": 48}},
        {"name": "kto", "type": "kto", "model": "sft", "dataset": PREFS, "peft": {"r": 8, "lora_alpha": 16},
         "args": KTO_ARGS},
        {"name": "kto_full", "type": "kto", "model": "sft", "dataset": {"path": str(unpaired_file), "test_size": 0.15},
         "args": dict(KTO_ARGS, learning_rate=1e-3)},
        {"name": "rloo", "type": "rloo", "model": "sft", "dataset": PROMPTS,
         "rewards": [{"reward_model": "rm"}, {"function": "exact_match"}], "peft": {"r": 8, "lora_alpha": 16},
         "args": {"max_steps": 20, "learning_rate": 3e-3, "num_generations": 4, "per_device_train_batch_size": 32,
                  "max_completion_length": 16, "logging_steps": 1}},  # room for "I don't know." (13 tokens)
    ]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    directory = tmp_path_factory.mktemp("kto_rloo")
    stages = kto_rloo_stages(write_unpaired(directory / "unpaired.jsonl"))
    assert main(["run", str(write_recipe(directory, stages))]) == 0
    return summary(directory / "run")["stages"]


def test_kto_raises_held_out_margin(chain):
    """LoRA on preference pairs (unpaired by the stage), and full fine-tuning on unpaired rows."""
    for name in ("kto", "kto_full"):
        metrics = chain[name]["metrics"]
        assert metrics["initial_eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6), name  # policy == reference
        # Observed 0.9-6.3 over seeds 3, 7, 11; 0.00002 at learning rate 1e-7, -0.37 trained on reversed labels.
        assert metrics["eval_rewards/margins"] > 0.5, name
        assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 0.05, name  # 0.5 at the start; observed 0.27-0.39
    assert is_adapter(chain["kto"]["output"]) and not is_adapter(chain["kto_full"]["output"])


def test_rloo_reward_rises(chain):
    metrics = chain["rloo"]["metrics"]
    # The reward model scores "I don't know." about -2.9 and any number about +2.9, so the reward says how many samples
    # still refuse. Observed (seeds 3, 7) 1.6 -> 2.7 and 1.7 -> 2.9; at learning rate 1e-7, 1.1 -> 0.7 and 0.6 -> 0.8.
    assert metrics["train_reward_last"] > metrics["train_reward_first"] + 0.5
    assert metrics["train_reward_last"] > 2.0
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and 0.0 <= metrics["initial_eval_accuracy"] <= 1.0
    assert is_adapter(chain["rloo"]["output"])


def test_unpaired_rows():
    pairs = Dataset.from_list([{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": "no"} for i in range(32)])
    rows = unpaired(pairs, "test", seed=0)
    assert len(rows) == 64 and sorted(rows.column_names) == ["completion", "label", "prompt"]
    assert {(r["prompt"], r["completion"]) for r in rows if r["label"]} == {(f"q{i}", f"a{i}") for i in range(32)}
    assert all(r["completion"] == "no" for r in rows if not r["label"])
    assert 0 < sum(rows["label"][:16]) < 16  # shuffled: a batch holds both labels, not all chosen first
    given = Dataset.from_list([{"prompt": "q", "completion": "a", "label": label} for label in (True, False)])
    assert unpaired(given, "test", seed=0) is given
    with pytest.raises(DataError, match="`label` must be true"):
        unpaired(Dataset.from_list([{"prompt": "q", "completion": "a", "label": 1}] * 2), "test", seed=0)
    with pytest.raises(DataError, match="all 2 rows are labelled True"):  # a split without both kinds
        unpaired(Dataset.from_list([{"prompt": "q", "completion": "a", "label": True}] * 2), "test", seed=0)


def kto_stage(**changes) -> list[dict]:
    return tiny_stages() + [{"name": "kto", "type": "kto", "model": "sft", "dataset": dict(PREFS), **changes}]


@pytest.mark.parametrize("stage, expected", [
    (kto_stage(args={"train_sampling_strategy": "random"}),
     ["stage 'kto'", "args.train_sampling_strategy: the kto loss needs `sequential`"]),
    (kto_stage(args={"per_device_train_batch_size": 1}),
     ["stage 'kto'", "args.per_device_train_batch_size: the kto loss needs at least 2 rows"]),
    (kto_stage(args={"desireable_weight": 2.0}),
     ["stage 'kto'", "args.desireable_weight: not a field of KTOConfig", "did you mean 'desirable_weight'"]),
    (kto_stage(args={"learning_rate": -1.0}), ["stage 'kto'", "args.learning_rate: must be > 0"]),
    (kto_stage(dataset={"path": "QUESTIONS"}),
     ["stage 'kto'", "['question', 'reply']", "unpaired: prompt, completion, label", "pairwise: chosen, rejected"]),
    (kto_stage(dataset={"path": "INTLABELS"}), ["stage 'kto'", "lines 1-4: `label` must be true (desirable) or false (undesirable), not 1"]),
    (kto_stage(dataset={"path": "ONEKIND"}), ["stage 'kto'", "all 4 rows are labelled True", "give both"]),
    (tiny_stages() + [{"name": "rloo", "type": "rloo", "model": "sft", "dataset": str(DATA / "sft.jsonl"),
                       "rewards": [{"function": "exact_match"}]}],
     ["stage 'rloo'", "prompt"]),
    (tiny_stages() + [{"name": "rloo", "type": "rloo", "model": "sft", "dataset": str(DATA / "prompts.jsonl"),
                       "rewards": [], "args": {"num_generations": 1}}],
     ["stage 'rloo'", "`rewards` must list at least one reward", "RLOOConfig rejects", "at least 2 generations"]),
], ids=["kto-sampling", "kto-batch", "kto-typo", "kto-lr", "kto-columns", "kto-int-labels", "kto-one-kind",
        "rloo-columns", "rloo-rewards"])
def test_bad_kto_and_rloo_recipes_are_refused(stage, expected, tmp_path, capsys):
    files = {"QUESTIONS": '{"question": "a", "reply": "b"}\n' * 4,
             "INTLABELS": '{"prompt": "q", "completion": "a", "label": 1}\n' * 4,
             "ONEKIND": '{"prompt": "q", "completion": "a", "label": true}\n' * 4}
    for item in stage:
        placeholder = item.get("dataset", {}).get("path") if isinstance(item.get("dataset"), dict) else None
        if placeholder in files:
            (tmp_path / f"{placeholder}.jsonl").write_text(files[placeholder])
            item["dataset"]["path"] = str(tmp_path / f"{placeholder}.jsonl")
    code, out = validate(tmp_path, capsys, stage)
    assert code != 0
    for fragment in expected:
        assert fragment in out, f"{fragment!r} not in:\n{out}"


def test_kto_and_rloo_recipes_validate(tmp_path, capsys):
    stages = kto_rloo_stages(write_unpaired(tmp_path / "unpaired.jsonl", pairs=40))
    code, out = validate(tmp_path, capsys, stages)
    assert code == 0, out


def test_kto_counts_the_rows_trl_drops_for_length(tmp_path, capsys):
    """TRL's KTOTrainer drops rows whose prompt alone fills `max_length`, without a word: counted and said here,
    and a split left with none is an error naming the setting."""
    long = "Please add these numbers up carefully " * 8
    rows = [{"prompt": long if i % 4 == 0 else f"What is {i} + 1?", "completion": str(i + 1), "label": bool(i % 2)}
            for i in range(64)]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    stage = {"name": "kto", "type": "kto", "model": "sft", "dataset": {"path": str(data), "test_size": 16},
             "args": {"max_steps": 2, "per_device_train_batch_size": 8, "max_length": 64, "logging_steps": 1}}
    recipe = write_recipe(tmp_path, tiny_stages(pretrain_steps=10, sft_steps=10) + [stage])
    assert main(["run", str(recipe)]) == 0
    metrics = summary(tmp_path / "run")["stages"]["kto"]["metrics"]
    assert metrics["train_dropped_rows"] + metrics["eval_dropped_rows"] == 16  # every long prompt, nothing else
    assert "rows dropped (prompt alone fills max_length=64)" in capsys.readouterr().out
    stage["args"]["max_length"] = 4
    assert main(["run", str(write_recipe(tmp_path, tiny_stages(pretrain_steps=10, sft_steps=10) + [stage]))]) == 1
    assert "which KTO drops; raise args.max_length" in capsys.readouterr().err
