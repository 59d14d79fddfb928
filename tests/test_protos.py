"""The contract: generated stubs are fresh, protos pass buf lint, and generic clients work through reflection."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    committed = ROOT / "disagg" / "pb"
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated == sorted(
        p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    for rel in generated:
        assert (tmp_path / rel).read_text() == (committed / rel).read_text(), (
            f"disagg/pb/{rel} is stale: run python scripts/gen_protos.py"
        )


def test_buf_lint():
    assert BUF.exists(), "buf is installed by scripts/install.sh (npm @bufbuild/buf)"
    result = subprocess.run([str(BUF), "lint"], cwd=ROOT / "protos", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_curl_calls_gateway_through_reflection(gpt2_cluster):
    """A generic client with no project code: reflection gives it the schema, health says SERVING."""
    base = f"http://{gpt2_cluster.address}"
    flags = ["--protocol", "grpc", "--http2-prior-knowledge"]
    health = subprocess.run(
        [str(BUF), "curl", *flags, f"{base}/grpc.health.v1.Health/Check"], capture_output=True, text=True, timeout=60
    )
    assert json.loads(health.stdout)["status"] == "SERVING", health.stderr
    out = subprocess.run(
        [
            str(BUF),
            "curl",
            *flags,
            "-d",
            json.dumps({"prompt": "Hello", "maxNewTokens": 3, "ignoreEos": True}),
            f"{base}/disagg.v1.Gateway/Generate",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    messages = [json.loads(m) for m in out.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert sum(len(m.get("tokenIds", [])) for m in messages) == 3
    assert messages[-1]["finishReason"] == "length"
    for address in (c.address for c in gpt2_cluster.cluster.prefill + gpt2_cluster.cluster.decode):
        listed = subprocess.run(
            [str(BUF), "curl", *flags, "--list-services", f"http://{address}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "grpc.health.v1.Health" in listed.stdout and "disagg.v1." in listed.stdout, listed.stderr
