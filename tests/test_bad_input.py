"""Bad input is caught before training, each case with one clear message and a non-zero exit: datasets without
the columns a stage needs, chat messages for a tokenizer without a chat template, prompts longer than the maximum.

(Typos, wrong types, unknown stage references, missing files and malformed JSONL: tests/test_validate.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import DATA, summary, tiny_stages, write_recipe


def chain_stages() -> list[dict]:
    """tokenizer -> pretrain -> sft -> reward, dpo, grpo on the quickstart data."""
    prefs = {"path": str(DATA / "prefs.jsonl"), "max_samples": 120, "test_size": 0.15}
    return tiny_stages() + [
        {"name": "rm", "type": "reward", "model": "sft", "dataset": dict(prefs)},
        {"name": "dpo", "type": "dpo", "model": "sft", "dataset": dict(prefs)},
        {"name": "grpo", "type": "grpo", "model": "sft", "dataset": {"path": str(DATA / "prompts.jsonl")},
         "rewards": [{"function": "exact_match"}]},
    ]


def validate(tmp_path: Path, capsys, stages: list[dict]) -> tuple[int, str]:
    code = main(["validate", str(write_recipe(tmp_path, stages))])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


COLUMN_CASES = {  # stage: (its index in chain_stages, a row lacking what it needs, the expected message)
    "tokenizer": (0, {"content": "a b"}, "expected one of these formats: text: text"),
    "pretrain": (1, {"content": "a b"}, "expected one of these formats: text: text"),
    "sft": (2, {"question": "a", "reply": "b"}, "expected one of these formats: messages: messages;"),
    "reward": (3, {"question": "a", "good": "b", "bad": "c"}, "pairwise: chosen, rejected;"),
    "dpo": (4, {"question": "a", "good": "b", "bad": "c"}, "pairwise: chosen, rejected;"),
    "grpo": (5, {"question": "a", "answer": "1"}, "expected one of these formats: prompts: prompt"),
    "grpo exact_match": (5, {"prompt": "a"}, "the exact_match reward needs column(s) ['answer']"),
}


@pytest.mark.parametrize("case", list(COLUMN_CASES))
def test_missing_columns_for_each_stage_type(case, tmp_path, capsys):
    index, row, expected = COLUMN_CASES[case]
    data = tmp_path / "bad.jsonl"
    data.write_text((json.dumps(row) + "\n") * 4)
    stages = chain_stages()
    stages[index]["dataset"] = {"path": str(data)}
    code, out = validate(tmp_path, capsys, stages)
    assert code == 1
    assert f"stage '{stages[index]['name']}': dataset '{data}'" in out and expected in out, out


@pytest.fixture(scope="module")
def no_template_tokenizer(tmp_path_factory) -> Path:
    """A model folder whose tokenizer has no chat template (as many base models ship); only validated, never loaded,
    so a config stands in for the weights."""
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from pipeline.stages.tokenizer import BOS, EOS, PAD, train_bpe

    folder = tmp_path_factory.mktemp("plain-tokenizer")
    texts = [json.loads(line)["text"] for line in (DATA / "pretrain.jsonl").read_text().splitlines()[:200]]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_bpe(texts, 300, 2), bos_token=BOS, eos_token=EOS,
                                        pad_token=PAD)
    tokenizer.save_pretrained(folder)
    LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(folder)
    assert tokenizer.chat_template is None
    return folder


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo", "sft after pretraining"])
def test_chat_messages_need_a_chat_template(stage, no_template_tokenizer, tmp_path, capsys):
    stages = chain_stages()
    if stage == "sft after pretraining":  # the tokenizer reaches sft through `base`, trained on it
        stages[1]["tokenizer"] = str(no_template_tokenizer)
        stage, index = "sft", 2
    else:
        index = [s["name"] for s in stages].index(stage)
        stages[index]["model"] = str(no_template_tokenizer)
    code, out = validate(tmp_path, capsys, stages)
    assert code == 1
    assert f"stage '{stage}'" in out and "the rows are chat messages, which need a chat template" in out, out
    assert f"the tokenizer of '{no_template_tokenizer}' has none" in out


def test_plain_text_rows_need_no_chat_template(no_template_tokenizer, tmp_path, capsys):
    data = tmp_path / "plain.jsonl"
    data.write_text((json.dumps({"prompt": "What is 1 + 1?", "completion": " 2"}) + "\n") * 4)
    stages = chain_stages()[:3]
    stages[1]["tokenizer"] = str(no_template_tokenizer)
    stages[2]["dataset"] = {"path": str(data)}
    code, out = validate(tmp_path, capsys, stages)
    assert code == 0, out


def test_over_long_prompts_are_counted_before_training(tmp_path, capsys):
    """Quickstart prompts are 24-33 tokens. SFT drops (TRL, silently) rows whose prompt fills max_length, DPO cuts
    over-long pairs, GRPO cannot fit long prompts in a small context: counted and reported before each trains."""
    stages = tiny_stages(pretrain_steps=2, sft_steps=2)
    stages[1]["model"]["max_position_embeddings"] = 64  # a small context, for GRPO's check
    stages[2]["args"]["max_length"] = 28
    stages += [
        {"name": "dpo", "type": "dpo", "model": "sft", "dataset": {"path": str(DATA / "prefs.jsonl"),
                                                                   "max_samples": 60},
         "args": {"max_steps": 2, "per_device_train_batch_size": 8, "max_length": 30}},
        {"name": "grpo", "type": "grpo", "model": "sft", "dataset": {"path": str(DATA / "prompts.jsonl")},
         "rewards": [{"function": "exact_match"}],
         "args": {"max_steps": 2, "num_generations": 4, "per_device_train_batch_size": 8,
                  "max_completion_length": 36}},  # 64 - 36: prompts of up to 28 tokens fit
    ]
    recipe = write_recipe(tmp_path, stages)
    code = main(["run", str(recipe)])
    captured = capsys.readouterr()
    assert code == 1
    out = summary(tmp_path / "run")["stages"]

    sft = out["sft"]["metrics"]
    assert 0 < sft["train_dropped_rows"] < 360
    assert (f"stage 'sft': {sft['train_dropped_rows']:.0f} of 360 train rows dropped "
            "(prompt alone fills max_length=28)") in captured.out
    dpo = out["dpo"]["metrics"]
    assert dpo["train_truncated_pairs"] > 0 and dpo["train_dropped_pairs"] == 0  # keep_end: cut, never dropped
    assert f"stage 'dpo': {dpo['train_truncated_pairs']:.0f} of 54 train pairs longer than max_length=30" in captured.out

    assert out["grpo"]["status"] == "failed"
    assert "error: stage 'grpo': " in captured.err and "training prompts are longer than 28 tokens" in captured.err
    assert "do not fit the model's 64-token context" in captured.err
    assert not (tmp_path / "run" / "grpo" / "log_history.json").exists()  # it never trained

    # Every SFT prompt fills max_length=8: nothing would be left to train on, so the stage stops first.
    code = main(["run", str(recipe), "--set", "stages.sft.args.max_length=8"])
    assert code == 1
    assert ("error: stage 'sft': all 360 training rows have prompts of max_length=8 tokens or more"
            in capsys.readouterr().err)


def test_prompts_that_cannot_fit_the_context_stop_ppo_eval_and_generate(tmp_path, capsys):
    """Nothing truncates prompts before `generate`, so a prompt whose tokens and the new ones run past the model's
    context would be generated past its positions (silently, with rotary positions): each generating stage
    stops before it trains or generates, naming the setting to lower. Quickstart prompts are 24-33 tokens; the
    context is 64."""
    stages = tiny_stages(pretrain_steps=2, sft_steps=2)
    stages[1]["model"]["max_position_embeddings"] = 64
    prompts = {"path": str(DATA / "prompts.jsonl"), "max_samples": 24}
    stages += [
        {"name": "ppo", "type": "ppo", "model": "sft", "rewards": [{"function": "exact_match"}],
         "dataset": {**prompts, "eval": {"path": str(DATA / "eval.jsonl"), "max_samples": 8}},
         "args": {"max_steps": 1, "rollout_batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 1,
                  "max_new_tokens": 36}},  # 64 - 36: prompts of up to 28 tokens fit
        {"name": "ev", "type": "eval", "models": ["sft"], "dataset": prompts, "max_new_tokens": 36},
        {"name": "gen", "type": "generate", "model": "sft", "dataset": prompts,
         "rewards": [{"function": "exact_match"}], "num_samples": 2, "max_new_tokens": 36},
    ]
    recipe = write_recipe(tmp_path, stages)
    fits = ["--set", "stages.ppo.args.max_new_tokens=8"]
    for stage, settings, start in [("ppo", [], "error: stage 'ppo': "),
                                   ("ev", fits, "error: stage 'ev', model 'sft': "),
                                   ("gen", fits + ["--set", "stages.ev.max_new_tokens=8"], "error: stage 'gen': ")]:
        assert main(["run", str(recipe), *settings]) == 1
        err = capsys.readouterr().err
        over = int(err.split(start)[1].split(" of ")[0])
        what = "training prompts" if stage == "ppo" else "prompts"
        knob = "args.max_new_tokens" if stage == "ppo" else "max_new_tokens"
        assert 0 < over < 24 and (f"{start}{over} of 24 {what} are longer than 28 tokens (longest 33), so with "
                                  f"{knob}=36 they do not fit the model's 64-token context") in err, err
        assert summary(tmp_path / "run")["stages"][stage]["status"] == "failed"
        assert not (tmp_path / "run" / stage / "output").exists()  # it never trained or generated
    assert (tmp_path / "run" / "ppo" / "output").is_dir()  # with 8 new tokens the prompts fit, and ppo trained


def test_a_hub_dataset_that_cannot_be_loaded_stops_the_run_before_any_stage(tmp_path):
    """`validate` passes offline (Hub recipes are written where the Hub may be out of reach); `run` loads Hub data
    before its first stage, so a misspelled or unreachable dataset fails there, not after the stages before it."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    stages = tiny_stages()
    stages[2]["dataset"] = "nonexistent-org/nonexistent-dataset"
    recipe = write_recipe(tmp_path, stages)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PIPELINE_CACHE_DIR": str(tmp_path / "c")}
    validate = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(recipe)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    assert validate.returncode == 0, validate.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "stage 'sft': dataset: the Hub dataset 'nonexistent-org/nonexistent-dataset' could not be loaded" in run.stderr
    assert not (tmp_path / "run" / "tok" / "output").exists()  # no stage ran
