"""Rewards scored by a model that lives in another process or on another machine (`pipeline serve`).

The wire format, which `pipeline.serving.reward_server` answers and any other server may too:

- `POST {url}/score` with `{"prompts": [...], "completions": [...]}`, each item a string or a list of chat
  messages (`{"role": ..., "content": ...}`), as TRL hands them to reward functions; the answer is
  `{"scores": [number, ...]}`, one per (prompt, completion) pair, in order;
- `GET {url}/health` answers `{"status": "ok", ...}` when the server is ready.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from pipeline.runtime.process import UserError


class RemoteScoringError(UserError, RuntimeError):
    """A reward server that stayed down, answered with an error, or answered something else than scores."""


def health(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """The server's `GET /health` answer; RemoteScoringError saying what went wrong otherwise."""
    try:
        answer = requests.get(f"{url.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as err:
        raise RemoteScoringError(f"reward server {url} is not reachable: {type(err).__name__}") from None
    if answer.status_code != 200:
        raise RemoteScoringError(f"reward server {url}: GET /health answered HTTP {answer.status_code}")
    return json_of(answer, f"reward server {url}")


def scores_in(answer: requests.Response, expected: int, url: str) -> list[float]:
    """The `scores` of a server's answer to a batch of `expected` pairs, checked field by field."""
    body = json_of(answer, f"reward server {url}")
    if not isinstance(body, dict) or "scores" not in body:
        fields = ", ".join(map(str, body)) if isinstance(body, dict) else type(body).__name__
        raise RemoteScoringError(f"reward server {url}: its answer has no `scores` field (it has: {fields})")
    scores = body["scores"]
    if not isinstance(scores, list) or len(scores) != expected or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        shown = f"a list of {len(scores)}" if isinstance(scores, list) else type(scores).__name__
        raise RemoteScoringError(f"reward server {url}: `scores` must be a list of {expected} numbers, got {shown}"
                                 + (f" such as {scores[:3]!r}" if isinstance(scores, list) else ""))
    return [float(s) for s in scores]


def post_json(url: str, payload: dict[str, Any], *, what: str, timeout: float, retries: int, backoff: float,
              headers: dict[str, str] | None = None) -> requests.Response:
    """POST `payload` to `url`: sent again after a backoff (`backoff`, then doubling) on a timeout, a failed
    connection or a 5xx answer, up to `retries` times; a 4xx answer, or the last failure, is a
    RemoteScoringError naming `what` (e.g. "reward server http://...") and what it answered.

    Written here rather than taken from a client library's retries so that rewards and judges share one policy
    whose every failure ends in one line a user can act on."""
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            answer = requests.post(url, json=payload, timeout=timeout, headers=headers)
        except requests.Timeout:
            last = f"no answer within {timeout:g} s"
            continue
        except requests.ConnectionError:
            last = "connection refused or lost"
            continue
        if answer.status_code >= 500:
            last = f"HTTP {answer.status_code}: {answer.text[:200]!r}"
            continue
        if answer.status_code != 200:
            raise RemoteScoringError(f"{what} refused a request: HTTP {answer.status_code}: {answer.text[:200]!r}")
        return answer
    raise RemoteScoringError(f"{what} failed {retries + 1} attempts; the last: {last}")


def json_of(answer: requests.Response, what: str) -> Any:
    try:
        return answer.json()
    except ValueError:
        raise RemoteScoringError(f"{what}: its answer is not JSON: {answer.text[:200]!r}") from None


class RemoteRewardScorer:
    """A reward function (TRL's signature) whose scores come from a served reward model.

    The pairs go out in batches of `batch_size`, `concurrency` at a time, each sent by `post_json` (retried
    with backoff); a malformed answer fails at once, naming the field.
    """

    def __init__(self, url: str, *, batch_size: int = 64, timeout: float = 60.0, retries: int = 4,
                 concurrency: int = 4, backoff: float = 0.5):
        self.url = url.rstrip("/")
        self.batch_size, self.timeout, self.retries = batch_size, timeout, retries
        self.concurrency, self.backoff = concurrency, backoff
        self.__name__ = f"reward_url:{self.url}"  # TRL names logged reward columns after this

    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        batches = [(prompts[i:i + self.batch_size], completions[i:i + self.batch_size])
                   for i in range(0, len(prompts), self.batch_size)]
        if not batches:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(batches))) as pool:
            return [score for batch in pool.map(self.score_batch, batches) for score in batch]

    def score_batch(self, batch: tuple[list, list]) -> list[float]:
        prompts, completions = batch
        answer = post_json(f"{self.url}/score", {"prompts": prompts, "completions": completions},
                           what=f"reward server {self.url} (a batch of {len(prompts)})", timeout=self.timeout,
                           retries=self.retries, backoff=self.backoff)
        return scores_in(answer, len(prompts), self.url)
