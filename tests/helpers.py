"""Small builders shared by the tests."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from schemas.tables import PASSAGES
from tasks.text import normalize_text, passage_id

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "passages.jsonl"


def passages(texts: list[str]) -> pa.Table:
    """A passages table as ingest would make it from these texts."""
    rows = [
        {
            "passage_id": passage_id(normalize_text(t)),
            "text": normalize_text(t),
            "title": None,
            "source": "f",
            "row": i,
            "source_id": None,
            "metadata": None,
        }
        for i, t in enumerate(texts)
    ]
    return pa.Table.from_pylist(rows, schema=PASSAGES)


def sample_rows(n: int) -> list[dict]:
    """The first n rows of the bundled sample corpus."""
    with SAMPLE.open() as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (vLLM shuts its engine processes down), then SIGKILL the whole process group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # engine-core/worker children of a killed server


@contextlib.contextmanager
def vllm_server(
    args: list[str], env: dict[str, str], log_path: Path, ready_timeout_s: float
) -> Iterator[tuple[str, str]]:
    """A real vLLM OpenAI-compatible server on 127.0.0.1 with a fresh API key, started with
    `args` (model and mode) in its own process group; yields (base_url, key) once `/models`
    answers, fails the test with the server log's tail if it exits or is not ready in time."""
    import pytest

    port, key = free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--api-key", key]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited ({proc.returncode}): {log_path.read_text()[-3000:]}")
            try:
                req = urllib.request.Request(
                    url + "/models", headers={"Authorization": f"Bearer {key}"}
                )
                urllib.request.urlopen(req, timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    tail = log_path.read_text()[-3000:]
                    pytest.fail(f"vLLM server not ready in {ready_timeout_s} s: {tail}")
                time.sleep(1)
        yield url, key
    finally:
        stop_server(proc)
