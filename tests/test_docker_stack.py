"""The compose stack for real: the image built from the Dockerfile, `up --scale decode=2`, generate, health, metrics.

Runs where a Docker engine answers (`docker info`) and docker-compose exists; skipped with the reason otherwise.
What differs from `docker compose up` as a user runs it, and why:
- Jaeger's image cannot be pulled here (no registry): the `jaeger` service runs tests/docker/otlp_sink.py, an
  OTLP/gRPC receiver, in the project's own image instead; the test checks that spans of all three services arrive.
- Every published port becomes a free loopback port (other stacks may hold 50051, 9464, 4317 on this host).
- The image is built once per content hash of its inputs (`disagg:test-<hash>`) and reused when it exists.
- The base image: $DISAGG_BASE_IMAGE, else a local disagg-base:bookworm or python:3.11-slim, else
  deploy/docker/make-base-image.sh builds disagg-base:bookworm with debootstrap. The wheels come from the host
  (deploy/docker/fetch-wheels.sh) when deploy/docker/wheels/ is empty: pip inside a build cannot reach the index
  here.
- The model is distilgpt2 with --load-format dummy (no hub), the KV transport shared-memory (so decode really
  shares prefill's /dev/shm through `ipc:`), one torch thread per worker.
Everything else (commands, environment, health checks, depends_on, ipc, volumes) is docker-compose.yml's own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]
NEW_TOKENS = 16
BUILD_INPUTS = (
    "Dockerfile",
    "pyproject.toml",
    "README.md",
    "disagg",
    "gateway",
    "prefill_worker",
    "decode_worker",
    "deploy/docker/wheels",
)


def _docker_ready() -> str:
    """Why the test cannot run here ('' when it can)."""
    if not shutil.which("docker"):
        return "no docker client"
    if not shutil.which("docker-compose"):
        return "no docker-compose (apt-get install docker-compose)"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out"
    if info.returncode != 0:
        return "`docker info` fails (no Docker engine running): " + (info.stderr.strip().splitlines() or [""])[-1]
    return ""


def run(*argv: str, timeout: float, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def image_exists(tag: str) -> bool:
    return run("docker", "image", "inspect", tag, timeout=30, check=False).returncode == 0


def base_image(timings: dict) -> str:
    if os.environ.get("DISAGG_BASE_IMAGE"):
        return os.environ["DISAGG_BASE_IMAGE"]
    for tag in ("disagg-base:bookworm", "python:3.11-slim"):
        if image_exists(tag):
            return tag
    if not shutil.which("debootstrap"):
        pytest.skip("no base image (python:3.11-slim, disagg-base:bookworm) and no debootstrap to build one")
    started = time.monotonic()
    run("bash", "deploy/docker/make-base-image.sh", timeout=1200)
    timings["base_image_build_s"] = round(time.monotonic() - started, 1)
    return "disagg-base:bookworm"


def content_hash(base: str) -> str:
    """Of everything the image is built from: the files COPY'd in, the wheels, and the base image's id."""
    digest = hashlib.sha256(run("docker", "image", "inspect", "-f", "{{.Id}}", base, timeout=30).stdout.encode())
    for top in BUILD_INPUTS:
        path = ROOT / top
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" in file.parts:
                continue
            digest.update(str(file.relative_to(ROOT)).encode())
            if file.suffix == ".whl":  # wheels: name and size (hundreds of MB)
                digest.update(str(file.stat().st_size).encode())
            else:
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def image(timings) -> str:
    reason = _docker_ready()
    if reason:
        pytest.skip(reason)
    base = base_image(timings)
    wheels = ROOT / "deploy/docker/wheels"
    if not any(wheels.glob("*.whl")):
        started = time.monotonic()
        run("bash", "deploy/docker/fetch-wheels.sh", timeout=1200, env={**os.environ, "PYTHON": sys.executable})
        timings["fetch_wheels_s"] = round(time.monotonic() - started, 1)
    tag = f"disagg:test-{content_hash(base)}"
    timings["base_image"], timings["image"] = base, tag
    if image_exists(tag):
        timings["image_build_s"] = "cached (same content hash)"
        return tag
    started = time.monotonic()
    run(
        "docker",
        "build",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "-t",
        tag,
        ".",
        timeout=1800,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )  # the builder docker-compose 1.29 uses too
    timings["image_build_s"] = round(time.monotonic() - started, 1)
    # Older test images go (their layers stay as the build cache while a newer image uses them).
    old = run("docker", "images", "-q", "--filter", "reference=disagg:test-*", timeout=60).stdout.split()
    new = run("docker", "image", "inspect", "-f", "{{.Id}}", tag, timeout=30).stdout.strip()
    stale = [i for i in dict.fromkeys(old) if not new.startswith(f"sha256:{i}")]
    if stale:
        run("docker", "rmi", *stale, timeout=300, check=False)
    return tag


@pytest.fixture(scope="module")
def timings(request):
    """Seconds each phase took: printed past pytest's capture, and written to $DISAGG_DOCKER_TIMINGS if set."""
    record: dict = {}
    yield record
    line = "docker stack timings: " + json.dumps(record)
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n" + line, flush=True)
    if os.environ.get("DISAGG_DOCKER_TIMINGS"):
        pathlib.Path(os.environ["DISAGG_DOCKER_TIMINGS"]).write_text(json.dumps(record, indent=1) + "\n")


