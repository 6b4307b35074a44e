"""Rewards from a model served in another process: `pipeline serve` started for real on localhost, scores equal to
the in-process scorer's, a grpo and an eval stage scoring over HTTP with the same numbers as in process, and the
faults a served model brings (a server that is down or dies, a slow one, a malformed answer)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml

from pipeline.config.specs import JudgeSpec
from pipeline.models.decoding import generate
from pipeline.models.judges import LocalJudge, RemoteJudge
from pipeline.models.loading import load_causal_lm, load_tokenizer
from pipeline.models.remote import RemoteRewardScorer, RemoteScoringError
from pipeline.models.reward_functions import RewardModelScorer
from tests.conftest import DATA, REPO, summary, tiny_stages, write_recipe

PROMPTS = ["Q: What is 3 + 4?\nA:", "Q: What letter comes after c?\nA:",
           [{"role": "user", "content": "Which is larger, 12 or 7?"}]] * 7
COMPLETIONS = [" 7", " d", [{"role": "assistant", "content": "12"}]] * 6 + [" 8", " e", "7, I think"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grpo_stage(name: str, reward: dict) -> dict:
    return {"name": name, "type": "grpo", "model": "sft",
            "dataset": {"path": str(DATA / "prompts.jsonl"), "max_samples": 64, "eval_samples": 0},
            "rewards": [reward], "max_new_tokens_eval": 4,
            "args": {"max_steps": 2, "learning_rate": 1e-3, "num_generations": 4, "per_device_train_batch_size": 8,
                     "max_completion_length": 6, "beta": 0.04, "logging_steps": 1}}


def ppo_stage(name: str, reward: dict) -> dict:
    return {"name": name, "type": "ppo", "model": "sft", "rewards": [reward], "peft": {"r": 8, "lora_alpha": 16},
            "dataset": {"path": str(DATA / "prompts.jsonl"), "max_samples": 64, "eval_samples": 8},
            "args": {"max_steps": 2, "rollout_batch_size": 8, "mini_batch_size": 4, "learning_rate": 1e-3,
                     "max_new_tokens": 6}}


def eval_stage(name: str, **judge) -> dict:
    return {"name": name, "type": "eval", "models": ["sft", "grpo_local"], "baseline": "sft",
            "dataset": {"path": str(DATA / "eval.jsonl"), "max_samples": 16}, "max_new_tokens": 6, **judge}


def pipeline_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """tokenizer -> pretrain -> sft -> reward model, and a grpo and an eval stage that score in process."""
    folder = tmp_path_factory.mktemp("served")
    stages = tiny_stages(pretrain_steps=10, sft_steps=10) + [
        {"name": "rm", "type": "reward", "model": "sft",
         "dataset": {"path": str(DATA / "prefs.jsonl"), "max_samples": 200},
         "args": {"max_steps": 6, "learning_rate": 1e-3, "per_device_train_batch_size": 16, "max_length": 64}},
        grpo_stage("grpo_local", {"reward_model": "rm"}),
        ppo_stage("ppo_local", {"reward_model": "rm"}),
        eval_stage("eval_local", reward_model="rm", judge={"model": "sft"})]
    write_recipe(folder, stages)
    result = pipeline_cli("run", str(folder / "recipe.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def start_server(model: Path, port: int | None = None, *options: str):
    """`pipeline serve MODEL [options]` in its own process; (its URL, the process) once `GET /health` answers."""
    port = port or free_port()
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", str(model), "--port", str(port), *options],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{url}/health", timeout=1).json()["status"] == "ok":
                break
        except requests.RequestException:
            pass
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "pipeline serve did not answer /health in 120 s"
        time.sleep(0.5)
    return url, process


def served(model: Path):
    url, process = start_server(model)
    yield url, process
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(trained):
    """The reward model, served."""
    yield from served(trained / "run" / "rm")


@pytest.fixture(scope="module")
def judge_server(trained):
    """The SFT model, served behind the OpenAI chat-completions API."""
    yield from served(trained / "run" / "sft")


def test_served_scores_equal_in_process_scores(trained, server):
    url, _ = server
    assert requests.get(f"{url}/health", timeout=5).json() == {
        "status": "ok", "kind": "reward", "model": str(trained / "run" / "rm" / "output")}
    local = RewardModelScorer(str(trained / "run" / "rm" / "output"))(PROMPTS, COMPLETIONS)
    served = RemoteRewardScorer(url, batch_size=4)(PROMPTS, COMPLETIONS)  # 6 batches, 4 at a time
    assert len(served) == len(PROMPTS) and max(abs(a - b) for a, b in zip(local, served)) < 1e-5
    assert len(set(round(s, 4) for s in served)) > 3  # a trained head: the scores differ between responses


def test_a_reward_model_served_in_bf16_scores_as_in_fp32_to_bf16s_rounding(trained):
    url, process = start_server(trained / "run" / "rm", None, "--precision", "bf16")
    try:
        served = RemoteRewardScorer(url, batch_size=4)(PROMPTS, COMPLETIONS)
    finally:
        process.terminate()
        process.wait(timeout=30)
    local = RewardModelScorer(str(trained / "run" / "rm" / "output"))(PROMPTS, COMPLETIONS)
    errors = [abs(a - b) for a, b in zip(local, served)]
    assert 0 < max(errors) < 0.05 * (max(local) - min(local)), (local, served)  # bf16, not fp32: not equal


def test_a_bad_request_is_answered_400_naming_the_field(server):
    url, _ = server
    answer = requests.post(f"{url}/score", json={"prompts": ["a"], "completions": [1]}, timeout=10)
    assert answer.status_code == 400 and answer.json() == {"error": "`completions[0]` must be a string or a list "
                                                                    "of chat messages"}
    with pytest.raises(RemoteScoringError, match=r"\(a batch of 2\) refused a request: HTTP 400: .*differ in length"):
        RemoteRewardScorer(url).score_batch((["a", "b"], ["c"]))


def test_grpo_ppo_and_eval_scoring_over_http_give_the_in_process_numbers(trained, server, judge_server):
    """The same recipe's stages with `reward_url` instead of `reward_model` and a served judge: the rewards each
    step logged (grpo, ppo), ppo's held-out scores and the eval's reward, win rate and judge ratings are the
    in-process stages', to 1e-5."""
    url, _ = server
    recipe = trained / "recipe.yaml"
    data = yaml.safe_load(recipe.read_text())
    judge = {"model": "sft", "base_url": f"{judge_server[0]}/v1"}
    data["stages"] += [grpo_stage("grpo_remote", {"reward_url": url}), ppo_stage("ppo_remote", {"reward_url": url}),
                       eval_stage("eval_remote", reward_url=url, judge=judge)]
    recipe.write_text(yaml.safe_dump(data))
    assert pipeline_cli("validate", str(recipe), "--check-remote").returncode == 0
    result = pipeline_cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    run = trained / "run"

    def rewards(stage: str) -> list[float]:
        return [row["reward"] for row in json.loads((run / stage / "log_history.json").read_text()) if "reward" in row]
    for stage in ("grpo", "ppo"):
        local, remote = rewards(f"{stage}_local"), rewards(f"{stage}_remote")
        assert len(local) == len(remote) == 2 and max(abs(a - b) for a, b in zip(local, remote)) < 1e-5, stage
    stages = summary(run)["stages"]
    ppo_local, ppo_remote = stages["ppo_local"]["metrics"], stages["ppo_remote"]["metrics"]
    assert {k.replace("/rm", "") for k in ppo_local} == {k.replace(f"/{url[7:]}", "") for k in ppo_remote}
    for key, value in ppo_local.items():
        assert abs(ppo_remote[key.replace("/rm", f"/{url[7:]}")] - value) < 1e-5, key
    for key, value in stages["eval_local"]["metrics"].items():
        assert abs(stages["eval_remote"]["metrics"][key] - value) < 1e-5, key
    assert {"win_rate/grpo_local", "judge/sft", "judge/grpo_local"} <= set(stages["eval_remote"]["metrics"])


