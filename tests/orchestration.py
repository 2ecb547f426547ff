"""Real Ray clusters and a real Prefect server, started and stopped by the tests that use them.

Each cluster node is a `ray start --block` process in a process group of its own, so stopping
the test's cluster never touches another Ray on the machine (`ray stop` would stop them all).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import ROOT

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "PREFECT_API"))}
    env.update(
        RAY_AUTH_MODE="disabled",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        PATH=f"{BIN}:{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(check, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(poll)


@contextlib.contextmanager
def ray_cluster(
    tmp: Path, workers: int = 0, cpus: int = 1, hide_in_workers: Path | None = None
) -> Iterator[dict[str, str]]:
    """A head node (and `workers` worker nodes) on this machine: {"address", "dashboard"}.
    `hide_in_workers`: a folder the worker nodes do not see (a tmpfs mounted over it in their
    own mount namespace), as a node without the shared file system would."""
    port, dash = free_port(), free_port()
    logs = tmp / "ray-logs"
    logs.mkdir(exist_ok=True)
    procs = []
    head = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--num-cpus={cpus}"]
    head += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true"]
    head += agent_ports()
    try:
        procs.append(_spawn(head, logs / "head.log"))
        address = f"127.0.0.1:{port}"
        wait_for(lambda: _status(address), 90, "the Ray head")
        for i in range(workers):
            cmd = [
                str(BIN / "ray"),
                "start",
                "--block",
                f"--address={address}",
                f"--num-cpus={cpus}",
                *agent_ports(),
            ]
            if hide_in_workers is not None:
                hidden = " ".join(cmd)
                cmd = ["unshare", "--mount", "sh", "-c",
                       f"mount -t tmpfs tmpfs {hide_in_workers} && exec {hidden}"]  # fmt: skip
            procs.append(_spawn(cmd, logs / f"worker-{i}.log"))
        wait_for(lambda: _status(address, nodes=1 + workers), 90, f"{workers} worker node(s)")
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        for proc in reversed(procs):
            stop(proc)
        # `ray stop` would remove the head's address file; a bare ray.init() would join it
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def agent_ports() -> list[str]:
    """Free ports for a node's dashboard agent: its default HTTP port (52365) is taken by any
    other Ray on the machine (a local ray.init, another test's cluster), and a node whose agent
    cannot bind answers every `ray job submit` with "No available agent"."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        env=quiet_env(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _status(address: str, nodes: int = 1) -> bool:
    done = subprocess.run(
        [str(BIN / "ray"), "status", f"--address={address}"],
        env=quiet_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode == 0 and done.stdout.count("node_") >= nodes


@contextlib.contextmanager
def prefect_server(tmp: Path) -> Iterator[dict[str, str]]:
    """A Prefect server on 127.0.0.1 with its own database; the env to talk to it."""
    port = free_port()
    env = quiet_env(PREFECT_HOME=str(tmp / "prefect-home"))
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    log = tmp / "prefect-server.log"
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def healthy() -> bool:
            import urllib.request

            try:
                return (
                    urllib.request.urlopen(env["PREFECT_API_URL"] + "/health", timeout=2).read()
                    == b"true"
                )
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(log.read_text()[-2000:]) from None
                return False

        wait_for(healthy, 90, "the Prefect server")
        yield env
    finally:
        stop(proc)
