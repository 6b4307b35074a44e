"""`pipeline validate`: every kind of bad recipe gives a non-zero exit and a message naming file, stage and key."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import DATA, REPO, tiny_stages, write_recipe


def validate(tmp_path, capsys, stages, **top) -> tuple[int, str]:
    path = write_recipe(tmp_path, stages, **top)
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_valid_recipe_passes(tmp_path, capsys):
    code, out = validate(tmp_path, capsys, tiny_stages())
    assert code == 0, out
    assert "valid (3 stages" in out


@pytest.mark.parametrize("recipe", ["quickstart.yaml", "smollm2-135m-sft-lora.yaml", "smollm2-135m-chain.yaml",
                                    "llama3-8b-qlora-sft.yaml"])
def test_shipped_recipes_validate(recipe, capsys):
    assert main(["validate", str(REPO / "recipes" / recipe)]) == 0, capsys.readouterr().err


def mutate(edit):
    stages = tiny_stages()
    edit(stages)
    return stages


CASES = {
    "unknown stage key with suggestion": (
        lambda s: s[1].update(block_sise=64), ["stage 'base'", "unknown key 'block_sise'", "did you mean 'block_size'"]),
    "wrong type": (
        lambda s: s[1].update(block_size="long"), ["stage 'base'", "block_size", "expected int"]),
    "args key not a config field": (
        lambda s: s[2]["args"].update(learning_rat=1e-3),
        ["stage 'sft'", "args.learning_rat", "not a field of SFTConfig", "did you mean 'learning_rate'"]),
    "args value the config rejects": (
        lambda s: s[2]["args"].update(lr_scheduler_type="sideways"), ["stage 'sft'", "SFTConfig rejects", "sideways"]),
    "args value of the wrong type": (
        lambda s: s[2]["args"].update(learning_rate="fast"), ["stage 'sft'", "args.learning_rate: expected float"]),
    "reference to a missing stage": (
        lambda s: s[2].update(model="bsae"), ["stage 'sft'", "model", "unknown stage 'bsae'", "did you mean 'base'"]),
    "reference to a later stage": (
        lambda s: s[1].update(tokenizer="sft"), ["stage 'base'", "tokenizer", "runs later"]),
    "missing dataset file": (
        lambda s: s[2]["dataset"].update(path="data/nope.jsonl"), ["stage 'sft'", "dataset", "'data/nope.jsonl' not found"]),
    "missing local model folder": (
        lambda s: s[2].update(model="./no/such/folder"), ["stage 'sft'", "local folder './no/such/folder' does not exist"]),
    "a data file as the model": (
        lambda s: s[2].update(model=str(DATA / "sft.jsonl")), ["stage 'sft'", "is a file; give a model folder"]),
    "a folder without a model": (
        lambda s: s[2].update(model=str(DATA)), ["stage 'sft'", "holds no model (none of config.json"]),
    "a model mapping naming a file that is not GGUF": (
        lambda s: s[2].update(model={"path": str(REPO / "tests"), "gguf_file": "conftest.py"}),
        ["stage 'sft'", "is a file; give a model folder"]),
    "unknown stage type": (
        lambda s: s[2].update(type="stf"), ["stage 'sft'", "unknown stage type 'stf'", "did you mean 'sft'"]),
    "duplicate stage name": (
        lambda s: s[2].update(name="base"), ["duplicate stage name"]),
    "peft key not a LoraConfig field": (
        lambda s: s[2].update(peft={"rank": 8}), ["stage 'sft'", "peft.rank", "not a field of LoraConfig"]),
    "unknown adapter mode": (
        lambda s: s[2].update(peft={"adapter": "resume"}), ["stage 'sft'", "peft.adapter: must be one of stack, continue"]),
    "continuing an adapter from full weights": (
        lambda s: s[2].update(peft={"adapter": "continue"}),
        ["stage 'sft'", "needs `model` to be a LoRA adapter", "stage 'base' saves full weights"]),
    "continued adapter given new LoRA settings": (
        lambda s: (s[1].update(peft={"r": 4}), s[2].update(peft={"adapter": "continue", "r": 8})),
        ["stage 'sft'", "peft.r: a continued adapter keeps its own LoraConfig"]),
    "continuing an adapter in a stage that cannot": (
        lambda s: s[1].update(peft={"adapter": "continue"}), ["stage 'base'", "continue works in dpo, grpo, sft stages, not in pretrain"]),
    "fresh model without tokenizer": (
        lambda s: s[1].pop("tokenizer"), ["stage 'base'", "needs `tokenizer:`"]),
}


def test_gguf_file_is_checked(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a model")
    code, out = validate(tmp_path, capsys, mutate(lambda s: s[2].update(model={"path": str(tmp_path), "gguf_file": "model.gguf"})))
    assert code != 0 and f"'{fake}' is not a GGUF file" in out
    fake.write_bytes(b"GGUF" + bytes(20))  # the magic bytes: loadable as far as validate can tell without reading it
    code, out = validate(tmp_path, capsys, mutate(lambda s: s[2].update(model=str(fake))))
    assert code == 0, out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe_is_reported(case, tmp_path, capsys):
    edit, expected = CASES[case]
    code, out = validate(tmp_path, capsys, mutate(edit))
    assert code != 0
    assert str(tmp_path / "recipe.yaml") in out
    for fragment in expected:
        assert fragment in out, f"{fragment!r} not in:\n{out}"


def test_unknown_top_level_key_and_default(tmp_path, capsys):
    code, out = validate(tmp_path, capsys, tiny_stages(), sead=1, defaults={"logging_stesp": 1})
    assert code != 0
    assert "unknown key 'sead'" in out and "did you mean 'seed'" in out
    assert "defaults.logging_stesp" in out and "did you mean 'logging_steps'" in out


def test_all_problems_reported_at_once(tmp_path, capsys):
    def edit(s):
        s[1].update(block_sise=1)
        s[2]["args"].update(learning_rat=1)
    code, out = validate(tmp_path, capsys, mutate(edit))
    assert code != 0 and "block_sise" in out and "learning_rat" in out


def test_a_value_of_the_wrong_type_leaves_the_other_stages_checked(tmp_path, capsys):
    """A stage whose value failed its type check is not checked further (its value is None), and every other
    stage's cross-field checks still run in the same pass, their problems listed with it."""
    def edit(s):
        s[1]["block_size"] = "sixty-four"
        s[2]["model"] = "bse"  # a reference to no earlier stage
    code, out = validate(tmp_path, capsys, mutate(edit))
    assert code != 0
    assert "stage 'base': block_size: expected int" in out
    assert "stage 'sft': model: " in out and "did you mean 'base'" in out