def stack_file(image: str, directory: pathlib.Path) -> pathlib.Path:
    """docker-compose.yml as `docker-compose config` resolves it, with the changes the module docstring lists."""
    env = {
        "PATH": os.environ["PATH"],
        "DISAGG_MODEL": "distilgpt2",
        "DISAGG_LOAD_FORMAT": "dummy",
        "DISAGG_PREFILL_THREADS": "1",
        "DISAGG_DECODE_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "DISAGG_KV_TRANSPORT": "shared-memory",
    }
    config = yaml.safe_load(run("docker-compose", "-f", "docker-compose.yml", "config", timeout=120, env=env).stdout)
    services = config["services"]
    services["jaeger"] = {
        "image": image,
        "entrypoint": ["python", "/otlp/otlp_sink.py"],
        "volumes": [f"{ROOT / 'tests/docker'}:/otlp:ro"],
    }
    for service in services.values():
        service.pop("build", None)
        service["image"] = image
        service["ports"] = [
            f"127.0.0.1::{p['target'] if isinstance(p, dict) else str(p).split(':')[-1]}"
            for p in service.get("ports", [])
        ]
        service["restart"] = "no"  # a crash must show as a failure, not be retried
    path = directory / "docker-compose.test.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class Stack:
    def __init__(self, path: pathlib.Path):
        self.base = ["docker-compose", "-p", f"disaggtest{os.getpid()}", "-f", str(path)]

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return run(*self.base, *args, timeout=timeout, check=check)

    def containers(self, service: str) -> list[str]:
        return self("ps", "-q", service, timeout=60).stdout.split()

    def port(self, service: str, port: int, index: int = 1) -> str:
        return self("port", "--index", str(index), service, str(port), timeout=60).stdout.strip()


def health_status(container: str) -> str:
    return run(
        "docker",
        "inspect",
        "-f",
        "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
        container,
        timeout=30,
    ).stdout.strip()


