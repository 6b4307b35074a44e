"""Dataset loading: file formats, renames, mixtures, held-out splits, errors, and real public data."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from pipeline.cli import main
from pipeline.config.specs import DatasetSpec, SourceSpec
from pipeline.data.loading import DataError, load_source, load_splits, read_jsonl, read_local
from pipeline.stages.sft import to_prompt_completion
from tests.conftest import REALDATA, needs_realdata, summary, tiny_stages, write_recipe

ROWS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_file_formats_load_alike(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == ".json":
        path.write_text(json.dumps({"data": ROWS}))
    elif suffix == ".csv":
        Dataset.from_list(ROWS).to_csv(str(path), index=False)
    else:
        Dataset.from_list(ROWS).to_parquet(str(path))
    dataset = load_source(SourceSpec(path=str(path), columns={"completion": "answer"}), recipe_path=None)
    assert dataset.column_names == ["prompt", "answer"] and dataset[3] == {"prompt": "q3", "answer": "a3"}


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(DataError, match="x.jsonl line 3: expected a JSON object"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match="x.jsonl line 2: invalid JSON"):
        read_jsonl(path)


def test_jsonl_through_datasets_is_typed_as_its_rows(tmp_path):
    """`datasets` reads the file (`from_json_lines`) with the types `Dataset.from_list` gives the rows, message dicts with
    different keys included; a key first seen after its first 10 MB chunk, which it cannot read, is read by hand."""
    from pipeline.data.loading import from_json_lines, read_local

    rows = [{"messages": [{"role": "user", "content": "x"}], "score": 1},
            {"messages": [{"role": "user", "content": "y", "name": "n"}], "score": 0.5}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = Dataset.from_list(rows)
    assert from_json_lines(path).features == expected.features and read_local(path).to_list() == expected.to_list()
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "x" * 1000}] * 11_000) + '{"text": "y", "late": 1}\n')
    assert from_json_lines(path) is None and len(read_local(path)) == 11_001


def test_mixture_weights_and_held_out_split(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": f"a{i}"}) + "\n" for i in range(100)))
    b.write_text("".join(json.dumps({"text": f"b{i}"}) + "\n" for i in range(10)))
    spec = DatasetSpec(sources=[SourceSpec(path=str(a), weight=0.5), SourceSpec(path=str(b), weight=3.0)],
                       test_size=0.1)
    train, held_out = load_splits(spec, seed=1, recipe_path=None)
    texts, unseen = list(train["text"]), list(held_out["text"])
    assert len(unseen) == 6  # a tenth of the 50 + 10 distinct rows: b is split before its rows repeat
    assert sum(t.startswith("a") for t in texts + unseen) == 50
    held_b = [t for t in unseen if t.startswith("b")]
    assert sorted(texts.count(f"b{i}") for i in range(10) if f"b{i}" not in held_b) == [3] * (10 - len(held_b))
    assert not set(unseen) & set(texts)  # no held-out row also trains
    assert list(train.column_names) == ["text"] and list(held_out.column_names) == ["text"]
    again = load_splits(spec, seed=1, recipe_path=None)
    assert list(again[1]["text"]) == unseen and list(again[0]["text"]) == texts  # the split is seeded


def test_held_out_rows_that_repeat_a_training_row_are_left_out(tmp_path, capsys):
    data = tmp_path / "dup.jsonl"
    rows = [{"text": f"t{i % 40}"} for i in range(100)]  # 40 distinct rows, most of them two or three times
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DatasetSpec(sources=[SourceSpec(path=str(data))], test_size=0.2)
    train, held_out = load_splits(spec, seed=1, recipe_path=None)
    assert len(train) == 80 and 0 < len(held_out) < 20
    assert not set(held_out["text"]) & set(train["text"])
    assert f"{20 - len(held_out)} of 20 held-out rows equal a training row" in capsys.readouterr().out


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    """Editors on Windows write one; the error then is the data's own, on its own line."""
    good, mixed, array = tmp_path / "bom.jsonl", tmp_path / "mixed.jsonl", tmp_path / "bom.json"
    good.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n{"text": "b"}\n')
    assert list(read_local(good)["text"]) == ["a", "b"]
    mixed.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(DataError, match="line 2: column 'text' is a number where other rows have a string"):
        read_local(mixed)
    array.write_bytes(b"\xef\xbb\xbf" + b'[{"text": "a"}]')
    assert list(read_local(array)["text"]) == ["a"]


