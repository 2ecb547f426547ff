"""An OpenAI-compatible HTTP chat backend (e.g. a running `vllm.entrypoints.openai.api_server`).

Same interface as the in-process `tasks.generate.VLLMEngine`: `chat_json(conversations, schema,
sampling, seeds) -> [Completion]`, in input order. Requests run concurrently (a thread pool of
`llm.concurrency` over one httpx client); 5xx, 429, timeouts and connection errors are retried
with exponential backoff and jitter; any other 4xx fails at once with the server's message.

The API key is read from the environment variable named by `llm.api_key_env` and only ever
placed in the Authorization header: never logged, never in an error message, never in repr.
"""

from __future__ import annotations

import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from schemas.config import LLMConfig
from tasks.generate import Completion, SamplingSettings

log = logging.getLogger(__name__)
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class LLMServerError(RuntimeError):
    """The LLM server could not be used; the message says why (and never holds the key)."""


class OpenAIEngine:
    """A ChatEngine over an OpenAI-compatible `/chat/completions` endpoint."""

    backend = "openai"

    def __init__(self, cfg: LLMConfig, *, check: bool = True, backoff_s: float = 0.5):
        if not cfg.base_url:
            raise LLMServerError("llm.base_url is not set")
        self.cfg = cfg
        self.model_name = cfg.model_name
        self.base_url = cfg.base_url.rstrip("/")
        self.backoff_s = backoff_s
        self.attempts = 0  # HTTP requests sent, retries included
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(cfg.request_timeout_s, connect=min(10.0, cfg.request_timeout_s)),
            limits=httpx.Limits(max_connections=cfg.concurrency),
        )
        if check:
            self.check()

    def __repr__(self) -> str:
        return f"OpenAIEngine(base_url={self.base_url!r}, model={self.model_name!r})"

    def check(self) -> list[str]:
        """The served model ids; raises when the server is unreachable or lacks our model."""
        body = self._send("GET", "/models", None)
        served = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)]
        if self.model_name not in served:
            raise LLMServerError(
                f"the LLM server at {self.base_url} does not serve {self.model_name!r}; "
                f"it serves {served} (set llm.model_name to one of them)"
            )
        return served

    def chat_json(
        self,
        conversations: list[list[dict[str, str]]],
        schema: dict[str, Any],
        sampling: SamplingSettings,
        seeds: list[int],
    ) -> list[Completion]:
        """One JSON-schema-constrained completion per conversation, in input order."""
        if len(conversations) != len(seeds):
            raise ValueError(f"{len(conversations)} conversations but {len(seeds)} seeds")
        bodies = [
            {
                "model": self.model_name,
                "messages": messages,
                "max_tokens": sampling.max_tokens,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "seed": seed,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": schema, "strict": True},
                },
            }
            for messages, seed in zip(conversations, seeds, strict=True)
        ]
        if not bodies:
            return []
        workers = min(self.cfg.concurrency, len(bodies))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llm-http") as pool:
            return list(pool.map(self._complete, bodies))

    def _complete(self, body: dict[str, Any]) -> Completion:
        out = self._send("POST", "/chat/completions", body)
        try:
            choice = out["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise LLMServerError(f"unexpected reply from {self.base_url}: {str(out)[:200]}") from e
        usage = out.get("usage") or {}
        tokens = usage.get("completion_tokens")
        return Completion(
            text, int(tokens) if tokens is not None else 0, choice.get("finish_reason")
        )

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """One request with retries on 5xx/429/timeouts/connection errors; JSON reply."""
        url = self.base_url + path
        retries = self.cfg.max_retries
        for attempt in range(retries + 1):
            self.attempts += 1
            problem: str
            try:
                resp = self._client.request(method, url, json=body)
            except httpx.TimeoutException:
                problem = f"timed out after {self.cfg.request_timeout_s} s"
            except httpx.TransportError as e:
                problem = f"cannot connect ({type(e).__name__}: {e})"
            else:
                if resp.status_code < 400:
                    return resp.json()
                message = _server_message(resp)
                if resp.status_code == 401:
                    raise LLMServerError(
                        f"the LLM server at {self.base_url} refused the API key (401): set the "
                        f"environment variable {self.cfg.api_key_env} to a valid key"
                    )
                if resp.status_code not in RETRY_STATUS:
                    raise LLMServerError(
                        f"the LLM server at {url} answered {resp.status_code}: {message}"
                    )
                problem = f"answered {resp.status_code}: {message}"
            if attempt < retries:
                delay = self.backoff_s * 2**attempt * (1 + random.random() / 4)  # noqa: S311
                log.warning(
                    "LLM server %s %s; retry %d in %.1f s", url, problem, attempt + 1, delay
                )
                time.sleep(delay)
        raise LLMServerError(
            f"cannot use the LLM server at {url}: {problem} (after {retries} retries)"
        )

    def close(self) -> None:
        self._client.close()


def _server_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict):
        err = body.get("error", body.get("message", body))
        if isinstance(err, dict):
            return str(err.get("message", err))[:300]
        return str(err)[:300]
    return str(body)[:300]
