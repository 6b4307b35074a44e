"""LLM judges as reward functions: a causal LM's expected rating of a response, loaded here or served elsewhere.

Both read the same number: the expectation of the rating 1..scale under the judge's next-token distribution
over the rating digits, renormalised over those digits (G-Eval). `LocalJudge` computes it from the model's
logits; `RemoteJudge` asks an OpenAI-compatible server (`pipeline serve`, vLLM, TGI, llama.cpp's server) for one
token with its `top_logprobs`, so a served judge gives the in-process scores (digits outside the server's top
20 count as probability 0; where none of them is there, the rating read from the reply's text, else the
lowest rating).
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
from accelerate import PartialState

from pipeline.config.specs import JudgeSpec
from pipeline.data.loading import DataError
from pipeline.data.prompts import encode_prompts
from pipeline.models.decoding import completion_text, prompt_text
from pipeline.models.loading import load_causal_lm, load_tokenizer
from pipeline.models.remote import RemoteScoringError, json_of, post_json


def questions(judge: JudgeSpec, prompts: list[Any], completions: list[Any]) -> list[str]:
    """The judge's prompt for each (prompt, completion): its template filled in."""
    return [judge.prompt.format(prompt=prompt_text(p), response=completion_text(c), scale=judge.scale)
            for p, c in zip(prompts, completions)]


class LocalJudge:
    """The judge model loaded in this process."""

    def __init__(self, judge: JudgeSpec, path: str, *, batch_size: int = 64, trust_remote_code: bool = False):
        self.judge, self.batch_size = judge, batch_size
        self.model = load_causal_lm(path, trust_remote_code=trust_remote_code).to(PartialState().device).eval()
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        digit_ids = [self.tokenizer(str(k), add_special_tokens=False)["input_ids"] for k in range(1, judge.scale + 1)]
        if any(len(ids) != 1 for ids in digit_ids):
            raise DataError(f"judge '{judge.model}': its tokenizer splits a rating digit 1..{judge.scale} into "
                            "several tokens")
        self.digit_ids = [ids[0] for ids in digit_ids]
        self.__name__ = f"judge:{judge.model}"  # TRL names logged reward columns after this

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        asked = questions(self.judge, prompts, completions)
        ratings = torch.arange(1, self.judge.scale + 1, dtype=torch.float)
        scores: list[float] = []
        for start in range(0, len(asked), self.batch_size):
            # left-padded: the rating is predicted at the right edge of every row
            input_ids, attention_mask = encode_prompts(self.tokenizer, asked[start:start + self.batch_size])
            logits = self.model(input_ids=input_ids.to(self.model.device),
                                attention_mask=attention_mask.to(self.model.device)).logits
            digits = logits[:, -1, self.digit_ids].float().cpu()
            scores += (torch.softmax(digits, dim=-1) @ ratings).tolist()
        return scores


def expected_rating(top_logprobs: list[dict[str, Any]], text: str, scale: int) -> float:
    """The expected rating over the digits 1..scale among a token's `top_logprobs` ({token, logprob}), renormalised;
    without any of them, the first such digit in `text`, else the lowest rating."""
    weights = {int(t["token"]): math.exp(t["logprob"]) for t in top_logprobs
               if t["token"] in {str(k) for k in range(1, scale + 1)}}
    if weights:
        total = sum(weights.values())
        return sum(k * w for k, w in weights.items()) / total
    found = re.search(f"[1-{scale}]", text)
    return float(found.group()) if found else 1.0


class RemoteJudge:
    """The judge asked over the OpenAI chat-completions API: one request per response, `concurrency` at once,
    each retried with backoff (`pipeline.models.remote.post_json`). The API key, when the environment variable
    `api_key_env` names one, is sent as a bearer token and written nowhere."""

    def __init__(self, judge: JudgeSpec, *, concurrency: int = 8, retries: int = 4, backoff: float = 0.5):
        self.judge, self.concurrency, self.retries, self.backoff = judge, concurrency, retries, backoff
        self.url = f"{judge.base_url.rstrip('/')}/chat/completions"
        self.__name__ = f"judge:{judge.model}"

    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        asked = questions(self.judge, prompts, completions)
        if not asked:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(asked))) as pool:
            return list(pool.map(self.rate, asked))

    def rate(self, question: str) -> float:
        key = os.environ.get(self.judge.api_key_env)
        what = f"judge server {self.judge.base_url}"
        answer = post_json(self.url, {"model": self.judge.model, "messages": [{"role": "user", "content": question}],
                                      "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20},
                           what=what, timeout=self.judge.timeout, retries=self.retries, backoff=self.backoff,
                           headers={"Authorization": f"Bearer {key}"} if key else None)
        body = json_of(answer, what)
        try:
            choice = body["choices"][0]
            text = choice["message"]["content"] or ""
            top = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs") or []
            return expected_rating(top, text, self.judge.scale)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise RemoteScoringError(f"{what}: its answer is not a chat completion (`choices[0].message.content`, "
                                     f"`choices[0].logprobs.content[0].top_logprobs`): {type(err).__name__}: {err}"
                                     ) from None


def judge_scorer(judge: JudgeSpec, resolve: Callable[[str], str], *, batch_size: int = 64,
                 trust_remote_code: bool = False) -> LocalJudge | RemoteJudge:
    """The judge as a reward function: asked over HTTP with `base_url`, else loaded here (`resolve`: stage -> folder)."""
    if judge.base_url:
        return RemoteJudge(judge)
    return LocalJudge(judge, resolve(judge.model), batch_size=batch_size, trust_remote_code=trust_remote_code)
