"""Tool-using RL: the tokenizer stage's template renders tool calls (and plain chats exactly as before), tools are
guarded against user code that fails, `validate` refuses tools it cannot use without running any, and a grpo
stage with a live calculator tool runs the tool, with the tool's answers masked out of the loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOTrainer, SFTTrainer
from trl.chat_template_utils import qwen3_template

from pipeline.cli import main
from pipeline.models.decoding import completion_text
from pipeline.models.loading import load_tokenizer
from pipeline.models.tools import ToolStats, guarded
from pipeline.models.chat_templates import CHATML_TEMPLATE
from pipeline.stages.specs.tokenizer import BOS, EOS, PAD
from pipeline.stages.tokenizer import train_bpe
from tests import tool_functions
from tests.conftest import DATA, REPO, SMOLLM2_GGUF, needs_smollm2, summary, tiny_stages, write_recipe

# The tokenizer stage's template before it rendered tools: plain conversations must still render exactly so
PLAIN_CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 1234, "b": 5678}}}
TOOL_CHAT = [{"role": "user", "content": "What is 1234 + 5678?"},
             {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "name": "add", "content": "6912"},
             {"role": "assistant", "content": "6912"}]


def tokenizer() -> PreTrainedTokenizerFast:
    texts = [json.loads(line)["text"] for line in (DATA / "pretrain.jsonl").read_text().splitlines()[:300]]
    made = PreTrainedTokenizerFast(tokenizer_object=train_bpe(texts, 400, 2), bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD)
    made.chat_template, made.response_template = CHATML_TEMPLATE, qwen3_template
    return made


def test_the_default_template_renders_plain_chats_as_before_and_tool_calls_that_parse_back():
    tok = tokenizer()
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    for messages in (plain, plain[1:], plain[1:3]):
        for generation_prompt in (True, False):
            assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt) == \
                tok.apply_chat_template(messages, chat_template=PLAIN_CHATML, tokenize=False,
                                        add_generation_prompt=generation_prompt)
    rendered = tok.apply_chat_template(TOOL_CHAT, tools=[tool_functions.add], tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    text = tok.decode(ids)
    assert "Add two whole numbers." in text and '"a": {"type": "integer"' in text  # the tool, described
    # only the assistant's own tokens are trained on: its call and its answer, not the tool's answer
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == \
        '<tool_call>{"name": "add", "arguments": {"a": 1234, "b": 5678}}</tool_call><|im_end|>6912<|im_end|>'
    prompt = tok.apply_chat_template(TOOL_CHAT[:1], tokenize=False, add_generation_prompt=True)
    reply = '<tool_call>{"name": "add", "arguments": {"a": 1234, "b": 5678}}</tool_call><|im_end|>'
    assert tok.parse_response(reply, prefix=prompt)["tool_calls"] == [CALL]
    assert completion_text([{"role": "assistant", "content": "", "tool_calls": [CALL]},
                            {"role": "tool", "content": "6912"}, {"role": "assistant", "content": "6912"}]) == "6912"


def test_the_compact_template_lists_each_tool_in_a_line_and_reads_calls_the_same_way():
    from pipeline.models.chat_templates import CHATML_COMPACT_TEMPLATE, read_tool_calls
    from pipeline.models.tools import renders_tools

    tok = tokenizer()
    full = tok.apply_chat_template(TOOL_CHAT, tools=[tool_functions.add], tokenize=False)
    tok.chat_template, tok.response_template = CHATML_COMPACT_TEMPLATE, None
    compact = tok.apply_chat_template(TOOL_CHAT, tools=[tool_functions.add], tokenize=False)
    assert renders_tools(CHATML_COMPACT_TEMPLATE)
    assert compact.startswith("<|im_start|>system\nFunctions:\nadd(a, b): Add two whole numbers.<|im_end|>\n")
    assert compact.split("<|im_start|>user")[1] == full.split("<|im_start|>user")[1]  # the turns render alike
    assert len(tok(compact)["input_ids"]) < len(tok(full)["input_ids"]) / 2
    read_tool_calls(tok)
    prompt = tok.apply_chat_template(TOOL_CHAT[:1], tools=[tool_functions.add], tokenize=False,
                                     add_generation_prompt=True)
    reply = '<tool_call>{"name": "add", "arguments": {"a": 1234, "b": 5678}}</tool_call><|im_end|>'
    assert tok.parse_response(reply, prefix=prompt)["tool_calls"] == [CALL]


def test_a_tool_that_fails_hangs_or_answers_no_text_gives_the_model_an_error_and_is_counted():
    stats = ToolStats()
    add, broken, slow, opaque = (guarded(f, 0.5, stats) for f in (tool_functions.add, tool_functions.broken,
                                                                   tool_functions.slow, tool_functions.opaque))
    assert add(a=2, b=3) == "5" and add.__name__ == "add" and add.__doc__ == tool_functions.add.__doc__
    assert broken(a=7) == "error: RuntimeError: cannot handle 7"
    assert slow(a=1) == "error: slow did not answer within 0.5 s"
    assert opaque(a=1) == "error: opaque returned a object, not text"
    assert stats.metrics() == {"tool_calls": 4.0, "tool_errors": 1.0, "tool_timeouts": 1.0, "tool_results_not_text": 1.0}


def grpo_stage(tools: list[str], **extra) -> dict:
    return {"name": "grpo", "type": "grpo", "model": "sft", "tools": tools, "rewards": [{"function": "exact_match"}],
            "dataset": {"path": str(DATA / "prompts.jsonl"), "max_samples": 16},
            "args": {"max_steps": 1, "num_generations": 2, "per_device_train_batch_size": 2,
                     "max_completion_length": 8}, **extra}


def test_validate_refuses_tools_it_cannot_use_and_runs_none(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "called"
    monkeypatch.setenv("TOOL_MARKER", str(marker))
    stages = tiny_stages() + [
        grpo_stage(["tests.tool_functions:marker", "tests.tool_functions:undocumented", "tests.tool_functions:nope"],
                   tool_timeout=0),
        {**grpo_stage(["tests.tool_functions:add"]), "name": "rloo", "type": "rloo"}]
    assert main(["validate", str(write_recipe(tmp_path, stages))]) == 2
    err = capsys.readouterr().err
    assert "tool_timeout: must be > 0 seconds" in err
    assert "tools[1]: 'tests.tool_functions:undocumented' cannot be described to the model" in err
    assert "tools[2]: cannot import 'tests.tool_functions:nope'" in err
    assert "stage 'rloo': tools: TRL's RLOOTrainer cannot run tools" in err
    assert not marker.exists()  # imported and described, never called

    stages = tiny_stages() + [grpo_stage(["tests.tool_functions:add"])]
    stages[0]["chat_template"] = PLAIN_CHATML  # a template that shows no tools
    assert main(["validate", str(write_recipe(tmp_path, stages))]) == 2
    assert "stage 'tok''s chat_template does not render tools" in capsys.readouterr().err


def scripted_generate(tokenizer_dir: Path, reply_for: Callable[[str, int], str]):
    """A `generate` whose reply to row i of a batch is `reply_for(the row's text so far, i)`: what a policy that
    learnt to use the tool does, so that what follows (parsing the call, running the tool, appending its answer,
    masking it, scoring) is checked on every row rather than on the few a tiny model would get right."""

    def generate(self, input_ids, attention_mask=None, **kwargs):
        tok = load_tokenizer(str(tokenizer_dir))  # the tokenizer stage has written it by the time this runs
        replies = [tok(reply_for(tok.decode(row, skip_special_tokens=False).replace(tok.pad_token, ""), i) +
                       "<|im_end|>", add_special_tokens=False)["input_ids"] for i, row in enumerate(input_ids.tolist())]
        width = max(map(len, replies))
        padded = [r + [tok.pad_token_id] * (width - len(r)) for r in replies]
        return torch.cat([input_ids, torch.tensor(padded, device=input_ids.device)], dim=1)

    return generate


def add_then_answer(seen: str, i: int) -> str:
    """Call `add` on the question; after its answer, answer right in even rows and one less in odd ones (rewards
    to compare within a group)."""
    if "<|im_start|>tool" in seen:
        return ("46", "45")[i % 2]
    return '<tool_call>{"name": "add", "arguments": {"a": 12, "b": 34}}</tool_call>'


def test_grpo_runs_a_live_tool_and_its_answers_receive_no_gradient(tmp_path, monkeypatch):
    """GRPO with the live `add` tool on this pipeline's template and tokenizer: TRL parses each call, the tool runs
    (counted), its answer is appended, the exact-match reward reads the model's own final answer, and the loss's
    gradient with respect to the log-probability of every token of the tool's turn is exactly zero while the
    model's own tokens get gradient (TRL's `tool_mask`)."""
    prompts, held_out = tmp_path / "prompts.jsonl", tmp_path / "held_out.jsonl"
    prompts.write_text((json.dumps({"prompt": "12+34", "answer": "46"}) + "\n") * 16)
    held_out.write_text((json.dumps({"prompt": "12+34", "answer": "46"}) + "\n") * 2)
    stages = tiny_stages(pretrain_steps=3)[:2]
    stages[1]["model"]["max_position_embeddings"] = 1024  # the tool list in the prompt is ~420 tokens
    stages += [
        {"name": "grpo", "type": "grpo", "model": "base", "tools": ["tests.tool_functions:add"],
         "rewards": [{"function": "exact_match"}], "dataset": {"path": str(prompts), "eval": str(held_out)},
         "args": {"max_steps": 2, "num_generations": 4, "per_device_train_batch_size": 4,
                  "max_completion_length": 160, "save_steps": 1000}}]
    checked: list[dict] = []
    compute_loss = GRPOTrainer._compute_loss

    def watched(self, model, inputs):
        captured = {}
        per_token = self._get_per_token_logps_and_entropies

        def keep(*args, **kwargs):
            logps, *rest = per_token(*args, **kwargs)
            captured["logps"] = logps
            return (logps, *rest)

        self._get_per_token_logps_and_entropies = keep
        try:
            loss = compute_loss(self, model, inputs)
        finally:
            del self._get_per_token_logps_and_entropies
        (grad,) = torch.autograd.grad(loss, captured["logps"], retain_graph=True)
        completion = inputs["completion_mask"] == 1
        tool_tokens = (inputs["tool_mask"] == 0) & completion
        checked.append({"tool_grad": grad[tool_tokens].abs().max().item(),
                        "own_grad": grad[~tool_tokens & completion].abs().max().item(),
                        "tool_text": self.processing_class.decode(inputs["completion_ids"][0][tool_tokens[0]])})
        return loss

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", watched)
    monkeypatch.setattr(LlamaForCausalLM, "generate", scripted_generate(tmp_path / "run" / "tok" / "output",
                                                                        add_then_answer))
    assert main(["run", str(write_recipe(tmp_path, stages))]) == 0
    metrics = summary(tmp_path / "run")["stages"]["grpo"]["metrics"]
    assert metrics["tool_calls"] == 2 * 4 and metrics["tool_errors"] == 0  # one call per completion
    assert metrics["train_reward_last"] == 0.5  # "46" (right) or "45", written by the model after the tool's "46"
    # held-out greedy accuracy answers with the tool too (the first held-out row right, the second one off)
    assert metrics["initial_eval_accuracy"] == metrics["eval_accuracy"] == 0.5
    assert len(checked) == 2
    for batch in checked:
        assert batch["tool_grad"] == 0.0 and batch["own_grad"] > 0
        # the masked tokens: the tool's turn and the next assistant header, which the template wrote, not the model
        assert batch["tool_text"] == "\n<|im_start|>tool\n46<|im_end|>\n<|im_start|>assistant\n"


def test_tool_answers_dropped_for_the_token_limit_are_counted_and_named_by_run_health(tmp_path, monkeypatch):
    """TRL drops a tool's answer that would not fit `max_completion_length` and ends the completion on the call,
    without counting it as clipped: the stage logs the share of completions left on an unanswered call, and
    `responses_truncated` names it."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text((json.dumps({"prompt": "12+34", "answer": "46"}) + "\n") * 16)
    stages = tiny_stages(pretrain_steps=3)[:2]
    stages[1]["model"]["max_position_embeddings"] = 1024
    stages += [
        {"name": "grpo", "type": "grpo", "model": "base", "tools": ["tests.tool_functions:add"],
         "rewards": [{"function": "exact_match"}], "dataset": str(prompts),
         "args": {"max_steps": 4, "num_generations": 4, "per_device_train_batch_size": 4, "logging_steps": 1,
                  "max_completion_length": 40, "save_steps": 1000}}]  # room for the call, not for the answer
    monkeypatch.setattr(LlamaForCausalLM, "generate", scripted_generate(tmp_path / "run" / "tok" / "output",
                                                                        add_then_answer))
    assert main(["run", str(write_recipe(tmp_path, stages))]) == 0
    grpo = summary(tmp_path / "run")["stages"]["grpo"]
    history = json.loads((tmp_path / "run" / "grpo" / "log_history.json").read_text())
    steps = [row for row in history if "rewards/tool_call_unanswered/mean" in row]
    assert len(steps) == 4 and all(row["rewards/tool_call_unanswered/mean"] == 1.0 for row in steps)
    assert all(row["completions/clipped_ratio"] == 0 for row in steps)  # what TRL's own count says
    assert grpo["metrics"]["tool_calls"] == 4 * 4  # the tool ran; its answer was dropped
    truncated = {f["finding"]: f for f in grpo["health"]}["responses_truncated"]
    assert truncated["metric"] == "completions/clipped_ratio + rewards/tool_call_unanswered/mean"
    assert truncated["truncated_share"] == 1.0


def tool_chats(path: Path, rows: int, seed: int = 0) -> None:
    """Conversations where the assistant adds two numbers with `add` and then states the sum."""
    rng = __import__("random").Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            call = {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "tool_calls": [call]},  # a call needs no content
                {"role": "tool", "name": "add", "content": str(a + b)},
                {"role": "assistant", "content": f"{a + b}"}]}) + "\n")


def test_sft_on_tool_conversations_trains_every_assistant_turn_and_masks_the_tools_answers(tmp_path, monkeypatch):
    """Conversations with tool calls are trained whole: the loss covers the assistant's call and its final answer
    and never the tool's answer (TRL's assistant masks, from this template's generation markers); the tools named in
    the stage are shown in every row; the held-out loss falls."""
    chats = tmp_path / "chats.jsonl"
    tool_chats(chats, 240)
    stages = tiny_stages(pretrain_steps=3)[:2]
    stages[1]["model"]["max_position_embeddings"] = 1024  # the tool list in the prompt is ~420 tokens
    stages.append({"name": "sft", "type": "sft", "model": "base", "tools": ["tests.tool_functions:add"],
                   "dataset": {"path": str(chats), "test_size": 16},
                   "args": {"max_steps": 30, "learning_rate": 3e-3, "per_device_train_batch_size": 8,
                            "max_length": 640, "save_steps": 1000}})
    seen: list[dict] = []
    train = SFTTrainer.train

    def keep_first_row(self, *args, **kwargs):
        row = self.train_dataset[0]  # TRL's labels: the input ids, -100 where no loss is taken
        seen.append({"ids": row["input_ids"], "mask": [label != -100 for label in row["labels"]],
                     "decode": self.processing_class.decode})
        return train(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "train", keep_first_row)
    assert main(["run", str(write_recipe(tmp_path, stages))]) == 0
    metrics = summary(tmp_path / "run")["stages"]["sft"]["metrics"]
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]
    row = seen[0]
    text, trained = row["decode"](row["ids"]), row["decode"]([i for i, m in zip(row["ids"], row["mask"]) if m])
    assert "Add two whole numbers." in text  # the stage's tools, shown in the row
    question = text.split("What is ")[1].split("?")[0]
    a, b = (int(x) for x in question.split(" + "))
    assert trained == (f'<tool_call>{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}</tool_call><|im_end|>'
                       f"{a + b}<|im_end|>")  # the call and the answer; the tool's turn is not trained on