def test_malformed_jsonl_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = (DATA / "sft.jsonl").read_text().splitlines()[:5]
    lines[3] = lines[3][:-3]  # cut the closing braces of line 4
    bad.write_text("\n".join(lines) + "\n")
    code, out = validate(tmp_path, capsys, mutate(lambda s: s[2]["dataset"].update(path=str(bad))))
    assert code != 0
    assert f"{bad} line 4: invalid JSON" in out


def test_wrong_columns_are_reported(tmp_path, capsys):
    data = tmp_path / "cols.jsonl"
    data.write_text('{"question": "a", "reply": "b"}\n' * 4)
    code, out = validate(tmp_path, capsys, mutate(lambda s: s[2]["dataset"].update(path=str(data))))
    assert code != 0
    assert "stage 'sft'" in out and "['question', 'reply']" in out and "messages" in out


def test_column_rename_fixes_columns(tmp_path, capsys):
    data = tmp_path / "cols.jsonl"
    data.write_text('{"question": "a", "reply": "b"}\n' * 4)
    renamed = mutate(lambda s: s[2]["dataset"].update(path=str(data), columns={"question": "prompt", "reply": "completion"}))
    code, out = validate(tmp_path, capsys, renamed)
    assert code == 0, out


def test_empty_dataset_is_reported(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    code, out = validate(tmp_path, capsys, mutate(lambda s: s[2]["dataset"].update(path=str(data))))
    assert code != 0 and "empty dataset" in out


def test_set_overrides_and_reports_unknown_stage(tmp_path, capsys):
    path = write_recipe(tmp_path, tiny_stages())
    assert main(["validate", str(path), "--set", "stages.sft.args.max_steps=3"]) == 0
    assert main(["validate", str(path), "--set", "stages.sfft.args.max_steps=3"]) != 0
    assert "no stage 'sfft'; did you mean 'sft'?" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "stages.sft.args.max_stesp=3"]) != 0
    assert "did you mean 'max_steps'" in capsys.readouterr().err


