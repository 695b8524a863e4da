"""Headless chromium for the HTML tests (report.html, the batch's index.html); they skip where it is missing."""

import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs Debian's "
                                                              "chromium)")


def chromium(url: str, profile, *args: str) -> subprocess.CompletedProcess:
    """Open ``url`` in headless chromium (no network, no first-run work) with ``args`` (--screenshot=...,
    --dump-dom); stderr carries the page's console messages and CSP refusals."""
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, url],
                          capture_output=True, text=True, timeout=120)


def console_problems(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "CONSOLE" in ln or "Refused to" in ln or "Uncaught" in ln]