class FaultyServer:
    """A stand-in reward server on localhost that answers `/score` as the test says (slow, failing, malformed), or,
    where the answer is None, goes down: that request gets no answer and its port is refused from then on."""

    def __init__(self, answer, port: int = 0):
        self.calls, self.headers = 0, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls += 1
                outer.headers.append(dict(self.headers))
                answered = answer(outer.calls, body)
                if answered is None:  # the server goes down: no answer to this request, its port refused after
                    self.close_connection = True
                    threading.Thread(target=outer.close, daemon=True).start()
                    return
                status, reply = answered
                data = json.dumps(reply).encode() if not isinstance(reply, bytes) else reply
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def faulty():
    servers = []

    def start(answer) -> FaultyServer:
        servers.append(FaultyServer(answer))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def test_5xx_answers_are_retried_with_backoff(faulty):
    flaky = faulty(lambda call, body: (503, {"error": "busy"}) if call <= 2 else
                   (200, {"scores": [float(len(c)) for c in body["completions"]]}))
    started = time.monotonic()
    assert RemoteRewardScorer(flaky.url, backoff=0.1)(["p", "q"], ["ab", "abc"]) == [2.0, 3.0]
    assert flaky.calls == 3 and time.monotonic() - started >= 0.3  # waited 0.1 s, then 0.2 s


