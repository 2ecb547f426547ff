"""An OpenAI-compatible HTTP chat backend (e.g. a running `vllm.entrypoints.openai.api_server`).

Same interface as the in-process `tasks.llm.engine.VLLMEngine`: `chat_json(conversations, schema,
sampling, seeds) -> [Completion]`, in input order. Requests run concurrently (a thread pool of
`llm.concurrency` over one httpx client); 5xx, 408, 429, timeouts and connection errors are
retried with exponential backoff and jitter (honouring a server's `Retry-After`); any other 4xx
fails at once with the server's message.

The API key is read from the environment variable named by `llm.api_key_env` and only ever
placed in the Authorization header: never logged, never in an error message, never in repr.

What vLLM's server (0.32, CPU) does with these requests, checked against a real one:
- `response_format` `json_schema` needs a `name` (without it: a 400 listing six validation
  errors); `strict` is accepted; unknown request fields are ignored, not rejected.
- `finish_reason` is `stop` or `length` (max_tokens reached: the JSON is cut off).
- a seed repeats a sampled output only when the request is batched the same way: on CPU a
  request decoded alone and the same request decoded beside others can diverge after a few
  tokens, so runs with concurrency > 1 are not bit-for-bit repeatable.
- a 401 body is `{"error": "Unauthorized"}`; an unknown model in a request is a 404; a prompt
  or `max_tokens` beyond `max_model_len` is a 400 naming the limit.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import httpx

from schemas.config import LLMConfig
from tasks.llm.base import Completion, SamplingSettings

log = logging.getLogger(__name__)
RETRY_STATUS = frozenset({408, 429})  # and every 5xx
MAX_BACKOFF_S = 30.0
SCHEMA_NAME = "output"  # vLLM requires json_schema.name; OpenAI allows [a-zA-Z0-9_-]{1,64}


class LLMServerError(RuntimeError):
    """The LLM server could not be used; the message says why (and never holds the key)."""


class OpenAIEndpoint:
    """What the chat and the embedding clients share: config checks, one httpx client with the
    key, `GET /models`, retried JSON requests counted in `attempts`, messages that name the
    server (without credentials) and never the key, requests fanned over a thread pool in
    input order. A subclass sets `what`, `section`, `error` and `example_url`.

    `check=True` (in subclasses) asks `GET {base_url}/models` at construction, so an
    unreachable server, a refused key or a model the server does not serve fails at once with
    a clear message. `backoff_s` is the first retry's delay (doubled per retry, plus up to 25%
    jitter)."""

    what = "the server"  # how messages name it
    section = ""  # its config section, for messages that say what to set
    error: type[Exception] = RuntimeError
    example_url = "http://127.0.0.1:8000/v1"
    refuse_statuses: tuple[int, ...] = (401,)

    def __init__(self, cfg: Any, backoff_s: float) -> None:
        if not cfg.base_url:
            raise self.error(f"{self.section}.base_url is not set (e.g. {self.example_url})")
        self.cfg = cfg
        self.model_name: str = cfg.model_name
        self.base_url: str = cfg.base_url.rstrip("/")
        self.shown_url = display_url(self.base_url)
        self.backoff_s = backoff_s
        self._lock = threading.Lock()
        self._sent = 0
        self._client, self._secret = keyed_client(
            cfg.api_key_env, cfg.request_timeout_s, cfg.concurrency, self.error
        )
        self._has_key = self._secret is not None  # the key: only for scrubbing server text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.shown_url!r}, model={self.model_name!r}, "
            f"api_key_env={self.cfg.api_key_env!r}, key_set={self._has_key})"
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def attempts(self) -> int:
        """HTTP requests sent so far, retries included."""
        return self._sent

    def check(self) -> list[str]:
        """The served model ids; raises when the server is unreachable or lacks our model."""
        body = self._send("GET", "/models", None)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise self.error(
                f"{self.shown_url}/models did not answer an OpenAI model list: {self._clip(body)}"
            )
        served = [str(m.get("id")) for m in data if isinstance(m, dict)]
        if self.model_name not in served:
            raise self.error(
                f"{self.what} at {self.shown_url} does not serve {self.model_name!r}; "
                f"it serves {served} (set {self.section}.model_name to one of them)"
            )
        return served

    def close(self) -> None:
        """Close the HTTP connections (the server keeps running)."""
        self._client.close()

    def _checked(self, check: bool, then: Callable[[], None] | None = None) -> list[str]:
        """`check()` (and `then()`) at construction, closing the client if either fails."""
        if not check:
            return []
        try:
            served = self.check()
            if then is not None:
                then()
        except BaseException:
            self.close()
            raise
        return served

    def _fan_out(self, fn: Callable[[Any], Any], items: list[Any], name: str) -> list[Any]:
        """`fn` over `items`, `concurrency` at a time, results in input order; the first
        failure cancels what was not yet sent and is raised."""
        workers = min(self.cfg.concurrency, len(items))
        start = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        try:
            futures = [pool.submit(fn, item) for item in items]
            out = [f.result() for f in futures]  # input order, whatever order they finish in
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        log.debug(
            "%d requests to %s in %.1f s (%d in flight)",
            len(items),
            self.shown_url,
            time.perf_counter() - start,
            workers,
        )
        return out

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        """One request with retries on 5xx/408/429/timeouts/connection errors; JSON reply."""
        return send_json(
            self._client,
            method,
            self.base_url + path,
            body,
            shown=self.shown_url + path,
            what=self.what,
            retries=self.cfg.max_retries,
            timeout_s=self.cfg.request_timeout_s,
            backoff_s=self.backoff_s,
            error=self.error,
            clip=self._clip,
            refused=self._refused,
            refuse_statuses=self.refuse_statuses,
            count=self._count,
        )

    def _count(self) -> None:
        with self._lock:
            self._sent += 1

    def _refused(self, status: int) -> str:
        var = self.cfg.api_key_env
        if not self._has_key:
            return (
                f"{self.what} at {self.shown_url} requires an API key ({status}) and none was "
                f"sent: the environment variable {var} is not set"
            )
        return (
            f"{self.what} at {self.shown_url} refused the API key ({status}): the environment "
            f"variable {var} does not hold a key it accepts"
        )

    def _clip(self, value: Any, limit: int = 300) -> str:
        """Server text for a message: shortened, and with the key scrubbed should it echo it."""
        text = str(value)
        if self._secret:
            text = text.replace(self._secret, "***")
        return text if len(text) <= limit else text[:limit] + "..."


class OpenAIEngine(OpenAIEndpoint):
    """A ChatEngine over an OpenAI-compatible `/chat/completions` endpoint (see OpenAIEndpoint
    for `check` and `backoff_s`)."""

    backend = "openai"
    what = "the LLM server"
    section = "llm"
    error = LLMServerError

    def __init__(self, cfg: LLMConfig, *, check: bool = True, backoff_s: float = 0.5) -> None:
        super().__init__(cfg, backoff_s)
        served = self._checked(check)
        if check:
            log.info("LLM server %s serves %s", self.shown_url, served)

    def chat_json(
        self,
        conversations: list[list[dict[str, str]]],
        schema: dict[str, Any],
        sampling: SamplingSettings,
        seeds: list[int],
        retry: bool = False,
    ) -> list[Completion]:
        """One JSON-schema-constrained completion per conversation, in input order (`retry`
        changes nothing here: the server keeps its own cache).

        The first request that fails for good raises `LLMServerError`; requests not yet sent
        are cancelled."""
        if len(conversations) != len(seeds):
            raise ValueError(f"{len(conversations)} conversations but {len(seeds)} seeds")
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "schema": schema, "strict": True},
        }
        bodies = [
            {
                "model": self.model_name,
                "messages": messages,
                "max_tokens": sampling.max_tokens,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "seed": seed,
                "response_format": response_format,
            }
            for messages, seed in zip(conversations, seeds, strict=True)
        ]
        if not bodies:
            return []
        return self._fan_out(self._complete, bodies, "llm-http")

    def _complete(self, body: dict[str, Any]) -> Completion:
        out = self._send("POST", "/chat/completions", body)
        try:
            choice = out["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise LLMServerError(
                f"unexpected reply from {self.shown_url}/chat/completions: {self._clip(out)}"
            ) from e
        finish = choice.get("finish_reason")
        usage = out.get("usage") if isinstance(out.get("usage"), dict) else {}
        tokens = usage.get("completion_tokens")
        if not isinstance(tokens, int):
            # No usage from this server: estimate (~4 characters a token) so throughput stats
            # stay meaningful rather than reading as zero.
            tokens = max(1, round(len(text) / 4)) if text else 0
            log.debug("no usage.completion_tokens in the reply; estimated %d", tokens)
        return Completion(text, tokens, finish)


def display_url(url: str) -> str:
    """`url` without user and password, for logs and messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def keyed_client(
    api_key_env: str, timeout_s: float, concurrency: int, error: type[Exception]
) -> tuple[httpx.Client, str | None]:
    """An httpx client for an OpenAI-compatible server: JSON headers, the API key from the
    environment variable `api_key_env` (if set) as a Bearer token, `concurrency` pooled
    connections. Returns (client, key); the key is for scrubbing server text only, never to be
    formatted anywhere. A key an HTTP header cannot carry raises `error`, naming the variable."""
    key = os.environ.get(api_key_env, "").strip() or None
    if key is not None and not (key.isascii() and key.isprintable()):
        raise error(
            f"the environment variable {api_key_env} holds an API key with characters an "
            "HTTP header cannot carry (non-ASCII or control characters)"
        )
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    client = httpx.Client(
        headers=headers,
        timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )
    return client, key