def test_override_value_is_typed(tmp_path):
    from pipeline.validation.recipe_checks import load_recipe

    stages = copy.deepcopy(tiny_stages())
    recipe = load_recipe(write_recipe(tmp_path, stages), ["seed=3", "stages.base.block_size=32"])
    assert recipe.seed == 3 and recipe.stage("base").block_size == 32


def test_ppo_under_zero3_is_refused_before_anything_trains(tmp_path, capsys, monkeypatch):
    """What `accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml` hands each process."""
    stages = tiny_stages() + [{"name": "ppo", "type": "ppo", "model": "sft", "rewards": [{"function": "exact_match"}],
                               "dataset": str(DATA / "prompts.jsonl")}]
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    code, out = validate(tmp_path, capsys, stages)
    assert code == 0, out
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    code, out = validate(tmp_path, capsys, stages)
    assert code == 2 and "stage 'ppo': type ppo cannot run under DeepSpeed ZeRO-3" in out
    recipe = str(tmp_path / "recipe.yaml")
    assert main(["run", recipe]) == 2 and not (tmp_path / "run").exists()  # refused before the run directory exists
    from pipeline.validation.preflight import check_launch
    from pipeline.validation.recipe_checks import load_recipe

    check_launch(load_recipe(recipe), ["tok", "base", "sft"])  # a launch that leaves PPO out may run


def test_a_passing_verdict_is_replayed_until_anything_the_checks_read_changes(tmp_path):
    """A recipe that passed is not checked again (nor torch imported) until its text, a file it names, the
    libraries or the code change; a failing one is checked every time; no secret reaches the cache."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join((DATA / "sft.jsonl").read_text().splitlines(keepends=True)[:200]))
    stages = tiny_stages()
    stages[2]["dataset"]["path"] = str(data)
    recipe = write_recipe(tmp_path, stages)

    def validate(*extra: str) -> tuple[int, str, str, str]:
        code = (f"import sys\nfrom pipeline.cli import main\nrc = main(['validate', {str(recipe)!r}, *{list(extra)!r}])\n"
                "print('imported:', ','.join(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))\n"
                "sys.exit(rc)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "HF_TOKEN": "hf_not_a_real_secret"})
        out, _, imported = done.stdout.rpartition("imported:")
        return done.returncode, out, done.stderr, imported.strip()

    code, checked, _, imported = validate()
    assert code == 0 and "valid (3 stages" in checked and imported == "torch,transformers,trl"
    code, replayed, err, imported = validate()
    assert code == 0 and replayed == checked and imported == ""
    assert "nothing the checks read has changed" in err
    assert validate("--no-cache")[3] == "torch,transformers,trl"

    code, _, err, _ = validate("--set", "stages.sft.args.learning_rate=-1")  # another recipe text: checked
    assert code == 2 and "learning_rate: must be > 0" in err
    with data.open("a") as f:  # a file it names changed: checked, and the failure is not remembered
        f.write("{not json\n")
    for _ in range(2):
        code, _, err, imported = validate()
        assert code != 0 and "line 201" in err and imported
    secrets = [p for p in Path(os.environ["PIPELINE_CACHE_DIR"]).rglob("*") if p.is_file()
               and "hf_not_a_real_secret" in p.read_text()]
    assert not secrets