def test_a_slow_server_times_out_and_the_error_says_so(faulty):
    def slow(call, body):
        time.sleep(1.5)
        return 200, {"scores": [0.0] * len(body["prompts"])}
    server = faulty(slow)
    with pytest.raises(RemoteScoringError) as err:
        RemoteRewardScorer(server.url, timeout=0.3, retries=1, backoff=0.05)(["p"], ["c"])
    assert str(err.value) == (f"reward server {server.url} (a batch of 1) failed 2 attempts; "
                              "the last: no answer within 0.3 s")


@pytest.mark.parametrize("reply, message", [
    ({"score": [1.0]}, "its answer has no `scores` field (it has: score)"),
    ({"scores": [1.0, 2.0]}, "`scores` must be a list of 1 numbers, got a list of 2"),
    ({"scores": ["high"]}, "`scores` must be a list of 1 numbers, got a list of 1 such as ['high']"),
    (b"<html>oops</html>", "its answer is not JSON"),
])
def test_a_malformed_answer_is_a_clear_error_naming_the_field(faulty, reply, message):
    server = faulty(lambda call, body: (200, reply))
    with pytest.raises(RemoteScoringError, match="reward server .*: " + message.replace("[", r"\[").replace(
            "(", r"\(").replace(")", r"\)")):
        RemoteRewardScorer(server.url)(["p"], ["c"])
    assert server.calls == 1  # a malformed answer is not retried


def test_a_server_that_goes_down_fails_the_stage_in_one_line_keeping_earlier_outputs(trained, tmp_path):
    """The served reward model dies (its port closed): the stage scoring with it retries, then fails with one line
    naming the URL, and every stage finished before keeps its output; `validate --check-remote` says it first."""
    port = free_port()
    data = yaml.safe_load((trained / "recipe.yaml").read_text())
    data["stages"] = [s for s in data["stages"] if s["name"] in ("tok", "base", "sft")]
    data["stages"].append(grpo_stage("grpo_down", {"reward_url": f"http://127.0.0.1:{port}"}))
    data["output_dir"] = str(trained / "run")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    checked = pipeline_cli("validate", str(recipe), "--check-remote")
    assert checked.returncode == 2 and f"reward server http://127.0.0.1:{port} is not reachable" in checked.stderr
    before = (trained / "run" / "sft" / "output" / "model.safetensors").read_bytes()
    result = pipeline_cli("run", str(recipe))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"reward server http://127.0.0.1:{port} (a batch of 8) failed 5 attempts; "
            "the last: connection refused or lost") in result.stderr
    assert (trained / "run" / "sft" / "output" / "model.safetensors").read_bytes() == before
    assert summary(trained / "run")["stages"]["grpo_down"]["status"] == "failed"