def wait_healthy(containers: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = {c: health_status(c) for c in containers}
        if all(s == "running healthy" for s in states.values()):
            return
        if any(s.startswith(("exited", "dead")) for s in states.values()) or time.monotonic() > deadline:
            logs = "\n".join(run("docker", "logs", "--tail", "30", c, timeout=30, check=False).stderr for c in states)
            raise AssertionError(f"containers not healthy: {states}\n{logs}")
        time.sleep(1)


GRPC_HEALTH = (
    "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; "
    "s = g.HealthStub(grpc.insecure_channel('127.0.0.1:{port}')); "
    "print(h.HealthCheckResponse.ServingStatus.Name(s.Check(h.HealthCheckRequest(), timeout=5).status))"
)


def decoded_tokens(address: str) -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    found = re.search(r"^disagg_generation_tokens_total(?:\{[^}]*\})? (\S+)$", text, flags=re.M)
    return float(found.group(1)) if found else 0.0


async def load(address: str, n: int, concurrency: int = 4) -> list:
    from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
    from disagg.rpc.channel import open_channel
    from disagg.tools.client import complete

    async with open_channel(address) as ch:
        stub, gate = gateway_pb2_grpc.GatewayStub(ch), asyncio.Semaphore(concurrency)

        async def one(i: int):
            async with gate:
                request = gateway_pb2.GenerateRequest(
                    prompt=f"request {i}: containers are", ignore_eos=True, max_new_tokens=NEW_TOKENS
                )
                return await complete(stub, request, timeout=120)

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_compose_stack_serves_with_two_decode_replicas(image, timings, tmp_path):
    stack = Stack(stack_file(image, tmp_path))
    try:
        started = time.monotonic()
        stack("up", "-d", "--no-build", "--scale", "decode=2", timeout=900)
        containers = {name: stack.containers(name) for name in ("prefill", "decode", "gateway", "jaeger")}
        assert [len(containers[n]) for n in ("prefill", "decode", "gateway")] == [1, 2, 1], containers
        wait_healthy(containers["prefill"] + containers["decode"] + containers["gateway"], timeout=300)
        timings["stack_up_s"] = round(time.monotonic() - started, 1)
        gateway = stack.port("gateway", 50051)

        # `disagg generate` against the gateway streams text.
        started = time.monotonic()
        generated = run(
            sys.executable,
            "-m",
            "disagg",
            "generate",
            "Containers are",
            "--address",
            gateway,
            "--max-new-tokens",
            str(NEW_TOKENS),
            "--ignore-eos",
            "--wait-ready",
            "60",
            timeout=180,
        )
        timings["first_generate_s"] = round(time.monotonic() - started, 1)
        assert generated.stdout.strip(), generated.stderr
        assert f"[{NEW_TOKENS} tokens, finish=length" in generated.stderr, generated.stderr

        # The three services' gRPC health is SERVING (asked inside each container, decode replicas both).
        for service, port in (("prefill", 50061), ("decode", 50071), ("gateway", 50051)):
            for container in containers[service]:
                status = run("docker", "exec", container, "python", "-c", GRPC_HEALTH.format(port=port), timeout=60)
                assert status.stdout.strip() == "SERVING", (service, container, status.stdout, status.stderr)

        # Both decode replicas take requests: each one's own metrics count decoded tokens.
        completions = asyncio.run(load(gateway, 12))
        assert all(c.finish_reason == "length" and len(c.token_ids) == NEW_TOKENS for c in completions)
        per_replica = {i: decoded_tokens(stack.port("decode", 9464, i)) for i in (1, 2)}
        timings["decoded_tokens_per_replica"] = per_replica
        assert all(tokens > 0 for tokens in per_replica.values()), per_replica

        # Scaled up while running: Docker's DNS answers with the third replica, the gateway re-resolves and sends
        # it requests once it is SERVING.
        started = time.monotonic()
        stack("up", "-d", "--no-build", "--no-recreate", "--scale", "decode=3", timeout=300)
        third = [c for c in stack.containers("decode") if c not in containers["decode"]]
        assert len(third) == 1
        wait_healthy(third, timeout=300)
        healthy_at = time.monotonic()
        index = int(
            run(
                "docker",
                "inspect",
                "-f",
                '{{index .Config.Labels "com.docker.compose.container-number"}}',
                third[0],
                timeout=30,
            ).stdout
        )
        third_metrics = stack.port("decode", 9464, index)
        while decoded_tokens(third_metrics) == 0:
            assert time.monotonic() - healthy_at < 60, "the third decode replica got no request within 60 s"
            asyncio.run(load(gateway, 4))
        timings["third_replica_healthy_s"] = round(healthy_at - started, 1)
        timings["third_replica_first_traffic_after_healthy_s"] = round(time.monotonic() - healthy_at, 1)

        # Traces of all three services reached the OTLP receiver standing in for Jaeger.
        deadline = time.monotonic() + 30
        while True:
            sink_log = run("docker", "logs", containers["jaeger"][0], timeout=30).stdout
            services = set(re.findall(r"^span (\S+) ", sink_log, flags=re.M))
            if {"disagg-gateway", "disagg-prefill", "disagg-decode"} <= services or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert {"disagg-gateway", "disagg-prefill", "disagg-decode"} <= services, sink_log[-2000:]
    finally:
        started = time.monotonic()
        stack("down", "-v", "--remove-orphans", "-t", "20", timeout=300, check=False)
        timings["stack_down_s"] = round(time.monotonic() - started, 1)
