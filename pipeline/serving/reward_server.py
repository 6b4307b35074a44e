"""`pipeline serve MODEL`: a reward model behind HTTP, so that the policy's process holds no reward model (a causal
LM is served behind the OpenAI chat-completions API instead: `pipeline.serving.chat_server`).

Served with aiohttp's web server. The wire format is `pipeline.models.remote`'s: `POST /score` takes
`{"prompts": [...], "completions": [...]}` and answers `{"scores": [...]}`; `GET /health` answers
`{"status": "ok", "kind": "reward", "model": ...}`. Scores come from the very scorer a stage loads in process
(`RewardModelScorer`: the same rendering, truncation and batching), so they equal in-process scores.
A request that is not of that shape gets HTTP 400 with `{"error": ...}` naming the field.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from accelerate import PartialState
from aiohttp import web
from transformers import AutoConfig

from pipeline.models.loading import load_causal_lm, load_tokenizer
from pipeline.models.reward_functions import RewardModelScorer
from pipeline.runtime.process import UserError
from pipeline.serving.chat_server import chat_app


def pair_problem(body: Any) -> str | None:
    """What is wrong with a `/score` request body, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object with `prompts` and `completions`"
    for key in ("prompts", "completions"):
        if not isinstance(body.get(key), list):
            return f"`{key}` must be a list"
        bad = next((i for i, item in enumerate(body[key]) if not isinstance(item, (str, list))), None)
        if bad is not None:
            return f"`{key}[{bad}]` must be a string or a list of chat messages"
    if len(body["prompts"]) != len(body["completions"]):
        return f"`prompts` ({len(body['prompts'])}) and `completions` ({len(body['completions'])}) differ in length"
    return None


def reward_app(scorer: RewardModelScorer, name: str) -> web.Application:
    """The server's routes around one loaded scorer; requests are scored one at a time, each in a worker thread."""
    lock = asyncio.Lock()  # one forward pass at a time: concurrent ones would only share the same cores

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "kind": "reward", "model": name})

    async def score(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body is not JSON"}, status=400)
        problem = pair_problem(body)
        if problem:
            return web.json_response({"error": problem}, status=400)
        async with lock:
            scores = await asyncio.get_running_loop().run_in_executor(
                None, scorer, body["prompts"], body["completions"])
        return web.json_response({"scores": scores})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/health", health)
    app.router.add_post("/score", score)
    return app


def model_folder(model: str, run_dir: str | None = None) -> str:
    """What `model` names: a stage folder (`runs/NAME/rm`) its finished `output/`; a stage name the `output/` of
    that stage in `run_dir` (default: the one run under `runs/` that has it); a folder or Hub id itself."""
    if (Path(model) / "output").is_dir():
        return str(Path(model) / "output")
    if Path(model).exists() or "/" in model:
        return model
    runs = [Path(run_dir)] if run_dir else sorted(Path("runs").glob("*"))
    found = [run / model / "output" for run in runs if (run / model / "output").is_dir()]
    if run_dir and not found:
        raise UserError(f"{run_dir} has no finished stage '{model}'")
    if len(found) > 1:
        raise UserError(f"stage '{model}' is in several runs ({', '.join(str(f.parent.parent) for f in found)}); "
                        "say which with --run-dir")
    return str(found[0]) if found else model


def serve(model: str, host: str, port: int, batch_size: int, run_dir: str | None = None) -> None:
    """Load the model and answer until interrupted: a reward model's scores, or a causal LM's chat completions."""
    path = model_folder(model, run_dir)
    architectures = AutoConfig.from_pretrained(path).architectures or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        app, routes = reward_app(RewardModelScorer(path, batch_size=batch_size), path), "POST /score"
    elif any(a.endswith("ForCausalLM") for a in architectures):
        model_on_device = load_causal_lm(path).to(PartialState().device).eval()
        app, routes = chat_app(model_on_device, load_tokenizer(path), path), "POST /v1/chat/completions, GET /v1/models"
    else:
        raise UserError(f"{path} is neither a reward model nor a causal LM (its architectures: "
                        f"{', '.join(architectures) or 'none'})")
    print(f"serving {path} on http://{host}:{port}: {routes}, GET /health", flush=True)
    web.run_app(app, host=host, port=port, print=None)