def test_validate_refuses_a_malformed_url(trained, tmp_path):
    data = yaml.safe_load((trained / "recipe.yaml").read_text())
    data["stages"] = [s for s in data["stages"] if s["name"] in ("tok", "base", "sft")]
    data["stages"].append(grpo_stage("grpo", {"reward_url": "rm-node:8000"}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    result = pipeline_cli("validate", str(recipe))
    assert result.returncode == 2
    assert "stage 'grpo': rewards[0]: reward_url: 'rm-node:8000' is not an http:// or https:// URL with a host" \
        in result.stderr


def test_serve_refuses_a_model_it_cannot_serve(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    result = pipeline_cli("serve", str(tmp_path), "--port", str(free_port()))
    assert result.returncode == 1
    assert "is neither a reward model nor a causal LM (its architectures: BertForMaskedLM)" in result.stderr


def test_serve_finds_a_stage_by_its_folder_or_its_name(tmp_path, monkeypatch):
    from pipeline.runtime.process import UserError
    from pipeline.serving.reward_server import model_folder

    for run in ("a", "b"):
        (tmp_path / "runs" / run / "rm" / "output").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "judge" / "output").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert model_folder("runs/a/rm") == "runs/a/rm/output"
    assert model_folder("judge") == "runs/a/judge/output"  # the one run that has it
    assert model_folder("rm", "runs/b") == "runs/b/rm/output"
    assert model_folder("org/reward-model") == "org/reward-model"  # a Hub id
    with pytest.raises(UserError, match=r"stage 'rm' is in several runs \(runs/a, runs/b\); say which with --run-dir"):
        model_folder("rm")
    with pytest.raises(UserError, match="runs/b has no finished stage 'judge'"):
        model_folder("judge", "runs/b")


def test_a_served_judge_speaks_the_openai_api_and_rates_as_in_process(trained, judge_server):
    """`pipeline serve` of a causal LM answers chat completions as the model generates in process, with OpenAI
    `logprobs`; a judge asked through it gives the in-process judge's expected ratings to 1e-5."""
    url, _ = judge_server
    sft = str(trained / "run" / "sft" / "output")
    assert requests.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"] == sft
    answer = requests.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": sft, "messages": [{"role": "user", "content": "What is 3 + 4?"}], "max_tokens": 6, "temperature": 0,
        "logprobs": True, "top_logprobs": 3}).json()
    model, tokenizer = load_causal_lm(sft), load_tokenizer(sft)
    [local] = generate(model, tokenizer, [[{"role": "user", "content": "What is 3 + 4?"}]], max_new_tokens=6)
    choice = answer["choices"][0]
    assert answer["object"] == "chat.completion" and choice["message"]["content"] == local
    assert len(choice["logprobs"]["content"]) == answer["usage"]["completion_tokens"]
    assert all(len(t["top_logprobs"]) == 3 and t["top_logprobs"][0]["logprob"] >= t["logprob"] - 1e-6
               for t in choice["logprobs"]["content"])

    judge = JudgeSpec(model=sft, scale=5)
    served = RemoteJudge(JudgeSpec(model=sft, scale=5, base_url=f"{url}/v1"))(PROMPTS[:6], COMPLETIONS[:6])
    in_process = LocalJudge(judge, sft)(PROMPTS[:6], COMPLETIONS[:6])
    assert max(abs(a - b) for a, b in zip(served, in_process)) < 1e-5
    assert all(1.0 <= s <= 5.0 for s in served) and len(set(round(s, 5) for s in served)) > 1


def test_a_judge_answer_that_is_not_a_chat_completion_is_a_clear_error(faulty):
    server = faulty(lambda call, body: (200, {"text": "5"}))
    with pytest.raises(RemoteScoringError, match=r"judge server .*: its answer is not a chat completion "
                                                 r"\(`choices\[0\].message.content`"):
        RemoteJudge(JudgeSpec(model="j", base_url=server.url))(["p"], ["c"])


