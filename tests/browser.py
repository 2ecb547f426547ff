"""A headless Chromium for tests that look at the HTML the pipeline writes.

`find_chromium()` returns the path of a Chromium-like browser on PATH (`chromium`,
`chromium-browser`, `google-chrome`). When there is none and the process runs as root (CI: a
fresh Debian machine), `ensure_chromium()` installs Debian's `chromium` package with apt-get
once and returns it; otherwise it returns None with the reason, and the test skips.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
INSTALL_TIMEOUT_S = 900


def find_chromium() -> str | None:
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def install_chromium() -> tuple[str | None, str]:
    """apt-get install Debian's chromium (root only); returns (path or None, what happened)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None, "no chromium on PATH and not root, so it cannot be installed with apt-get"
    if shutil.which("apt-get") is None:
        return None, "no chromium on PATH and no apt-get to install it with"
    env = {**os.environ, **APT_ENV}
    started = time.monotonic()
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
    ):
        try:
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return None, f"`{' '.join(cmd)}` ran past {INSTALL_TIMEOUT_S} s"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return None, f"`{' '.join(cmd)}` failed ({done.returncode}): {' | '.join(tail)}"
    path = find_chromium()
    seconds = time.monotonic() - started
    if path is None:
        return None, "apt-get installed chromium but no chromium binary is on PATH"
    log.warning("installed chromium with apt-get in %.0f s", seconds)
    return path, f"installed with apt-get in {seconds:.0f} s"


def ensure_chromium() -> tuple[str | None, str]:
    """(path, how it was found) or (None, why there is none)."""
    path = find_chromium()
    if path:
        return path, "found on PATH"
    return install_chromium()


def chromium_args(chromium: str, profile: Path) -> list[str]:
    """The flags every headless call uses: no sandbox (root in a container), no GPU, no network
    side channels, a throwaway profile."""
    return [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def screenshot(
    chromium: str, page: Path, png: Path, size: tuple[int, int] = (1280, 4000), timeout=120
) -> subprocess.CompletedProcess:
    """Render `page` (a local file) to `png` at `size` (width, height)."""
    with tempfile.TemporaryDirectory() as profile:
        args = chromium_args(chromium, Path(profile)) + [
            f"--screenshot={png}",
            f"--window-size={size[0]},{size[1]}",
            page.resolve().as_uri(),
        ]
        return _run(args, timeout)


def dump_dom(chromium: str, page: Path, timeout=120) -> str:
    """The DOM after load (scripts run) of a local file, serialized."""
    with tempfile.TemporaryDirectory() as profile:
        args = chromium_args(chromium, Path(profile)) + [
            "--virtual-time-budget=5000",  # let onload handlers run before the dump
            "--dump-dom",
            page.resolve().as_uri(),
        ]
        done = _run(args, timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium --dump-dom failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout
