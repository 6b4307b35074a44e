"""Bad recipes a new user writes, each refused before anything trains: a non-zero exit, no traceback, and a message
that names the stage and the key, or the file and its line numbers, with the bad value and what would be valid.

The table runs `pipeline validate` in-process (seconds for all of it). A few real processes check exit codes and
the absence of tracebacks end to end, and a real tiny run directory shows that a refused or failed rerun leaves
earlier outputs as they were. (Typos, wrong types and references: tests/test_validate.py; missing columns and
chat templates: tests/test_bad_input.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from pipeline.cli import main
from tests.conftest import DATA, REPO, summary, tiny_stages, write_recipe

PREFS, PROMPTS, SFT = DATA / "prefs.jsonl", DATA / "prompts.jsonl", DATA / "sft.jsonl"


def stages_with_extra() -> list[dict[str, Any]]:
    """tokenizer -> pretrain -> sft, then a reward, a DPO and a GRPO stage on the quickstart data."""
    prefs = {"path": str(PREFS), "max_samples": 120, "test_size": 0.15}
    return tiny_stages() + [
        {"name": "rm", "type": "reward", "model": "sft", "dataset": dict(prefs)},
        {"name": "dpo", "type": "dpo", "model": "sft", "dataset": dict(prefs)},
        {"name": "grpo", "type": "grpo", "model": "sft", "dataset": {"path": str(PROMPTS)},
         "rewards": [{"function": "exact_match"}]},
    ]


def rows(path: Path, limit: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()[:limit]]


def write_rows(path: Path, data: list[Any], blank_after: int | None = None) -> Path:
    """JSONL, with one blank line after row `blank_after` so that file lines and row positions differ."""
    lines = [json.dumps(row) for row in data]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def data_case(stage: int, make: Callable[[Path], Path]) -> Callable[[list, Path], None]:
    """An edit pointing stage `stage`'s dataset at a file `make(tmp_path)` writes."""
    def edit(stages: list, tmp: Path) -> None:
        stages[stage]["dataset"] = {"path": str(make(tmp))}
    return edit


def prefs_missing_rejected(tmp: Path) -> Path:
    data = rows(PREFS, 120)
    for row in data[100:110]:  # file lines 101-110
        del row["rejected"]
    return write_rows(tmp / "prefs.jsonl", data)


def prefs_all_identical(tmp: Path) -> Path:
    return write_rows(tmp / "same.jsonl", [{**row, "rejected": row["chosen"]} for row in rows(PREFS, 40)])


def sft_rows(tmp: Path, bad: dict[int, Any], name: str = "sft.jsonl") -> Path:
    """The quickstart SFT rows with rows replaced at the given positions; a blank line after row 2 (so row i
    from 2 on is on file line i + 2)."""
    data = rows(SFT, 40)
    for index, row in bad.items():
        data[index] = row
    return write_rows(tmp / name, data, blank_after=2)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def truncated_line(tmp: Path) -> Path:
    lines = SFT.read_text().splitlines()[:5]
    lines[3] = lines[3][:-3]  # line 4 loses its closing brackets
    (tmp / "cut.jsonl").write_text("\n".join(lines) + "\n")
    return tmp / "cut.jsonl"


CUT_COLUMN = SFT.read_text().splitlines()[3][:-3].rindex('"') + 1  # line 4 ends in a string left open here


def set_args(stage: int, **args: Any) -> Callable[[list, Path], None]:
    return lambda stages, tmp: stages[stage].setdefault("args", {}).update(args)


def set_key(stage: int, **keys: Any) -> Callable[[list, Path], None]:
    return lambda stages, tmp: stages[stage].update(keys)


def set_model(**keys: Any) -> Callable[[list, Path], None]:
    return lambda stages, tmp: stages[1]["model"].update(keys)


def add_eval(**keys: Any) -> Callable[[list, Path], None]:
    """An eval stage after the others, scoring DPO against SFT unless `keys` say otherwise."""
    stage = {"name": "ev", "type": "eval", "models": ["dpo"], "dataset": str(DATA / "eval.jsonl"), "reward_model": "rm"}
    return lambda stages, tmp: stages.append({**stage, **keys})


def epochs_zero(stages: list, tmp: Path) -> None:
    del stages[2]["args"]["max_steps"]
    stages[2]["args"]["num_train_epochs"] = 0