def test_a_judge_reads_its_rating_from_top_logprobs_else_from_its_text(faulty, monkeypatch):
    """The expected rating over the digits among the first token's top_logprobs, renormalised; a reply without
    them is read from its text; the API key goes in the Authorization header from the environment."""
    seen = []

    def answer(call, body):
        seen.append(body)
        top = [{"token": "4", "logprob": math.log(0.3)}, {"token": "2", "logprob": math.log(0.1)},
               {"token": "x", "logprob": math.log(0.5)}] if call == 1 else []
        return 200, {"choices": [{"message": {"content": "x" if call == 1 else "I rate it 3."},
                                  "logprobs": {"content": [{"token": "x", "top_logprobs": top}]}}]}
    server = faulty(answer)
    judge = RemoteJudge(JudgeSpec(model="j", base_url=server.url, scale=5, api_key_env="JUDGE_KEY"), concurrency=1)
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    assert judge(["p"], ["c"]) == [pytest.approx((4 * 0.3 + 2 * 0.1) / 0.4)]
    monkeypatch.delenv("JUDGE_KEY")
    assert judge(["p"], ["c"]) == [3.0]
    assert server.headers[0]["Authorization"] == "Bearer sk-test" and "Authorization" not in server.headers[1]
    assert seen[0]["top_logprobs"] == 20 and seen[0]["max_tokens"] == 1 and seen[0]["temperature"] == 0


def test_a_server_killed_mid_stage_fails_it_clearly_and_the_rerun_resumes_to_the_same_numbers(trained, tmp_path):
    """The reward server dies while a grpo stage trains: the stage fails with one line once its retries are spent;
    with the server back, the rerun resumes from the stage's last checkpoint and logs the rewards of a run that
    was never interrupted (the same stage scoring in process).

    The server is killed by the first request after checkpoint-2 is written, through a front on the recipe's port
    that forwards to it until then: killing it when the test saw the checkpoint raced the stage (on a busy machine
    the stage once finished all six steps before the test woke up)."""
    port = free_port()
    data = yaml.safe_load((trained / "recipe.yaml").read_text())
    data["stages"] = [s for s in data["stages"] if s["name"] in ("tok", "base", "sft", "rm")]
    for name, reward in (("grpo_whole", {"reward_model": "rm"}), ("grpo_cut", {"reward_url": f"http://127.0.0.1:{port}"})):
        stage = grpo_stage(name, reward)
        stage["args"].update(max_steps=6, save_steps=2)
        data["stages"].append(stage)
    data["output_dir"] = str(trained / "run")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    checkpoints = trained / "run" / "grpo_cut" / "checkpoints"

    server_url, server = start_server(trained / "run" / "rm")
    killed_after = []  # the scoring calls the server answered before the front killed it

    def forward_until_checkpoint_2(call, body):
        if list(checkpoints.glob("checkpoint-2")):
            if not killed_after:
                server.kill()
                killed_after.append(call - 1)
            return None
        answer = requests.post(f"{server_url}/score", json=body, timeout=120)
        return answer.status_code, answer.json()
    front = FaultyServer(forward_until_checkpoint_2, port)
    try:
        run = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe)], cwd=REPO, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)
    finally:
        server.kill()
        server.wait()
        front.close()
    stderr = run.stderr
    assert killed_after and killed_after[0] >= 2, killed_after  # steps 1 and 2 were scored by the server
    assert run.returncode == 1 and "Traceback" not in stderr
    assert f"reward server http://127.0.0.1:{port} (a batch of 8) failed 5 attempts; the last: connection refused" \
        in stderr
    assert summary(trained / "run")["stages"]["grpo_cut"]["status"] == "failed"

    _, server = start_server(trained / "run" / "rm", port)
    try:
        rerun = pipeline_cli("run", str(recipe))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout + rerun.stderr

    def rewards(stage: str) -> list[float]:
        history = json.loads((trained / "run" / stage / "log_history.json").read_text())
        return [row["reward"] for row in history if "reward" in row]
    whole, cut = rewards("grpo_whole"), rewards("grpo_cut")
    assert len(whole) == len(cut) == 6 and max(abs(a - b) for a, b in zip(whole, cut)) < 1e-5
