"""The OpenAI-compatible HTTP backend against a real local vLLM server (SmolLM2 on CPU).

A tiny proxy that answers 503 before forwarding tests the retries; nothing here fakes the LLM.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pyarrow.parquet as pq
import pytest

from schemas.config import GenerationConfig, LLMConfig
from schemas.llm import query_json_schema
from tasks.generate import SamplingSettings, engine_env, generate_queries
from tasks.llm_http import LLMServerError, OpenAIEngine
from tasks.models import cache_dir, resolve_llm_path
from tests.helpers import passages, sample_rows, write_jsonl

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
KEY_ENV = "TRIPLETFORGE_TEST_LLM_KEY"
SCHEMA = query_json_schema(120)
SAMPLING = SamplingSettings(max_tokens=48, temperature=0.0, top_p=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real vLLM OpenAI-compatible server on 127.0.0.1, with an API key."""
    port, key = free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    env.update(engine_env(LLMConfig(), str(cache_dir()), os.cpu_count() or 1))
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(resolve_llm_path(None)),
        "--served-model-name",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--max-model-len",
        "2048",
        "--dtype",
        "bfloat16",
        "--no-enable-chunked-prefill",  # see VLLMEngine: seeded sampling + chunks crash on CPU
        "--api-key",
        key,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited: {log.read_text()[-3000:]}")
            try:
                req = urllib.request.Request(
                    url + "/models", headers={"Authorization": f"Bearer {key}"}
                )
                urllib.request.urlopen(req, timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vLLM server not ready in 240 s: {log.read_text()[-3000:]}")
                time.sleep(1)
        yield url, key
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def cfg(server, monkeypatch):
    url, key = server
    monkeypatch.setenv(KEY_ENV, key)
    return LLMConfig(backend="openai", base_url=url, model_name=MODEL, api_key_env=KEY_ENV)


def conversations(texts: list[str]) -> list[list[dict[str, str]]]:
    return [
        [
            {"role": "system", "content": 'Reply with JSON only: {"query": "..."}.'},
            {"role": "user", "content": f"Write a short search query about: {t}"},
        ]
        for t in texts
    ]


def test_structured_output_in_input_order(cfg):
    engine = OpenAIEngine(cfg)
    topics = ["heap queues", "TCP sockets", "regular expressions", "unicode strings"]
    out = engine.chat_json(conversations(topics), SCHEMA, SAMPLING, [1, 2, 3, 4])
    engine.close()
    assert len(out) == 4
    for completion in out:
        obj = json.loads(completion.text)
        assert set(obj) == {"query"} and obj["query"].strip()
        assert completion.output_tokens > 0 and completion.finish_reason == "stop"
    # order: asking for one alone gives the same answer as its place in the batch (greedy)
    single = OpenAIEngine(cfg).chat_json(conversations(topics[2:3]), SCHEMA, SAMPLING, [3])
    assert single[0].text == out[2].text


def test_a_seed_makes_sampling_repeatable(cfg):
    engine = OpenAIEngine(cfg)
    sampled = SamplingSettings(max_tokens=48, temperature=1.0, top_p=1.0)
    convs = conversations(["python dictionaries"] * 3)
    a = engine.chat_json(convs, SCHEMA, sampled, [7, 7, 8])
    b = engine.chat_json(convs, SCHEMA, sampled, [7, 7, 8])
    assert [c.text for c in a] == [c.text for c in b]
    assert a[0].text == a[1].text


class FlakyProxy(http.server.ThreadingHTTPServer):
    """Answers 503 to the first `failures` requests, then forwards to the real server."""

    def __init__(self, target: str, failures: int):
        self.target, self.failures, self.seen = target, failures, 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: FlakyProxy

    def log_message(self, *args):  # keep test output clean
        pass

    def _handle(self) -> None:
        with self.server.lock:
            self.server.seen += 1
            fail = self.server.seen <= self.server.failures
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        if fail:
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "overloaded"}}')
            return
        path = self.path.removeprefix("/v1")
        req = urllib.request.Request(
            self.server.target + path,
            data=body,
            method=self.command,
            headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            data = resp.read()
            self.send_response(resp.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    do_GET = do_POST = _handle


def test_retries_5xx_with_backoff_then_succeeds(cfg, caplog):
    proxy = FlakyProxy(cfg.base_url, failures=2)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{proxy.server_address[1]}/v1"
        engine = OpenAIEngine(
            cfg.model_copy(update={"base_url": url, "concurrency": 1}), check=False, backoff_s=0.05
        )
        with caplog.at_level(logging.WARNING):
            out = engine.chat_json(conversations(["heaps"]), SCHEMA, SAMPLING, [1])
        assert json.loads(out[0].text)["query"]
        assert engine.attempts == 3 and proxy.seen == 3
        assert "503" in caplog.text
        # more failures than retries: a clear error
        proxy.seen, proxy.failures = 0, 10
        engine = OpenAIEngine(
            cfg.model_copy(update={"base_url": url, "max_retries": 2}), check=False, backoff_s=0.01
        )
        with pytest.raises(LLMServerError, match=r"503.*after 2 retries"):
            engine.chat_json(conversations(["heaps"]), SCHEMA, SAMPLING, [1])
    finally:
        proxy.shutdown()


def test_unreachable_server_fails_fast_and_clearly():
    cfg = LLMConfig(backend="openai", base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1)
    start = time.monotonic()
    with pytest.raises(LLMServerError, match="cannot use the LLM server at .*cannot connect"):
        OpenAIEngine(cfg, backoff_s=0.05)
    assert time.monotonic() - start < 10


def test_wrong_model_lists_what_is_served(cfg):
    with pytest.raises(LLMServerError, match=rf"does not serve 'no-such-model'.*{MODEL}"):
        OpenAIEngine(cfg.model_copy(update={"model_name": "no-such-model"}))


def test_a_wrong_key_names_the_variable_and_never_shows_the_key(cfg, monkeypatch, caplog):
    wrong = "sk-" + secrets.token_hex(8)
    monkeypatch.setenv(KEY_ENV, wrong)
    with caplog.at_level(logging.DEBUG), pytest.raises(LLMServerError) as err:
        OpenAIEngine(cfg)
    assert KEY_ENV in str(err.value) and "401" in str(err.value)
    assert wrong not in str(err.value) and wrong not in caplog.text
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(LLMServerError, match=KEY_ENV):
        OpenAIEngine(cfg)


def test_the_key_is_not_in_repr_or_logs(cfg, caplog):
    key = os.environ[KEY_ENV]
    with caplog.at_level(logging.DEBUG):
        engine = OpenAIEngine(cfg)
        engine.chat_json(conversations(["sets"]), SCHEMA, SAMPLING, [1])
    assert key not in repr(engine) and key not in caplog.text


def test_the_generation_stage_runs_on_the_http_backend(cfg):
    table = passages([r["text"] for r in sample_rows(4)])
    gen = GenerationConfig(styles={"question": 1, "keywords": 1})
    engine = OpenAIEngine(cfg)
    queries, rejects, stats = generate_queries(table, gen, engine)
    assert stats["requests"] == 8 == queries.num_rows + rejects.num_rows
    assert queries.num_rows >= 4
    assert set(queries["backend"].to_pylist()) == {"openai"}
    assert set(queries["model"].to_pylist()) == {MODEL}


def test_the_cli_runs_every_llm_stage_over_http(cfg, tmp_path):
    """`tripletforge run` in its own process (own Ray and Prefect), as a user runs it against a
    server: the key comes from the environment the run is started in, and is written nowhere."""
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
    cli = os.path.join(os.path.dirname(sys.executable), "tripletforge")
    done = subprocess.run(
        [cli, "run", "--config", str(config)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    key = os.environ[KEY_ENV]
    assert key not in done.stdout + done.stderr
    run_dir = next((tmp_path / "runs").glob("http-*"))
    text = (run_dir / "manifest.json").read_text()
    assert key not in text
    doc = json.loads(text)
    assert doc["models"]["llm"] == {"name": MODEL, "backend": "openai"}
    assert doc["stages"]["generate"]["rows_in"] == 4
    assert doc["stages"]["generate_passages"]["rows_in"] == doc["stages"]["generate"]["rows_out"]
    assert doc["stages"]["mine"]["extra"]["judge"]["judged"] > 0
    written = pq.read_table(run_dir / "generated").to_pylist()
    assert {w["backend"] for w in written} <= {"openai"}