def test_mixture_with_mismatched_columns_is_a_clear_error(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "x"}\n' * 3)
    b.write_text('{"body": "y"}\n' * 3)
    spec = DatasetSpec(sources=[SourceSpec(path=str(a)), SourceSpec(path=str(b))])
    with pytest.raises(DataError, match="rename columns"):
        load_splits(spec, seed=1, recipe_path=None)


def test_alpaca_rows_render_through_the_template():
    rows = Dataset.from_list([{"instruction": "Add.", "input": "2 3", "output": "5"},
                              {"instruction": "Greet.", "input": "", "output": "Hi"}])
    out = to_prompt_completion(rows, "alpaca", None, "test")
    assert "### Input:\n2 3" in out[0]["prompt"] and out[0]["completion"] == "5"
    assert "### Input" not in out[1]["prompt"] and out[1]["prompt"].endswith("### Response:\n")
    custom = to_prompt_completion(rows, "alpaca", "Q: {instruction} {input}\nA: ", "test")
    assert custom[0]["prompt"] == "Q: Add. 2 3\nA: "


def test_alpaca_rows_become_chat_turns_for_a_chat_model():
    rows = Dataset.from_list([{"instruction": "Add.", "input": "2 3", "output": "5"},
                              {"instruction": "Greet.", "input": "", "output": "Hi"}])
    out = to_prompt_completion(rows, "alpaca", None, "test", chat=True)
    assert out[0]["prompt"] == [{"role": "user", "content": "Add.\n\n2 3"}]
    assert out[0]["completion"] == [{"role": "assistant", "content": "5"}]
    assert out[1]["prompt"] == [{"role": "user", "content": "Greet."}]
    custom = to_prompt_completion(rows, "alpaca", "Q: {instruction} {input}\nA: ", "test", chat=True)
    assert custom[0]["prompt"] == "Q: Add. 2 3\nA: "  # an explicit template still wins


def test_messages_split_at_last_assistant_turn():
    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    out = to_prompt_completion(rows, "messages", None, "test")
    assert out[0]["prompt"] == [{"role": "user", "content": "hi"}]
    assert out[0]["completion"] == [{"role": "assistant", "content": "yo"}]
    bad = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="must end with an assistant message"):
        to_prompt_completion(bad, "messages", None, "test")


@needs_realdata
def test_self_instruct_seed_tasks_flatten_to_alpaca():
    path = REALDATA / "self-instruct-seed-tasks.jsonl"
    dataset = load_source(SourceSpec(path=str(path)), recipe_path=None)
    instances = sum(len(r["instances"]) for r in read_jsonl(path))
    out = to_prompt_completion(dataset, "self-instruct", None, "test")
    assert len(dataset) == 175 and len(out) == instances
    assert all(p.startswith("Below is an instruction") and p.endswith("### Response:\n") for p in out["prompt"])


@needs_realdata
def test_sft_stage_trains_on_self_instruct(tmp_path):
    """Real public data through the whole SFT stage: held-out loss falls on Alpaca-style prompts."""
    stages = tiny_stages(pretrain_steps=20, sft_steps=30)
    stages[2]["dataset"] = {"path": str(REALDATA / "self-instruct-seed-tasks.jsonl"), "test_size": 0.15}
    stages[2]["args"]["max_length"] = 256
    assert main(["run", str(write_recipe(tmp_path, stages))]) == 0
    metrics = summary(tmp_path / "run")["stages"]["sft"]["metrics"]
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]
