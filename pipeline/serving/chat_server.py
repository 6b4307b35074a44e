"""`pipeline serve MODEL` for a causal LM: the OpenAI chat-completions API, so that the project's own models (and any
a user trains) can be the judges that stages ask over HTTP (`judge: {base_url: ...}`).

Routes: `POST /v1/chat/completions` (`messages`, `max_tokens`, `temperature`, `logprobs`, `top_logprobs`; one
choice), `GET /v1/models`, `GET /health` (`{"status": "ok", "kind": "chat", "model": ...}`). Messages are rendered
as the pipeline renders prompts for this model (`pipeline.data.prompts`: its chat template, or plain text for a
model trained on plain text), so a judge asked here reads what the same judge loaded in process reads.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import torch
from aiohttp import web

from pipeline.data.prompts import renders_chat
from pipeline.models.decoding import generate_ids
from pipeline.models.sampling import stop_token_ids

MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit


def completion_problem(body: Any) -> str | None:
    """What is wrong with a chat-completions request body, or None."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        return "`messages` must be a non-empty list"
    for i, message in enumerate(body["messages"]):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            return f"`messages[{i}]` must be an object with `role` and a string `content`"
    max_tokens = body.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        return "`max_tokens` must be an integer >= 1"
    temperature = body.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or temperature < 0:
        return "`temperature` must be a number >= 0"
    top = body.get("top_logprobs", 0)
    if not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        return f"`top_logprobs` must be an integer in 0..{MAX_TOP_LOGPROBS}"
    return None


@torch.no_grad()
def token_logprobs(model, tokenizer, prompt_ids: list[int], response: list[int], top: int) -> list[dict[str, Any]]:
    """The OpenAI `logprobs.content` of a response: each token's log-prob and the `top` most likely tokens there."""
    ids = torch.tensor([prompt_ids + response], device=model.device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:len(prompt_ids) - 1 + len(response)].float()
    logps = torch.log_softmax(logits, dim=-1).cpu()
    content = []
    for t, token in enumerate(response):
        values, indices = logps[t].topk(top) if top else (torch.empty(0), torch.empty(0, dtype=torch.long))
        content.append({"token": tokenizer.decode([token]), "logprob": logps[t, token].item(),
                        "top_logprobs": [{"token": tokenizer.decode([i]), "logprob": v}
                                         for v, i in zip(values.tolist(), indices.tolist())]})
    return content


def complete(model, tokenizer, body: dict[str, Any], name: str) -> dict[str, Any]:
    """One chat completion: greedy at temperature 0, else sampled at that temperature."""
    messages = [{"role": m["role"], "content": m["content"]} for m in body["messages"]]
    prompt = messages if renders_chat(tokenizer) else "\n\n".join(m["content"] for m in messages)
    temperature = float(body.get("temperature", 1.0))
    [(prompt_ids, response)] = generate_ids(model, tokenizer, [prompt], max_new_tokens=body.get("max_tokens", 16),
                                            do_sample=temperature > 0, temperature=temperature or 1.0)
    ended = bool(response) and response[-1] in stop_token_ids(model, tokenizer)
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop" if ended else "length",
                              "message": {"role": "assistant",
                                          "content": tokenizer.decode(response, skip_special_tokens=True)}}
    if body.get("logprobs"):
        choice["logprobs"] = {"content": token_logprobs(model, tokenizer, prompt_ids, response,
                                                        body.get("top_logprobs", 0))}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": name, "choices": [choice],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(response),
                      "total_tokens": len(prompt_ids) + len(response)}}


def chat_app(model, tokenizer, name: str) -> web.Application:
    """The server's routes around one loaded causal LM; requests are answered one at a time, in a worker thread."""
    lock = asyncio.Lock()

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "kind": "chat", "model": name})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "pipeline"}]})

    async def chat_completions(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "the body is not JSON"}}, status=400)
        problem = completion_problem(body)
        if problem:
            return web.json_response({"error": {"message": problem}}, status=400)
        async with lock:
            answer = await asyncio.get_running_loop().run_in_executor(None, complete, model, tokenizer, body, name)
        return web.json_response(answer)

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app
