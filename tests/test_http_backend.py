"""The OpenAI-compatible HTTP backend against a real local vLLM server (SmolLM2 on CPU).

One server for the module. A tiny local proxy in front of it answers 503/429 before forwarding
(retries), holds some requests back (so answers arrive out of order), records what passed and
can drop `usage`; nothing here fakes the LLM.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow.parquet as pq
import pytest

from schemas.config import GenerationConfig, LLMConfig
from schemas.llm import query_json_schema
from tasks.generate import generate_queries
from tasks.llm.base import SamplingSettings
from tasks.llm.engine import engine_env
from tasks.llm.openai_http import LLMServerError, OpenAIEngine
from tasks.models import cache_dir, resolve_llm_path
from tests.helpers import free_port, passages, sample_rows, vllm_server, write_jsonl

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
KEY_ENV = "TRIPLETFORGE_TEST_LLM_KEY"
SCHEMA = query_json_schema(120)
GREEDY = SamplingSettings(max_tokens=48, temperature=0.0, top_p=1.0)
# Server start took ~30 s on an idle machine and ~110 s beside another vLLM run.
READY_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A real vLLM OpenAI-compatible server on 127.0.0.1, with an API key: (base_url, key)."""
    env = dict(os.environ)
    env.update(engine_env(LLMConfig(kv_cache_gib=1), str(cache_dir()), os.cpu_count() or 1))
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--model", str(resolve_llm_path(None)), "--served-model-name", MODEL]
    args += ["--max-model-len", "2048", "--dtype", "bfloat16"]
    args += ["--no-enable-chunked-prefill"]  # see VLLMEngine: seeded sampling + chunks crash
    with vllm_server(args, env, log_path, READY_TIMEOUT_S) as served:
        yield served