def test_validate_refuses_tool_conversations_for_a_template_that_cannot_show_them(tmp_path, capsys):
    chats = tmp_path / "chats.jsonl"
    tool_chats(chats, 40)
    stages = tiny_stages()[:2] + [{"name": "sft", "type": "sft", "model": "base", "dataset": str(chats)}]
    stages[0]["chat_template"] = PLAIN_CHATML
    assert main(["validate", str(write_recipe(tmp_path, stages))]) != 0
    assert "the rows call tools, but stage 'tok''s chat_template does not render tools" in capsys.readouterr().err


def test_eval_answers_with_tools_over_several_turns_and_counts_what_went_wrong(tmp_path, monkeypatch):
    """An eval stage with tools: each model reply that calls a tool gets the tool's answer and goes on; accuracy
    reads the model's own final answer; calls, unreadable calls and tool errors are counted per answer."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "12+34", "answer": "46"},  # add, then the right sum
        {"prompt": "fail", "answer": "7"},  # a tool that raises: the model gets the error and answers anyway
        {"prompt": "garble", "answer": "1"},  # a call that cannot be read: taken as the answer, counted
        {"prompt": "loop", "answer": "0"}]))  # calls every turn: stopped after max_tool_calls rounds

    def reply_for(seen: str, i: int) -> str:
        question = seen.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        answered = seen.count("<|im_start|>tool")
        if question == "12+34":
            return "46" if answered else '<tool_call>{"name": "add", "arguments": {"a": 12, "b": 34}}</tool_call>'
        if question == "fail":
            return "I could not" if answered else '<tool_call>{"name": "broken", "arguments": {"a": 7}}</tool_call>'
        if question == "garble":
            return '<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>'
        return '<tool_call>{"name": "add", "arguments": {"a": 0, "b": 0}}</tool_call>'

    stages = tiny_stages(pretrain_steps=3)[:2]
    stages[1]["model"]["max_position_embeddings"] = 1024
    stages.append({"name": "eval", "type": "eval", "models": ["base"], "dataset": str(rows), "max_new_tokens": 64,
                   "tools": ["tests.tool_functions:add", "tests.tool_functions:broken"], "max_tool_calls": 2})
    monkeypatch.setattr(LlamaForCausalLM, "generate", scripted_generate(tmp_path / "run" / "tok" / "output", reply_for))
    assert main(["run", str(write_recipe(tmp_path, stages))]) == 0
    metrics = summary(tmp_path / "run")["stages"]["eval"]["metrics"]
    assert metrics["accuracy/base"] == 0.25  # only "12+34" -> "46"
    assert metrics["tool_calls/base"] == (1 + 1 + 0 + 2) / 4  # the loop stops after 2 rounds
    assert metrics["tool_malformed/base"] == 1 / 4 and metrics["tool_errors/base"] == 1 / 4
    shown = json.loads((tmp_path / "run" / "eval" / "output" / "samples.json").read_text())["rows"][0]
    turns = shown["responses"]["base"]["turns"]  # the whole conversation is kept for the report
    assert [t["role"] for t in turns] == ["assistant", "tool", "assistant"]
    assert turns[0]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 12, "b": 34}}
    assert turns[1] == {"role": "tool", "name": "add", "content": "46"} and turns[2]["content"] == "46"


@needs_smollm2
def test_smollm2_is_refused_tools_until_given_a_template_that_shows_them_then_trains_with_one(tmp_path, capsys,
                                                                                                monkeypatch):
    """SmolLM2-135M-Instruct's own template ignores `tools=`: `validate` refuses tools on it, naming the fix;
    `chat_template: chatml` gives it this pipeline's ChatML, and a GRPO step with the live tool then runs on the
    real model and tokenizer (ChatML, pad == EOS), the tool's answer masked."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text((json.dumps({"prompt": "12+34", "answer": "46"}) + "\n") * 8)
    stage = {"name": "grpo", "type": "grpo", "model": str(SMOLLM2_GGUF), "tools": ["tests.tool_functions:add"],
             "rewards": [{"function": "exact_match"}], "dataset": {"path": str(prompts), "eval_samples": 0},
             "peft": {"r": 4, "lora_alpha": 8},
             "args": {"max_steps": 1, "num_generations": 2, "per_device_train_batch_size": 2,
                      "max_completion_length": 48, "save_steps": 1000}}
    assert main(["validate", str(write_recipe(tmp_path, [stage]))]) == 2
    err = capsys.readouterr().err
    assert f"the chat template of '{SMOLLM2_GGUF}' does not render tools" in err and "chat_template: chatml" in err

    stage["chat_template"] = "chatml"
    recipe = write_recipe(tmp_path, [stage])
    assert main(["validate", str(recipe)]) == 0
    losses: list[dict] = []
    compute_loss = GRPOTrainer._compute_loss

    def watched(self, model, inputs):
        losses.append({"tool_tokens": int(((inputs["tool_mask"] == 0) & (inputs["completion_mask"] == 1)).sum())})
        return compute_loss(self, model, inputs)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", watched)
    monkeypatch.setattr(LlamaForCausalLM, "generate", scripted_generate(SMOLLM2_GGUF, add_then_answer))
    assert main(["run", str(recipe)]) == 0
    metrics = summary(tmp_path / "run")["stages"]["grpo"]["metrics"]
    assert metrics["tool_calls"] == 2 and metrics["tool_errors"] == 0
    assert losses and all(batch["tool_tokens"] > 0 for batch in losses)


