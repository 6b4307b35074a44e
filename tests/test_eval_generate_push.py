"""eval, generate and Hub push for real on tiny models: sft -> reward -> generate (RM-labelled) -> dpo on the
generated pairs -> eval, run as a user runs it (a subprocess with HF_TOKEN and HF_ENDPOINT pointing at a local
stand-in for the Hub), then the outputs checked against independent recomputation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.data.answers import answer_check
from pipeline.data.prompts import recipe_prompt_format
from pipeline.models.loading import is_adapter, load_causal_lm, load_tokenizer
from tests.conftest import DATA, REPO, summary, tiny_stages, write_recipe
from tests.fake_hub import FakeHub

TOKEN = "hf_testTOKEN0123456789abcdefSECRET"  # must reach the fake Hub and nothing else
EVAL_ROWS = 40


def chain_stages() -> list[dict]:
    stages = tiny_stages(pretrain_steps=60, sft_steps=60)
    stages[2]["args"].update(learning_rate=5e-3)
    prompts = str(DATA / "prompts.jsonl")
    return stages + [
        {"name": "rm", "type": "reward", "model": "sft",
         "dataset": {"path": str(DATA / "prefs.jsonl"), "max_samples": 400, "test_size": 0.15},
         "args": {"max_steps": 40, "learning_rate": 3e-3, "per_device_train_batch_size": 16, "max_length": 48}},
        {"name": "gen", "type": "generate", "model": "sft", "dataset": {"path": prompts, "max_samples": 48},
         "rewards": [{"reward_model": "rm"}], "num_samples": 4, "max_new_tokens": 6},
        {"name": "gen_judge", "type": "generate", "model": "sft", "dataset": {"path": prompts, "max_samples": 6},
         "rewards": [{"function": "exact_match"}], "judge": {"model": "sft", "weight": 0.5}, "num_samples": 3,
         "pairs": "all", "output_format": "listwise", "max_new_tokens": 4},
        {"name": "dpo", "type": "dpo", "model": "sft", "dataset": {"path": "gen", "test_size": 0.15},
         "peft": {"r": 8, "lora_alpha": 16}, "push_to_hub": {"repo_id": "tester/tiny-dpo", "private": True},
         "args": {"max_steps": 12, "learning_rate": 5e-3, "per_device_train_batch_size": 16, "max_length": 48,
                  "beta": 0.1, "logging_steps": 2}},
        {"name": "eval", "type": "eval", "models": ["sft", "dpo"], "reward_model": "rm", "baseline": "sft",
         "reference": "sft", "best_of_n": {"n": 4}, "reference_column": "answer", "max_new_tokens": 6,
         "dataset": {"path": str(DATA / "eval.jsonl"), "max_samples": EVAL_ROWS}, "num_samples_table": EVAL_ROWS},
    ]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    directory = tmp_path_factory.mktemp("evalchain")
    recipe = write_recipe(directory, chain_stages())
    with FakeHub() as hub:
        env = {**os.environ, "HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.endpoint, "PYTHONUNBUFFERED": "1"}
        process = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe)], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=900)
        assert process.returncode == 0, process.stderr[-4000:]
    run_dir = directory / "run"
    return {"run": run_dir, "stages": summary(run_dir)["stages"], "hub": hub, "log": process.stdout + process.stderr}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------- generate
def test_generate_writes_rm_labelled_pairs(chain):
    out = Path(chain["stages"]["gen"]["output"])
    metrics = chain["stages"]["gen"]["metrics"]
    pairs, lists = read_jsonl(out / "data.jsonl"), read_jsonl(out / "listwise.jsonl")
    assert (out / "data.jsonl").read_text() == (out / "pairwise.jsonl").read_text()
    assert len(lists) == metrics["prompts"] == 48 and len(pairs) == metrics["pairs"] > 0
    assert all(len(row["responses"]) == 4 and row["scores"] == sorted(row["scores"], reverse=True) for row in lists)
    assert all(p["score_chosen"] > p["score_rejected"] and p["chosen"] != p["rejected"] for p in pairs)
    assert pairs[0]["prompt"][0]["role"] == "user" and pairs[0]["chosen"][0]["role"] == "assistant"
    assert {"answer", "kind"} <= set(pairs[0])  # the prompt row's other columns travel along

    # The labels are the reward model's scores: rescore a few pairs independently.
    from pipeline.models.reward_functions import RewardModelScorer

    scorer = RewardModelScorer(chain["stages"]["rm"]["output"])
    sample = pairs[:5]
    rescored = scorer([p["prompt"] for p in sample] * 2, [p["chosen"] for p in sample] + [p["rejected"] for p in sample])
    expected = [p["score_chosen"] for p in sample] + [p["score_rejected"] for p in sample]
    assert rescored == pytest.approx(expected, abs=1e-4)


def test_dpo_trains_on_the_generated_pairs(chain):
    dpo = chain["stages"]["dpo"]
    assert is_adapter(dpo["output"])
    history = json.loads((chain["run"] / "dpo" / "log_history.json").read_text())
    train = [row for row in history if "loss" in row]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the first step
    # Observed: training margin 0 -> +0.07..0.15, loss 0.693 -> 0.63..0.66 over 12 steps on 41 generated pairs;
    # the bounds ask only that it learned the generated preferences at all.
    assert max(row["rewards/margins"] for row in train[-3:]) > 0.02
    assert sum(row["loss"] for row in train[-3:]) / 3 < math.log(2) - 0.01
    assert chain["stages"]["gen"]["metrics"]["pairs"] >= 20


def test_generate_with_a_judge_and_a_rule_reward(chain):
    exact_match = answer_check()

    from pipeline.config.specs import JudgeSpec
    from pipeline.models.judges import LocalJudge

    metrics = chain["stages"]["gen_judge"]["metrics"]
    out = Path(chain["stages"]["gen_judge"]["output"])
    lists = read_jsonl(out / "data.jsonl")  # output_format: listwise
    assert lists == read_jsonl(out / "listwise.jsonl") and len(lists) == 6
    # Each score is exact_match (0/1) + 0.5 * expected judge rating in 1..5.
    for row in lists:
        for response, score in zip(row["responses"], row["scores"]):
            assert 0.5 <= score - exact_match(response[0]["content"], row["answer"]) <= 2.5
    assert metrics["pairs"] == len(read_jsonl(out / "pairwise.jsonl"))

    # The judge score by hand: softmax over the logits of "1".."5" after the rendered judge prompt, expectation.
    path = chain["stages"]["sft"]["output"]
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    judge = JudgeSpec(model="sft")
    prompt, response = [{"role": "user", "content": "What is 2 + 2?"}], "4"
    question = judge.prompt.format(prompt="What is 2 + 2?", response="4", scale=5)
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    digits = [tokenizer.convert_tokens_to_ids(str(k)) for k in range(1, 6)]
    expected = float((torch.softmax(logits[digits], -1) * torch.arange(1.0, 6.0)).sum())
    scores = LocalJudge(judge, path)([prompt, [{"role": "user", "content": "Which is larger, 3 or 9?"}]],
                                     [response, "9"])  # batched with a longer prompt: left padding must not matter
    assert scores[0] == pytest.approx(expected, abs=1e-4)


# ----------------------------------------------------------------------------------------------- eval
def test_eval_metrics_match_the_saved_responses(chain):
    metrics = chain["stages"]["eval"]["metrics"]
    expected = {f"{family}/{m}" for m in ("sft", "dpo") for family in ("accuracy", "reward", "kl", "perplexity")}
    expected |= {f"{family}/{m}@bon4" for m in ("sft", "dpo") for family in ("accuracy", "reward")} | {"win_rate/dpo"}
    assert set(metrics) == expected
    samples = json.loads((Path(chain["stages"]["eval"]["output"]) / "samples.json").read_text())
    assert samples["models"] == ["sft", "dpo"] and len(samples["rows"]) == EVAL_ROWS  # every row in the table
    exact_match = answer_check()

    for model in ("sft", "dpo"):
        responses = [row["responses"][model] for row in samples["rows"]]
        assert all(r["correct"] == exact_match(r["response"], row["answer"])
                   for r, row in zip(responses, samples["rows"]))
        assert metrics[f"accuracy/{model}"] == pytest.approx(sum(r["correct"] for r in responses) / EVAL_ROWS)
        assert metrics[f"reward/{model}"] == pytest.approx(sum(r["reward"] for r in responses) / EVAL_ROWS)
    wins = [1.0 if d > s else 0.5 if d == s else 0.0 for d, s in
            ((row["responses"]["dpo"]["reward"], row["responses"]["sft"]["reward"]) for row in samples["rows"])]
    assert metrics["win_rate/dpo"] == pytest.approx(sum(wins) / EVAL_ROWS)
    # The rewards are the reward model's scores of those greedy responses.
    from pipeline.models.reward_functions import RewardModelScorer

    prompts = [json.loads(line)["prompt"] for line in (DATA / "eval.jsonl").read_text().splitlines()[:3]]
    shown = [row["responses"]["sft"] for row in samples["rows"][:3]]
    rescored = RewardModelScorer(chain["stages"]["rm"]["output"])(prompts, [r["response"] for r in shown])
    assert rescored == pytest.approx([r["reward"] for r in shown], abs=1e-4)


def test_eval_kl_perplexity_and_best_of_n(chain):
    metrics = chain["stages"]["eval"]["metrics"]
    assert metrics["kl/sft"] == 0.0  # the reference itself: identical log-probs
    assert metrics["kl/dpo"] > 0.0  # the DPO adapter moved the policy away from its reference
    assert 1.0 < metrics["perplexity/sft"] < 300  # vocabulary 300: a model that learned anything is below that
    for model in ("sft", "dpo"):
        # Best-of-4 against greedy is compared on the quickstart's real reward model (test_quickstart): this tiny
        # one is nearly flat, so its pick beat greedy by 0.003 to 1.4, or fell short by 0.001.
        assert math.isfinite(metrics[f"reward/{model}@bon4"])
        assert 0.0 <= metrics[f"accuracy/{model}@bon4"] <= 1.0


def test_reference_completions_are_scored_up_to_the_end_of_turn(chain):
    from pipeline.stages.eval import reference_pairs

    tokenizer = load_tokenizer(chain["stages"]["sft"]["output"])
    prompt = [{"role": "user", "content": "What is 1 + 2?"}]
    (head, tail), (text_head, _) = reference_pairs(tokenizer, [prompt, "What is 1 + 2?"], ["3", "3"],
                                                    [tokenizer.eos_token_id])
    assert tokenizer.decode(head) == tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(tail) == "3<|im_end|>"  # the template's trailing newline is not part of the reply
    assert text_head == head  # plain text to a chat-trained model: the same user turn
    with recipe_prompt_format("raw"):
        [(plain_head, plain_tail)] = reference_pairs(tokenizer, ["Q: 1 + 2? A:"], [" 3"], [tokenizer.eos_token_id])
    assert tokenizer.decode(plain_head) == "Q: 1 + 2? A:" and tokenizer.decode(plain_tail) == " 3<|im_end|>"


def test_report_shows_eval_and_curves(chain):
    report = (chain["run"] / "report.md").read_text()
    assert "## eval (eval)" in report and "| model | accuracy | reward | kl | perplexity | win_rate |" in report
    assert "![eval results](plots/eval.png)" in report and "| prompt | answer | sft | dpo |" in report
    assert "![dpo curves](plots/dpo.png)" in report and "## Recipe" in report
    assert (chain["run"] / "plots" / "eval.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------- push
def test_push_hook_uploads_the_stage_output_and_card(chain):
    repo = chain["hub"].repos["tester/tiny-dpo"]
    assert repo.private and len(repo.commits) == 1
    uploaded = repo.branches["main"]
    output = Path(chain["stages"]["dpo"]["output"])
    produced = {p.name for p in output.iterdir()} - {"training_args.bin", "README.md"}
    assert set(uploaded) == produced | {"README.md"}
    assert all(uploaded[name] == (output / name).read_bytes()  # byte for byte
               for name in produced - {"adapter_config.json"})
    # the adapter's base, a folder of the run: named within the run, not by this machine's path
    config, local = (json.loads(text) for text in (uploaded["adapter_config.json"], (output / "adapter_config.json").read_text()))
    within = str(Path(local["base_model_name_or_path"]).resolve().relative_to(chain["run"].resolve()))
    assert config.pop("base_model_name_or_path") == within and config == {k: v for k, v in local.items()
                                                                         if k != "base_model_name_or_path"}
    card = uploaded["README.md"].decode()
    assert f"This is a LoRA adapter on `{within}`." in card and str(chain["run"].resolve()) not in card
    assert "base_model:" not in card  # nothing on the Hub it would load on
    assert (output / "README.md").read_bytes() != uploaded["README.md"]  # the card is not written into the output
    assert card.startswith("---\n") and "library_name: peft" in card and "- dpo" in card
    assert "1. `tok` (tokenizer) from scratch" in card and "4. `dpo` (dpo) from stage `sft`" in card
    assert "- name: gen\n  type: generate" in card  # the recipe excerpt includes the data-producing stage
    assert f"| eval_rewards/margins | {chain['stages']['dpo']['metrics']['eval_rewards/margins']:.4g} |" in card
    assert "- transformers: " in card and "- trl: " in card
    assert "pushed to tester/tiny-dpo" in chain["log"]


def test_token_reaches_the_hub_and_no_file_or_log(chain):
    # huggingface_hub also fetches a public registry (/api/agent-harnesses) without credentials; every call
    # that authenticates uses the token from the environment, and every publishing call authenticates.
    requests = chain["hub"].requests
    publishing = [r for r in requests if r["path"].startswith(("/api/repos/", "/api/models/", "/api/validate-yaml"))]
    assert len(publishing) == 4  # create repo, validate card, preupload, commit
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in publishing)
    assert all(r["headers"].get("authorization") in (None, f"Bearer {TOKEN}") for r in requests)
    assert TOKEN not in chain["log"]
    for path in chain["run"].rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for content in chain["hub"].repos["tester/tiny-dpo"].branches["main"].values():
        assert TOKEN.encode() not in content


def test_push_hook_is_idempotent_and_cli_push_merges(chain, monkeypatch, capfd):
    import huggingface_hub

    from pipeline.outputs.hub import push_if_configured
    from pipeline.validation.recipe_checks import load_recipe

    recipe = load_recipe(chain["run"].parent / "recipe.yaml")
    with FakeHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)  # read when HfApi() is built
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        push_if_configured(chain["run"], recipe.stage("dpo"), "skipped")
        assert hub.requests == []  # already pushed with these settings: a rerun uploads nothing

        assert main(["push", str(chain["run"]), "dpo", "--repo-id", "tester/tiny-dpo-merged", "--revision", "v1",
                     "--merge-adapter"]) == 0
        assert main(["push", str(chain["run"]), "gen", "--repo-id", "tester/gen"]) == 1  # data, not a model
        assert main(["push", str(chain["run"]), "dpo", "--repo-id", "not a repo id"]) == 1
    captured = capfd.readouterr()
    assert "wrote no model weights" in captured.err and "is not a Hub repo id" in captured.err
    assert TOKEN not in captured.out + captured.err
    repo = hub.repos["tester/tiny-dpo-merged"]
    assert not repo.private and repo.branches["main"] == {} and len(repo.commits) == 1
    files = repo.branches["v1"]
    card = files["README.md"].decode()
    assert "model.safetensors" in files and "adapter_config.json" not in files and "library_name: transformers" in card
    assert f"| eval / win_rate/dpo | {chain['stages']['eval']['metrics']['win_rate/dpo']:.4g} |" in card

    # The uploaded merged weights are the adapter merged into its base: same logits.
    folder = chain["run"].parent / "downloaded"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        merged = load_causal_lm(str(folder))(ids).logits
        direct = load_causal_lm(chain["stages"]["dpo"]["output"])(ids).logits
    assert torch.allclose(merged, direct, atol=1e-5)


def test_response_logprobs_of_a_padded_batch_equal_each_pair_scored_alone():
    """KL and perplexity read these: prompts and responses of different lengths share a batch (prompts padded on
    the left, only the response positions' logits computed), and every token's log-prob is what the pair alone,
    unpadded, gives it."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models.decoding import response_logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    rng = random.Random(0)
    pairs = [([rng.randrange(1, 300) for _ in range(rng.randint(1, 20))],
              [rng.randrange(1, 300) for _ in range(rng.randint(1, 9))]) for _ in range(7)]
    for (prompt, response), got in zip(pairs, response_logprobs(model, pairs, batch_size=4)):
        with torch.no_grad():
            alone = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0, :-1], -1)
        want = [alone[len(prompt) - 1 + j, token].item() for j, token in enumerate(response)]
        assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) < 1e-4