def send_json(
    client: httpx.Client,
    method: str,
    url: str,
    body: dict[str, Any] | None,
    *,
    what: str,
    retries: int,
    timeout_s: float,
    backoff_s: float,
    error: type[Exception],
    clip: Callable[[Any], str],
    refused: Callable[[int], str],
    refuse_statuses: tuple[int, ...],
    count: Callable[[], None],
    shown: str | None = None,
) -> Any:
    """One request to an OpenAI-compatible server, retried; its JSON reply.

    5xx, 408, 429, timeouts and connection errors are retried `retries` times with exponential
    backoff from `backoff_s` plus up to 25% jitter, never less than a `Retry-After`, at most
    MAX_BACKOFF_S; a status in `refuse_statuses` raises `error(refused(status))` at once; any other
    4xx raises at once with the server's message (passed through `clip`, which scrubs the key).
    `shown` is the URL as messages show it (default `url`); `count` is called once per attempt.
    """
    shown = shown or url
    failure = problem = "no attempt made"
    cause: BaseException | None = None
    for attempt in range(retries + 1):
        count()
        retry_after: float | None = None
        try:
            resp = client.request(method, url, json=body)
        except httpx.TimeoutException as e:
            problem = f"no answer within {timeout_s:g} s"
            failure, cause = f"{what} at {shown} gave {problem}", e
        except httpx.TransportError as e:
            problem = _transport_problem(e)
            failure, cause = f"cannot reach {what} at {shown}: {problem}", e
        else:
            status = resp.status_code
            if status < 400:
                try:
                    return resp.json()
                except ValueError as e:
                    raise error(
                        f"{what} at {shown} answered {status} with a body that is not JSON: "
                        f"{clip(resp.text)}"
                    ) from e
            message = clip(_server_message(resp))
            if status in refuse_statuses:
                raise error(refused(status))
            if status < 500 and status not in RETRY_STATUS:
                raise error(f"{what} at {shown} answered {status}: {message}")
            problem = f"answered {status}: {message}"
            failure, cause = f"{what} at {shown} {problem}", None
            retry_after = _retry_after(resp)
        if attempt < retries:
            delay = backoff_s * 2**attempt * (1 + random.random() / 4)  # noqa: S311
            if retry_after is not None:
                delay = max(delay, retry_after)
            delay = min(delay, MAX_BACKOFF_S)
            log.warning(
                "%s %s %s: %s; retry %d/%d in %.2f s",
                what,
                method,
                shown,
                problem,
                attempt + 1,
                retries,
                delay,
            )
            time.sleep(delay)
    raise error(f"{failure} (after {retries} {'retry' if retries == 1 else 'retries'})") from cause


def _transport_problem(e: httpx.TransportError) -> str:
    """'connection refused' and the like, from an httpx transport error."""
    inner: BaseException | None = e
    while inner is not None:
        if isinstance(inner, socket.gaierror):
            return f"cannot resolve the host name ({inner.strerror or inner})"
        if isinstance(inner, OSError) and inner.errno is not None:
            if inner.errno == errno.ECONNREFUSED:
                return "connection refused"
            return f"{os.strerror(inner.errno).lower()} ({type(e).__name__})"
        inner = inner.__cause__ or inner.__context__
    text = str(e)
    if "Connection refused" in text:
        return "connection refused"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _server_message(resp: httpx.Response) -> str:
    """The error text of an OpenAI-style error body ({"error": {"message": ...}}), or the body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body.get("message", body.get("detail", body)))
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(err)
    return str(body)