def output_dir_is_a_file(stages: list, tmp: Path) -> dict[str, Any]:
    (tmp / "taken").write_text("not a folder")
    return {"output_dir": str(tmp / "taken")}


def output_dir_under_a_file(stages: list, tmp: Path) -> dict[str, Any]:
    (tmp / "taken").write_text("not a folder")
    return {"output_dir": str(tmp / "taken" / "run")}


# case: (edit(stages, tmp_path) -> optional top-level recipe keys, fragments the message must contain).
# Stages: 0 tok, 1 base, 2 sft, 3 rm, 4 dpo, 5 grpo.
CASES: dict[str, tuple[Callable[[list, Path], Any], list[str]]] = {
    # ---- training arguments the config classes accept but that cannot train
    "negative learning rate": (set_args(2, learning_rate=-1e-3),
                               ["stage 'sft'", "args.learning_rate: must be > 0, got -0.001"]),
    "zero learning rate": (set_args(4, learning_rate=0), ["stage 'dpo'", "args.learning_rate: must be > 0, got 0"]),
    "max_length 0": (set_args(2, max_length=0), ["stage 'sft'", "args.max_length: must be a positive number", "got 0"]),
    "reward max_length 0": (set_args(3, max_length=0), ["stage 'rm'", "args.max_length", "got 0"]),
    "num_train_epochs 0": (epochs_zero, ["stage 'sft'", "args.num_train_epochs: must be > 0", "got 0"]),
    "max_steps 0": (set_args(1, max_steps=0), ["stage 'base'", "args.max_steps: must be > 0", "got 0"]),
    "negative max_steps": (set_args(2, max_steps=-5), ["stage 'sft'", "args.max_steps", "got -5"]),
    "batch size 0": (set_args(2, per_device_train_batch_size=0),
                     ["stage 'sft'", "args.per_device_train_batch_size: must be >= 1, got 0"]),
    "gradient accumulation 0": (set_args(4, gradient_accumulation_steps=0),
                                ["stage 'dpo'", "args.gradient_accumulation_steps: must be >= 1, got 0"]),
    "negative DPO beta": (set_args(4, beta=-0.1), ["stage 'dpo'", "args.beta: must be >= 0, got -0.1"]),
    "GRPO temperature 0": (set_args(5, temperature=0.0), ["stage 'grpo'", "args.temperature: must be > 0"]),
    "GRPO max_completion_length 0": (set_args(5, max_completion_length=0),
                                     ["stage 'grpo'", "args.max_completion_length", "got 0"]),
    "negative weight decay": (set_args(2, weight_decay=-0.01), ["stage 'sft'", "args.weight_decay: must be >= 0"]),
    # ---- keys from other libraries, pointed to this one's
    "kl_coef in a GRPO stage": (set_args(5, kl_coef=0.05),
                                ["stage 'grpo'", "args.kl_coef: not a field of GRPOConfig", "did you mean 'beta'?"]),
    "lr for learning_rate": (set_args(2, lr=1e-3), ["stage 'sft'", "args.lr", "did you mean 'learning_rate'?"]),
    "epochs for num_train_epochs": (set_args(3, epochs=2), ["stage 'rm'", "args.epochs", "did you mean 'num_train_epochs'?"]),
    "peft rank for r": (set_key(4, peft={"rank": 16}), ["stage 'dpo'", "peft.rank", "did you mean 'r'?"]),
    "peft alpha for lora_alpha": (set_key(2, peft={"alpha": 16}), ["stage 'sft'", "peft.alpha", "did you mean 'lora_alpha'?"]),
    # ---- the model: a fresh config, LoRA targets
    "vocab_size 0": (set_key(0, vocab_size=0), ["stage 'tok'", "vocab_size: must be at least 260", "got 0"]),
    "vocab_size below the byte alphabet": (set_key(0, vocab_size=200), ["stage 'tok'", "vocab_size", "got 200"]),
    "min_frequency 0": (set_key(0, min_frequency=0), ["stage 'tok'", "min_frequency: must be >= 1, got 0"]),
    "block_size 0": (set_key(1, block_size=0), ["stage 'base'", "block_size: must be >= 1, got 0"]),
    "hidden size not divisible by heads": (set_model(hidden_size=32, num_attention_heads=3),
                                           ["stage 'base'", "model: LlamaConfig rejects", "hidden size (32)",
                                            "not a multiple of the number of attention heads (3)"]),
    "model config key typo": (set_model(hidden_sise=64),
                              ["stage 'base'", "model.hidden_sise: not a field of LlamaConfig", "did you mean 'hidden_size'?"]),
    "unknown architecture": (set_model(architecture="lama"),
                             ["stage 'base'", "model.architecture: unknown model type 'lama'", "did you mean 'llama'?"]),
    "LoRA target missing from a fresh model": (set_key(1, peft={"target_modules": ["c_attn"]}),
                                               ["stage 'base'", "peft.target_modules: 'c_attn' is not a module",
                                                "q_proj"]),
    "LoRA target missing upstream": (set_key(2, peft={"target_modules": ["q_proj", "query_key_value"]}),
                                     ["stage 'sft'", "'query_key_value' is not a module", "v_proj"]),
    "LoRA target typo": (set_key(4, peft={"target_modules": ["q_prj"]}),
                         ["stage 'dpo'", "'q_prj' is not a module", "did you mean 'q_proj'?"]),
    "LoRA target pattern matching nothing": (set_key(3, peft={"target_modules": r".*\.attn\.c_proj"}),
                                             ["stage 'rm'", "the pattern", "matches no module"]),
    # ---- a stage named in a role its output cannot play
    "eval reward model that is a policy": (add_eval(reward_model="sft"),
                                           ["stage 'ev'", "reward_model: stage 'sft' (sft) is not a reward model"]),
    "eval extra reward model that is a policy": (add_eval(extra_reward_models=["dpo"]),
                                                 ["stage 'ev'", "extra_reward_models: stage 'dpo' (dpo) is not a reward"]),
    "eval generating with a reward model": (add_eval(models=["dpo", "rm"]),
                                            ["stage 'ev'", "models: stage 'rm' is a reward model", "cannot write them"]),
    "GRPO rewarded by a policy": (set_key(5, rewards=[{"reward_model": "sft"}]),
                                  ["stage 'grpo'", "rewards.reward_model: stage 'sft' (sft) is not a reward model"]),
    # ---- the output directory
    "output_dir is a file": (output_dir_is_a_file, ["output_dir:", "taken is a file, not a folder"]),
    "output_dir under a file": (output_dir_under_a_file, ["output_dir:", "taken, above", "is a file"]),
    # ---- data, named by file line
    "rows missing rejected": (data_case(4, prefs_missing_rejected),
                              ["stage 'dpo'", "prefs.jsonl", "lines 101-110", "missing 'rejected' (10 rows)"]),
    "chosen equals rejected on every row": (data_case(3, prefs_all_identical),
                                            ["stage 'rm'", "same.jsonl", "in all 40 rows 'chosen' equals 'rejected'"]),
    "a chosen that is a number": (data_case(4, lambda tmp: write_rows(tmp / "num.jsonl", [
        *rows(PREFS, 6)[:4], {"prompt": [user("q")], "chosen": 3, "rejected": [bot("x")]}, *rows(PREFS, 6)[4:]],
        blank_after=1)),
        ["stage 'dpo'", "num.jsonl line 6: column 'chosen' is a number where other rows have a list of objects"]),
    "a chosen that is a list of strings": (data_case(3, lambda tmp: write_rows(tmp / "strs.jsonl", [
        {"chosen": ["a", "b"], "rejected": ["c", "d"]}] * 3, blank_after=2)),
        ["stage 'rm'", "strs.jsonl': lines 1-2, 4: 'chosen': message 0 is not a {role, content} mapping: 'a' (3 rows)"]),
    "message role outside system/user/assistant": (data_case(2, lambda tmp: sft_rows(tmp, {
        5: {"messages": [{"role": "human", "content": "hi"}, bot("hello")]}})),
        ["stage 'sft'", "sft.jsonl", "line 7", "role 'human'", "roles are system, user, assistant", "did you mean 'user'?"]),
    "empty messages list": (data_case(2, lambda tmp: sft_rows(tmp, {9: {"messages": []}, 12: {"messages": []}})),
                            ["stage 'sft'", "lines 11, 14", "'messages': an empty message list (2 rows)"]),
    "messages not ending with the assistant": (data_case(2, lambda tmp: sft_rows(tmp, {0: {"messages": [user("q")]}})),
                                               ["stage 'sft'", "line 1", "the last message must be the assistant's"]),
    "a message without content": (data_case(2, lambda tmp: sft_rows(tmp, {3: {"messages": [{"role": "user"}, bot("a")]}})),
                                  ["stage 'sft'", "line 5: 'messages': message 0 has no content"]),
    "a null completion": (data_case(2, lambda tmp: write_rows(tmp / "pc.jsonl", [
        {"prompt": "q", "completion": "a"}] * 7 + [{"prompt": "q", "completion": None}])),
        ["stage 'sft'", "pc.jsonl", "line 8", "missing 'completion'"]),
    "a null prompt for GRPO": (data_case(5, lambda tmp: write_rows(tmp / "p.jsonl", [
        {"prompt": "q", "answer": "1"}] * 3 + [{"prompt": None, "answer": "1"}])),
        ["stage 'grpo'", "p.jsonl", "line 4", "missing 'prompt'"]),
    "an empty prompt for GRPO": (data_case(5, lambda tmp: write_rows(tmp / "pe.jsonl", [
        {"prompt": "q", "answer": "1"}] * 3 + [{"prompt": " ", "answer": "1"}])),
        ["stage 'grpo'", "pe.jsonl", "line 4", "empty 'prompt'"]),
    "numbers where SFT needs text": (data_case(2, lambda tmp: write_rows(tmp / "pn.jsonl", [
        {"prompt": "1 + 1 =", "completion": 2}] * 8)),
        ["stage 'sft'", "pn.jsonl", "lines 1-8: 'completion' is a int, not text (8 rows)"]),
    "pointwise score that is not a number": (data_case(3, lambda tmp: write_rows(tmp / "pw.jsonl", [
        {"prompt": "q", "response": "a", "score": 1}, {"prompt": "q", "response": "b", "score": "high"}], blank_after=1)),
        ["stage 'rm'", "pw.jsonl line 3: column 'score' is a string where other rows have a number"]),
    "pointwise score that is null": (data_case(3, lambda tmp: write_rows(tmp / "pn.jsonl", [
        {"prompt": "q", "response": "a", "score": 1}, {"prompt": "q", "response": "b", "score": None}], blank_after=1)),
        ["stage 'rm'", "pn.jsonl': line 3: missing 'score'"]),
    "listwise scores of the wrong length": (data_case(4, lambda tmp: write_rows(tmp / "lw.jsonl", [
        {"prompt": "q", "responses": ["a", "b"], "scores": [1.0, 0.0]}] * 2 + [
        {"prompt": "q", "responses": ["a", "b"], "scores": [1.0]}])),
        ["stage 'dpo'", "lw.jsonl", "line 3: column 'scores' must be a list of 2 numbers"]),
    "malformed JSONL line": (data_case(2, truncated_line),
                             ["stage 'sft'", "cut.jsonl line 4: invalid JSON: Unterminated string",
                              f"(column {CUT_COLUMN})"]),
    "a JSONL line that is not an object": (data_case(2, lambda tmp: write_rows(tmp / "arr.jsonl", [
        *rows(SFT, 3), ["not", "an", "object"]])), ["arr.jsonl line 4: expected a JSON object, got list"]),
    "integer test_size above the row count": (lambda stages, tmp: stages[2]["dataset"].update(test_size=500),
                                              ["stage 'sft'", "dataset.test_size: 500 holds out 500 of the 400 rows",
                                               "a fraction such as 0.1"]),
    "integer test_size equal to the row count": (lambda stages, tmp: stages[3]["dataset"].update(test_size=120),
                                                 ["stage 'rm'", "test_size: 120 holds out 120 of the 120 rows"]),
    "split of a local file": (lambda stages, tmp: stages[2]["dataset"].update(split="test"),
                              ["stage 'sft'", "`split: test` names a split of a Hub dataset"]),
    "max_samples 0": (lambda stages, tmp: stages[2]["dataset"].update(max_samples=0),
                      ["stage 'sft'", "max_samples must be at least 1"]),
    "a rename onto a column that exists": (lambda stages, tmp: stages.__setitem__(2, {**stages[2], "dataset": {
        "path": str(write_rows(tmp / "qpc.jsonl", [{"question": "q", "prompt": "p", "completion": "a"}] * 8)),
        "columns": {"question": "prompt"}}}), ["stage 'sft'", "qpc.jsonl", "would give two columns"]),
    "a JSON array in a .jsonl file": (data_case(2, lambda tmp: (tmp / "array.jsonl").write_text(
        json.dumps([{"prompt": "q", "completion": "a"}] * 8, indent=1)) and tmp / "array.jsonl"),
        ["stage 'sft'", "array.jsonl: holds a JSON array", "name it .json"]),
    "source weight 0": (lambda stages, tmp: stages[2]["dataset"].update(weight=0), ["stage 'sft'", "weight must be > 0"]),
}


