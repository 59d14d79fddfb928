"""The commands a user types: `disagg up` then `disagg generate`, and a clean stop on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from disagg.tools.cluster import free_port


@pytest.mark.cluster
def test_up_generate_and_clean_shutdown():
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "disagg", "up", "--model", "distilgpt2", "--load-format", "dummy", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if "cluster ready" in line:
                break
        assert "cluster ready" in lines[-1], "".join(lines)
        assert f"127.0.0.1:{port}" in lines[-1]

        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "disagg",
                "generate",
                "--address",
                f"127.0.0.1:{port}",
                "--max-new-tokens",
                "6",
                "--ignore-eos",
                "Hello there",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()
        summary = out.stderr.strip().splitlines()[-1]
        assert "6 tokens" in summary and "time to first token" in summary and "tokens/s" in summary

        bad = subprocess.run(
            [sys.executable, "-m", "disagg", "generate", "--address", f"127.0.0.1:{port}", ""],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "prompt" in bad.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        rest = up.communicate(timeout=60)[0]
    assert up.returncode == 0, rest
    assert "cluster stopped" in rest
    # Every child is gone: nothing listens on the gateway port any more.
    probe = subprocess.run(
        [sys.executable, "-m", "disagg", "generate", "--address", f"127.0.0.1:{port}", "--timeout", "3", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 1 and "UNAVAILABLE" in probe.stderr