def test_a_tool_beside_the_recipe_is_found_by_the_pipeline_command(tmp_path):
    """The `pipeline` command does not put the working directory on the Python path (`python -m` does); a tool
    or reward function module in it is still found."""
    (tmp_path / "my_tools.py").write_text(Path(tool_functions.__file__).read_text())
    stages = tiny_stages()[:3] + [grpo_stage(["my_tools:add"])]
    recipe = write_recipe(tmp_path, stages)
    code = ("import sys\nsys.path = [p for p in sys.path if p not in ('', '.')]\n"  # as the console script runs
            f"from pipeline.cli import main\nsys.exit(main(['validate', {str(recipe)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr


def test_a_stage_chat_template_counts_wherever_validate_looks_for_one(tmp_path, capsys):
    """Chat rows on a model whose tokenizer has no template are refused, unless the stage gives one
    (`chat_template`); `validate` then renders prompts to it as chat turns, and tool rows through that template."""
    from transformers import LlamaConfig

    folder = tmp_path / "bare"
    bare = tokenizer()
    bare.chat_template = None
    bare.save_pretrained(folder)
    LlamaConfig(vocab_size=len(bare), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(folder)
    chats = tmp_path / "chats.jsonl"
    tool_chats(chats, 40)
    sft = {"name": "sft", "type": "sft", "model": str(folder), "dataset": str(chats)}
    assert main(["validate", str(write_recipe(tmp_path, [sft]))]) != 0
    assert "need a chat template, and the tokenizer of" in capsys.readouterr().err
    sft["tools"] = ["tests.tool_functions:add"]
    assert main(["validate", str(write_recipe(tmp_path, [sft]))]) != 0
    assert f"tools: '{folder}' has no chat template" in capsys.readouterr().err
    assert main(["validate", str(write_recipe(tmp_path, [{**sft, "chat_template": "chatml"}]))]) == 0
    capsys.readouterr()
    assert main(["validate", str(write_recipe(tmp_path, [{**sft, "tools": [], "chat_template": PLAIN_CHATML}]))]) != 0
    assert "the rows call tools, but the stage's chat_template does not render tools" in capsys.readouterr().err


def vault_stage(**extra) -> dict:
    return {"name": "grpo", "type": "grpo", "model": "sft", "environment": "tests.tool_functions:Vault",
            "dataset": {"path": str(DATA / "prompts.jsonl"), "max_samples": 16},
            "args": {"max_steps": 1, "num_generations": 2, "per_device_train_batch_size": 2,
                     "max_completion_length": 8}, **extra}


def test_validate_refuses_environments_it_cannot_use_and_makes_none(tmp_path, capsys, monkeypatch):
    """An environment is a class with `reset` and described tool methods, made with its `args`; validate reads
    the class and never constructs one. One that scores (`get_reward`) needs no other reward; rloo refuses one."""
    marker = tmp_path / "made"
    monkeypatch.setenv("TOOL_MARKER", str(marker))
    stages = tiny_stages()
    assert main(["validate", str(write_recipe(tmp_path, stages + [vault_stage()]))]) == 0
    capsys.readouterr()
    bad = [vault_stage(name="a", environment="tests.tool_functions:add"),
           vault_stage(name="b", environment="tests.tool_functions:NoReset"),
           vault_stage(name="c", environment="tests.tool_functions:Undescribed"),
           vault_stage(name="d", environment={"factory": "tests.tool_functions:Vault", "args": {"tries": 3}}),
           vault_stage(name="e", environment="tests.tool_functions:Nope"),
           {**vault_stage(), "name": "f", "type": "rloo", "rewards": [{"function": "exact_match"}]}]
    assert main(["validate", str(write_recipe(tmp_path, stages + bad))]) == 2
    err = capsys.readouterr().err
    assert "stage 'a': environment: 'tests.tool_functions:add' must be a class" in err
    assert "stage 'b': environment: 'tests.tool_functions:NoReset' has no `reset` method" in err
    assert "stage 'b': `rewards` must list at least one reward" in err  # it does not score, nothing else does
    assert "stage 'c': environment: 'tests.tool_functions:Undescribed.poke' cannot be described to the model" in err
    assert "stage 'd': environment.args: got an unexpected keyword argument 'tries'" in err
    assert "stage 'e': environment: cannot import 'tests.tool_functions:Nope'" in err
    assert "stage 'f': environment: TRL's RLOOTrainer cannot run environments" in err
    assert not marker.exists()  # read, never made


def try_codes(seen: str, i: int) -> str:
    """Try the row's code (even rows) or one less (odd rows), once; then say so."""
    if "<|im_start|>tool" in seen:
        return "done"
    assert "Open the vault. The vault allows" in seen  # reset's text, appended to the user's turn
    return f'<tool_call>{{"name": "try_code", "arguments": {{"code": {(46, 45)[i % 2]}}}}}</tool_call>'


def test_grpo_in_an_environment_scores_each_rollout_by_its_own_instance(tmp_path, monkeypatch):
    """GRPO in the `Vault` environment: each rollout gets its own instance, reset with its row (its text joins the
    prompt), its method is the model's tool (guarded, counted, its answers masked out of the loss), and the
    environment's `get_reward` is the stage's only reward; held-out rollouts run in environments too."""
    prompts, held_out = tmp_path / "prompts.jsonl", tmp_path / "held_out.jsonl"
    prompts.write_text((json.dumps({"prompt": "Open the vault.", "answer": "46"}) + "\n") * 16)
    held_out.write_text((json.dumps({"prompt": "Open the vault.", "answer": "46"}) + "\n") * 2)
    stages = tiny_stages(pretrain_steps=3)[:2]
    stages[1]["model"]["max_position_embeddings"] = 1024
    stages.append({**vault_stage(model="base"), "dataset": {"path": str(prompts), "eval": str(held_out)},
                   "args": {"max_steps": 2, "num_generations": 4, "per_device_train_batch_size": 4,
                            "max_completion_length": 96, "save_steps": 1000}})
    masked: list[int] = []
    compute_loss = GRPOTrainer._compute_loss

    def watched(self, model, inputs):
        masked.append(int(((inputs["tool_mask"] == 0) & (inputs["completion_mask"] == 1)).sum()))
        return compute_loss(self, model, inputs)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", watched)
    monkeypatch.setattr(LlamaForCausalLM, "generate", scripted_generate(tmp_path / "run" / "tok" / "output", try_codes))
    assert main(["run", str(write_recipe(tmp_path, stages))]) == 0
    metrics = summary(tmp_path / "run")["stages"]["grpo"]["metrics"]
    assert metrics["tool_calls"] == 2 * 4 and metrics["tool_errors"] == 0
    assert metrics["train_reward_last"] == 0.5  # half the rollouts opened their own vault
    assert metrics["initial_eval_env_reward"] == metrics["eval_env_reward"] == 0.5
    assert masked and all(count > 0 for count in masked)


def test_eval_answers_in_an_environment_and_reports_its_reward(tmp_path, monkeypatch):
    """An eval stage with an environment (and its `args`): each prompt in its own instance, reset with its row;
    `env_reward/<model>` is the mean of `get_reward()` after each answer."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "Open the vault.", "answer": a}) + "\n" for a in ("46", "46", "7")))
    stages = tiny_stages(pretrain_steps=3)[:2]
    stages[1]["model"]["max_position_embeddings"] = 1024
    stages.append({"name": "eval", "type": "eval", "models": ["base"], "dataset": str(rows), "max_new_tokens": 64,
                   "environment": {"factory": "tests.tool_functions:Vault", "args": {"attempts": 1}}})
    monkeypatch.setattr(LlamaForCausalLM, "generate", scripted_generate(
        tmp_path / "run" / "tok" / "output", lambda seen, i: try_codes(seen, 0)))  # always code 46
    assert main(["run", str(write_recipe(tmp_path, stages))]) == 0
    metrics = summary(tmp_path / "run")["stages"]["eval"]["metrics"]
    assert metrics["env_reward/base"] == 2 / 3  # code 46 opens the first two rows' vaults, not the third's
    assert metrics["tool_calls/base"] == 1 and metrics["tool_errors/base"] == 0