def validate_case(case: str, tmp_path: Path, capsys) -> tuple[int, str]:
    edit, _ = CASES[case]
    stages = stages_with_extra()
    top = edit(stages, tmp_path) or {}
    code = main(["validate", str(write_recipe(tmp_path, stages, **top))])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_the_table_has_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe_is_refused_with_a_message_naming_it(case, tmp_path, capsys):
    code, out = validate_case(case, tmp_path, capsys)
    assert code != 0, out
    assert "Traceback" not in out and "valid (" not in out
    for fragment in CASES[case][1]:
        assert fragment in out, f"{fragment!r} not in:\n{out}"


def test_partly_degenerate_data_is_a_warning_with_counts(tmp_path, capsys):
    data = rows(PREFS, 60)
    for row in data[10:13] + data[40:41]:  # file lines 11-13 and 41
        row["rejected"] = row["chosen"]
    stages = stages_with_extra()
    stages[4]["dataset"] = {"path": str(write_rows(tmp_path / "some.jsonl", data))}
    code = main(["validate", str(write_recipe(tmp_path, stages))])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (f"warning: stage 'dpo': dataset '{tmp_path / 'some.jsonl'}': lines 11-13, 41: 'chosen' equals 'rejected' "
            "in 4 of 60 rows") in err


def test_rl_sampling_from_a_cut_distribution_is_a_warning(tmp_path, capsys):
    """top_p, top_k or min_p on a stage that trains on its samples: valid, and warned about, stage by stage."""
    stages = stages_with_extra() + [{"name": "ppo", "type": "ppo", "model": "sft", "reward_model": "rm",
                                     "dataset": {"path": str(PROMPTS)}}]
    code = main(["validate", str(write_recipe(tmp_path, stages)), "--no-cache"])
    assert code == 0 and "draws rollouts from a cut distribution" not in capsys.readouterr().err
    stages[5]["args"] = {"top_k": 20, "temperature": 0.9}
    stages[6]["args"] = {"top_p": 0.9}
    code = main(["validate", str(write_recipe(tmp_path, stages)), "--no-cache"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "stage 'grpo': top_k: 20 draws rollouts from a cut distribution" in err
    assert "stage 'ppo': top_p: 0.9 draws rollouts from a cut distribution" in err


def test_sound_variations_stay_valid(tmp_path, capsys):
    """The checks refuse what cannot train, not what merely looks unusual."""
    stages = stages_with_extra()
    stages[2]["peft"] = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    stages[3]["peft"] = {"target_modules": r".*\.(q_proj|v_proj)"}
    stages[2]["args"].update(max_length=None, max_steps=-1, num_train_epochs=1)
    stages[2]["dataset"]["test_size"] = 399
    code = main(["validate", str(write_recipe(tmp_path, stages))])
    assert code == 0, capsys.readouterr().err


# ---------------------------------------------------------------- real processes, a real run directory
def pipeline_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """tokenizer -> pretrain -> sft, trained for a few steps; the run directory is `<folder>/run`."""
    folder = tmp_path_factory.mktemp("bad-recipes-run")
    write_recipe(folder, tiny_stages(pretrain_steps=4, sft_steps=4))
    result = pipeline_cli("run", str(folder / "recipe.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_refused_recipe_leaves_the_run_directory_untouched(tiny_run):
    run = tiny_run / "run"
    before = {name: digest(run / name / "output") for name in ("tok", "base", "sft")}
    summary_before = (run / "summary.json").read_bytes()
    result = pipeline_cli("run", str(tiny_run / "recipe.yaml"), "--set", "stages.sft.args.learning_rate=-1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "stage 'sft': args.learning_rate: must be > 0, got -1" in result.stderr
    assert {name: digest(run / name / "output") for name in before} == before
    assert (run / "summary.json").read_bytes() == summary_before


def test_failed_rerun_keeps_the_last_good_output_and_the_report_says_so(tiny_run):
    run = tiny_run / "run"
    sft_output, sft_result = digest(run / "sft" / "output"), (run / "sft" / "result.json").read_text()
    # Valid, but every prompt fills max_length=8: the changed stage fails once it has prepared its data.
    result = pipeline_cli("run", str(tiny_run / "recipe.yaml"), "--set", "stages.sft.args.max_length=8")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == [
        "error: stage 'sft': all 360 training rows have prompts of max_length=8 tokens or more, so no completion "
        "token is left to train on; raise args.max_length"]
    assert digest(run / "sft" / "output") == sft_output  # the previous good output is kept
    assert (run / "sft" / "result.json").read_text() == sft_result  # still marked with the inputs it came from
    statuses = {name: s["status"] for name, s in summary(run)["stages"].items()}
    assert statuses == {"tok": "skipped", "base": "skipped", "sft": "failed"}
    report = (run / "report.md").read_text()
    assert "| sft | sft | failed (see sft/error.txt) |" in report and "| base | pretrain | skipped |" in report

    # The recipe as it was: the kept output is still the complete result for those inputs, so nothing reruns.
    result = pipeline_cli("run", str(tiny_run / "recipe.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[3/3] sft: skipped, already completed with the same inputs" in result.stdout
    assert "| sft | sft | skipped |" in (run / "report.md").read_text()


def test_no_op_rerun_keeps_the_stage_timings(tiny_run):
    run = tiny_run / "run"
    assert pipeline_cli("run", str(tiny_run / "recipe.yaml")).returncode == 0
    timings = json.loads((run / "manifest.json").read_text())["stage_seconds"]
    assert set(timings) == {"tok", "base", "sft"} and all(t > 0 for t in timings.values())
    assert timings == {name: json.loads((run / name / "result.json").read_text())["seconds"] for name in timings}


def test_an_error_inside_a_stage_is_one_line_and_debug_shows_the_traceback(tiny_run):
    """Also: no progress bars and no library notices the user cannot act on (a reward model's fresh score head
    is expected, so transformers' LOAD REPORT of it is not shown)."""
    stages = tiny_stages(pretrain_steps=4, sft_steps=4) + [
        {"name": "rm", "type": "reward", "model": "sft", "dataset": {"path": str(PREFS), "max_samples": 40},
         "args": {"max_steps": 2, "per_device_train_batch_size": 8}},
        {"name": "grpo", "type": "grpo", "model": "sft", "dataset": {"path": str(PROMPTS), "max_samples": 32},
         "rewards": [{"function": "tests.faulty:reward_failing"}],
         "args": {"max_steps": 1, "num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 4}}]
    (tiny_run / "failing").mkdir()
    recipe = write_recipe(tiny_run / "failing", stages, output_dir=str(tiny_run / "run"))
    result = pipeline_cli("run", str(recipe))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: stage 'grpo' failed: RuntimeError: a reward function with a bug (the traceback is in "
                     f"{tiny_run / 'run' / 'grpo' / 'error.txt'}; --debug or PIPELINE_DEBUG=1 prints it)"]
    assert "a reward function with a bug" in (tiny_run / "run" / "grpo" / "error.txt").read_text()
    assert "[5/5] grpo: failed after" in result.stdout
    assert "[4/4] rm: completed in" not in result.stdout and "[4/5] rm: completed in" in result.stdout
    assert [line.split()[:2] for line in result.stdout.splitlines()[-6:]] == [  # the end-of-run table
        ["stage", "status"], ["tok", "skipped"], ["base", "skipped"], ["sft", "skipped"], ["rm", "completed"],
        ["grpo", "failed"]]
    console = result.stdout + result.stderr
    assert "\r" not in console and "it/s]" not in console  # no progress bars
    assert "LOAD REPORT" not in console and "MISSING" not in console

    debug = pipeline_cli("run", str(recipe), env={"PIPELINE_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "RuntimeError: a reward function with a bug" in debug.stderr


def test_lora_targets_are_checked_against_a_local_model_folder(tiny_run, tmp_path, capsys):
    stage = {"name": "more", "type": "sft", "model": str(tiny_run / "run" / "sft" / "output"),
             "dataset": {"path": str(SFT), "max_samples": 50}, "peft": {"target_modules": ["c_attn", "v_proj"]}}
    code = main(["validate", str(write_recipe(tmp_path, [stage]))])
    err = capsys.readouterr().err
    assert code == 2
    assert "stage 'more': peft.target_modules: 'c_attn' is not a module of the model" in err and "v_proj'" not in err
    stage["peft"] = {"target_modules": ["q_proj", "v_proj"]}
    assert main(["validate", str(write_recipe(tmp_path, [stage]))]) == 0, capsys.readouterr().err
