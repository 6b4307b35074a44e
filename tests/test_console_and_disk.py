"""Issue 29, items 4-6: harmless library messages dropped (real ones kept), held-out evaluations sized or off,
one copy of identical files on disk with the disk use of each stage."""

from __future__ import annotations

import logging
import os

from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from pipeline.config.specs import DatasetSpec, SourceSpec
from pipeline.data.loading import load_splits
from pipeline.runtime.disk import disk_use, share_identical
from pipeline.training.trainers import tied_keys_not_missing
from tests.conftest import DATA

TIED = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, tie_word_embeddings=True)


def test_resuming_a_tied_model_reports_only_keys_missing_beyond_the_tied_head(tmp_path, caplog):
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 8, "labels": [[1, 2, 3, 4]] * 8})

    def trainer() -> Trainer:
        args = TrainingArguments(str(tmp_path), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                                 report_to="none", use_cpu=True, disable_tqdm=True)
        return Trainer(model=LlamaForCausalLM(TIED), args=args, train_dataset=rows)
    trainer().train()
    resumed = trainer()
    with caplog.at_level(logging.WARNING), tied_keys_not_missing(resumed.model):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
        logging.getLogger("transformers.trainer").warning(
            "There were missing keys in the checkpoint model loaded: ['model.norm.weight'].")  # a real one
    missing = [r.getMessage() for r in caplog.records if "missing keys" in r.getMessage()]
    assert missing == ["There were missing keys in the checkpoint model loaded: ['model.norm.weight']."]


def test_eval_samples_sizes_the_held_out_rows_and_zero_holds_none_out():
    def splits(**keys):
        return load_splits(DatasetSpec(sources=[SourceSpec(path=str(DATA / "eval.jsonl"), max_samples=40)],
                                       test_size=10, **keys), seed=1, recipe_path=None)  # 40 distinct rows
    train, held_out = splits()
    sized_train, sized = splits(eval_samples=3)
    assert (len(train), len(held_out), len(sized)) == (30, 10, 3)
    assert sized_train["prompt"] == train["prompt"] and sized["prompt"] == held_out["prompt"][:3]
    every, none = splits(eval_samples=0)
    assert (len(every), len(none)) == (40, 0)


def test_identical_files_of_stages_are_one_copy_counted_once(tmp_path):
    weights = os.urandom(2 << 20)
    for stage, folder in (("dpo", "base"), ("grpo", "base"), ("rm", "output")):
        (tmp_path / stage / folder).mkdir(parents=True)
        (tmp_path / stage / folder / "model.safetensors").write_bytes(weights if stage != "rm" else weights[::-1])
    (tmp_path / "dpo" / "checkpoints").mkdir()
    (tmp_path / "dpo" / "checkpoints" / "model.safetensors").write_bytes(weights)  # written in place: never linked
    before = disk_use(tmp_path, ["dpo", "grpo", "rm"])
    assert share_identical(tmp_path, tmp_path / "grpo") == len(weights)
    assert os.path.samefile(tmp_path / "dpo/base/model.safetensors", tmp_path / "grpo/base/model.safetensors")
    assert not os.path.samefile(tmp_path / "dpo/base/model.safetensors", tmp_path / "dpo/checkpoints/model.safetensors")
    after = disk_use(tmp_path, ["dpo", "grpo", "rm"])
    assert before["grpo"] == (len(weights), 0) and after["grpo"] == (0, len(weights))
    assert after["dpo"] == before["dpo"] and after["rm"] == before["rm"]