@pytest.fixture
def cfg(server: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> LLMConfig:
    url, key = server
    monkeypatch.setenv(KEY_ENV, key)
    return LLMConfig(backend="openai", base_url=url, model_name=MODEL, api_key_env=KEY_ENV)


def conversations(topics: list[str]) -> list[list[dict[str, str]]]:
    return [
        [
            {"role": "system", "content": 'Reply with JSON only: {"query": "..."}.'},
            {"role": "user", "content": f"Write a short search query about: {t}"},
        ]
        for t in topics
    ]


# --- a small proxy in front of the real server ---------------------------------------------------


class Proxy(http.server.ThreadingHTTPServer):
    """Forwards to the real server. The first `failures` requests get `fail_status` instead
    (with `Retry-After`, or quoting the request's Authorization header, if asked);
    `delay(body)` holds a request back before forwarding; `strip_usage` drops `usage` from
    replies. Records requests seen, the most in flight at once, and (request, reply) pairs in
    the order replies were sent."""

    daemon_threads = True

    def __init__(
        self,
        target: str,
        *,
        failures: int = 0,
        fail_status: int = 503,
        retry_after: str | None = None,
        echo_auth: bool = False,
        delay: Callable[[dict[str, Any]], float] | None = None,
        strip_usage: bool = False,
    ) -> None:
        self.target, self.failures, self.fail_status = target, failures, fail_status
        self.retry_after, self.echo_auth = retry_after, echo_auth
        self.delay, self.strip_usage = delay, strip_usage
        self.seen = self.in_flight = self.max_in_flight = 0
        self.exchanges: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: Proxy

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def _reply(self, status: int, data: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        proxy = self.server
        with proxy.lock:
            proxy.seen += 1
            fail = proxy.seen <= proxy.failures
            proxy.in_flight += 1
            proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
        try:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            if fail:
                extra = {"Retry-After": proxy.retry_after} if proxy.retry_after else None
                message = "overloaded"
                if proxy.echo_auth:  # a careless server that quotes the request's headers
                    message = f"bad request from {self.headers.get('Authorization')}"
                self._reply(
                    proxy.fail_status, json.dumps({"error": {"message": message}}).encode(), extra
                )
                return
            request = json.loads(body) if body else {}
            if proxy.delay:
                time.sleep(proxy.delay(request))
            req = urllib.request.Request(
                proxy.target + self.path.removeprefix("/v1"),
                data=body,
                method=self.command,
                headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
            )
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    status, data = resp.status, resp.read()
            except urllib.error.HTTPError as e:
                status, data = e.code, e.read()
            reply = json.loads(data)
            if proxy.strip_usage and isinstance(reply, dict):
                reply.pop("usage", None)
                data = json.dumps(reply).encode()
            with proxy.lock:
                proxy.exchanges.append((request, reply))
            self._reply(status, data)
        finally:
            with proxy.lock:
                proxy.in_flight -= 1

    do_GET = do_POST = _handle


# --- the tests -----------------------------------------------------------------------------------


def test_structured_output_concurrent_and_in_input_order(cfg: LLMConfig) -> None:
    topics = ["heap queues", "TCP sockets", "regular expressions", "unicode strings", "git"]
    convs = conversations(topics)
    proxy: Proxy

    def hold_first_two(request: dict[str, Any]) -> float:
        """The first two conversations are forwarded only once the other three have answers."""
        if any(t in json.dumps(request.get("messages")) for t in topics[:2]):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with proxy.lock:
                    if sum("messages" in req for req, _ in proxy.exchanges) >= 3:
                        break
                time.sleep(0.05)
        return 0.0

    with Proxy(cfg.base_url or "", delay=hold_first_two) as proxy:
        engine = OpenAIEngine(cfg.model_copy(update={"base_url": proxy.url, "concurrency": 4}))
        out = engine.chat_json(convs, SCHEMA, GREEDY, [1, 2, 3, 4, 5])
        engine.close()
    assert len(out) == len(convs)
    chats = [(req, rep) for req, rep in proxy.exchanges if "messages" in req]
    assert proxy.max_in_flight > 1  # the thread pool really sends several at once
    answered = [req["messages"] for req, _ in chats]
    assert sorted(map(json.dumps, answered[-2:])) == sorted(map(json.dumps, convs[:2]))
    # the server's answers came back out of order ...
    by_request = {json.dumps(req["messages"]): rep for req, rep in chats}
    for conv, completion in zip(convs, out, strict=True):
        reply = by_request[json.dumps(conv)]  # ... and each lands at its conversation's place
        assert completion.text == reply["choices"][0]["message"]["content"]
        assert completion.output_tokens == reply["usage"]["completion_tokens"] > 0
        assert completion.finish_reason == "stop"
        obj = json.loads(completion.text)
        assert set(obj) == {"query"} and obj["query"].strip()
    # what was sent: the OpenAI fields, the seed and the schema as response_format
    sent = chats[0][0]
    assert sent["model"] == MODEL and sent["max_tokens"] == 48 and sent["seed"] in {1, 2, 3, 4, 5}
    assert sent["response_format"]["json_schema"]["schema"] == SCHEMA


def test_max_tokens_cut_reports_length(cfg: LLMConfig) -> None:
    with OpenAIEngine(cfg, check=False) as engine:
        cut = SamplingSettings(max_tokens=4, temperature=0.0, top_p=1.0)
        [out] = engine.chat_json(conversations(["heaps"]), SCHEMA, cut, [1])
    assert out.finish_reason == "length" and out.output_tokens == 4
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_a_seed_makes_sampling_repeatable(cfg: LLMConfig) -> None:
    # concurrency 1: on CPU a request decoded alone and one decoded beside others can diverge
    # after a few tokens, so only an unchanged batching repeats exactly.
    sampled = SamplingSettings(max_tokens=48, temperature=0.7, top_p=1.0)
    convs = conversations(["python dictionaries"] * 4)
    seeds = [7, 8, 7, 9]
    with OpenAIEngine(cfg.model_copy(update={"concurrency": 1})) as engine:
        # the server's prefix cache then holds the prompt for every request below (see
        # tests/test_engine.py: a cached prefix can change a near-tie token)
        engine.chat_json(convs[:1], SCHEMA, sampled, [0])
        a = engine.chat_json(convs, SCHEMA, sampled, seeds)
        b = engine.chat_json(convs, SCHEMA, sampled, seeds)
    assert [c.text for c in a] == [c.text for c in b]
    assert a[0].text == a[2].text
    assert len({c.text for c in a}) > 1  # the seed is used: other seeds, other samples


def test_retries_5xx_with_backoff_then_succeeds(
    cfg: LLMConfig, caplog: pytest.LogCaptureFixture
) -> None:
    key = os.environ[KEY_ENV]
    with Proxy(cfg.base_url or "", failures=2) as proxy:
        engine = OpenAIEngine(
            cfg.model_copy(update={"base_url": proxy.url, "concurrency": 1}),
            check=False,
            backoff_s=0.05,
        )
        with caplog.at_level(logging.DEBUG):
            [out] = engine.chat_json(conversations(["heaps"]), SCHEMA, GREEDY, [1])
        assert json.loads(out.text)["query"]
        assert engine.attempts == 3 and proxy.seen == 3
        assert "503" in caplog.text and "retry 2/3" in caplog.text
        assert key not in caplog.text
        # more failures than retries: a clear error naming the URL and what it answered
        proxy.seen, proxy.failures = 0, 10
        engine = OpenAIEngine(
            cfg.model_copy(update={"base_url": proxy.url, "max_retries": 2}),
            check=False,
            backoff_s=0.01,
        )
        with pytest.raises(LLMServerError) as err:
            engine.chat_json(conversations(["heaps"]), SCHEMA, GREEDY, [1])
        assert f"{proxy.url}/chat/completions answered 503: overloaded (after 2 retries)" in str(
            err.value
        )
        assert proxy.seen == 3


def test_429_waits_for_retry_after(cfg: LLMConfig) -> None:
    with Proxy(cfg.base_url or "", failures=1, fail_status=429, retry_after="0.5") as proxy:
        engine = OpenAIEngine(
            cfg.model_copy(update={"base_url": proxy.url}), check=False, backoff_s=0.01
        )
        start = time.monotonic()
        [out] = engine.chat_json(conversations(["sets"]), SCHEMA, GREEDY, [1])
        assert time.monotonic() - start >= 0.5
        assert out.text and proxy.seen == 2


def test_other_4xx_fail_at_once_with_the_servers_message(cfg: LLMConfig) -> None:
    engine = OpenAIEngine(cfg, check=False)
    too_long = SamplingSettings(max_tokens=5000, temperature=0.0, top_p=1.0)
    with pytest.raises(LLMServerError, match=r"answered 400: max_tokens=5000 .*max_model_len"):
        engine.chat_json(conversations(["heaps"]), SCHEMA, too_long, [1])
    assert engine.attempts == 1  # not retried


def test_missing_usage_falls_back_to_an_estimate(cfg: LLMConfig) -> None:
    with Proxy(cfg.base_url or "", strip_usage=True) as proxy:
        engine = OpenAIEngine(cfg.model_copy(update={"base_url": proxy.url}))
        [out] = engine.chat_json(conversations(["heaps"]), SCHEMA, GREEDY, [1])
    assert "usage" not in proxy.exchanges[-1][1]
    assert 0 < out.output_tokens <= len(out.text)


def test_unreachable_server_fails_fast_and_clearly() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    cfg = LLMConfig(backend="openai", base_url=url, max_retries=1)
    start = time.monotonic()
    with pytest.raises(LLMServerError) as err:
        OpenAIEngine(cfg, backoff_s=0.05)
    assert time.monotonic() - start < 10
    assert str(err.value) == (
        f"cannot reach the LLM server at {url}/models: connection refused (after 1 retry)"
    )


def test_wrong_model_lists_what_is_served(cfg: LLMConfig) -> None:
    with pytest.raises(LLMServerError, match=rf"does not serve 'no-such-model'.*\['{MODEL}'\]"):
        OpenAIEngine(cfg.model_copy(update={"model_name": "no-such-model"}))


def test_a_wrong_or_missing_key_names_the_variable_and_never_shows_the_key(
    cfg: LLMConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "sk-" + secrets.token_hex(8)
    monkeypatch.setenv(KEY_ENV, wrong)
    with caplog.at_level(logging.DEBUG), pytest.raises(LLMServerError) as err:
        OpenAIEngine(cfg)
    text = "".join(traceback.format_exception(err.value))
    assert f"refused the API key (401): the environment variable {KEY_ENV}" in str(err.value)
    assert wrong not in text and wrong not in caplog.text
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(LLMServerError, match=rf"none was sent: .*{KEY_ENV} is not set"):
        OpenAIEngine(cfg)


def test_a_server_quoting_the_key_does_not_leak_it(cfg: LLMConfig) -> None:
    key = os.environ[KEY_ENV]
    with Proxy(cfg.base_url or "", failures=1, fail_status=400, echo_auth=True) as proxy:
        engine = OpenAIEngine(cfg.model_copy(update={"base_url": proxy.url}), check=False)
        with pytest.raises(LLMServerError) as err:
            engine.chat_json(conversations(["heaps"]), SCHEMA, GREEDY, [1])
    assert "answered 400: bad request from Bearer ***" in str(err.value)
    assert key not in str(err.value)
    assert proxy.seen == 1  # a 400 is not retried


def test_the_key_is_not_in_repr_or_logs(cfg: LLMConfig, caplog: pytest.LogCaptureFixture) -> None:
    key = os.environ[KEY_ENV]
    with caplog.at_level(logging.DEBUG):
        engine = OpenAIEngine(cfg)
        engine.chat_json(conversations(["sets"]), SCHEMA, GREEDY, [1])
        engine.close()
    assert caplog.records  # there was logging to look at (ours and httpx's)
    assert key not in repr(engine) and key not in str(engine) and key not in caplog.text
    assert KEY_ENV in repr(engine)


def test_the_generation_stage_runs_on_the_http_backend(cfg: LLMConfig) -> None:
    table = passages([r["text"] for r in sample_rows(3)])
    gen = GenerationConfig(styles={"question": 1, "keywords": 1})
    with OpenAIEngine(cfg) as engine:
        queries, rejects, stats = generate_queries(table, gen, engine)
    assert stats["requests"] == 6 == queries.num_rows + rejects.num_rows
    assert queries.num_rows >= 3
    assert set(queries["backend"].to_pylist()) == {"openai"}
    assert set(queries["model"].to_pylist()) == {MODEL}
    assert all(n > 0 for n in queries["output_tokens"].to_pylist())


def test_the_cli_runs_every_llm_stage_over_http(cfg: LLMConfig, tmp_path: Any) -> None:
    """`tripletforge run` in its own process (own Ray and Prefect), as a user runs it against a
    server: the key comes from the environment the run is started in, and is written nowhere.
    No local LLM is looked for, the judge's included: the run's model cache is empty."""
    import yaml

    corpus = write_jsonl(tmp_path / "c.jsonl", sample_rows(12))
    config = tmp_path / "run.yaml"
    llm = {k: v for k, v in cfg.model_dump().items() if k in ("backend", "base_url", "model_name")}
    config.write_text(
        yaml.safe_dump(
            {
                "name": "http",
                "input": {"paths": [str(corpus)], "title_column": "title"},
                "llm": {**llm, "api_key_env": KEY_ENV},
                "generation": {"max_passages": 4, "negative_levels": [1]},
                "judge": {"enabled": True, "scope": "all", "max_per_query": 2},
                "mining": {"num_negatives": 2, "max_rank": 8},
                "output": {"dir": str(tmp_path / "runs")},
                "runtime": {"num_cpus": 1},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_ADDRESS"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    env["TRIPLETFORGE_CACHE"] = str(tmp_path / "empty-model-cache")  # SmolLM2 is not prepared here
    cli = os.path.join(os.path.dirname(sys.executable), "tripletforge")
    done = subprocess.run(
        [cli, "run", "--config", str(config)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (tmp_path / "empty-model-cache" / "models").exists()
    key = os.environ[KEY_ENV]
    assert key not in done.stdout + done.stderr
    run_dir = next((tmp_path / "runs").glob("http-*"))
    text = (run_dir / "manifest.json").read_text()
    assert key not in text
    doc = json.loads(text)
    assert doc["models"]["llm"] == {"name": MODEL, "backend": "openai", "used": True}
    assert doc["stages"]["generate"]["rows_in"] == 4
    kept = doc["stages"]["generate"]["rows_out"] - doc["stages"]["query_dedup"]["deduplicated"]
    assert doc["stages"]["generate_passages"]["rows_in"] == kept
    assert doc["stages"]["mine"]["extra"]["judge"]["judged"] > 0
    written = pq.read_table(run_dir / "generated").to_pylist()
    assert {w["backend"] for w in written} <= {"openai"}
