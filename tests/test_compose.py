"""docker-compose.yml, checked offline: `docker-compose config` accepts it, and it wires what the tracing needs."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPONENTS = ("gateway", "prefill", "decode")
OTLP = "http://jaeger:4317"


@pytest.fixture(scope="module")
def compose() -> dict:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is missing: scripts/install.sh installs it (apt-get install docker-compose)"
    result = subprocess.run(
        [exe, "-f", "docker-compose.yml", "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _published(service: dict) -> dict[int, int]:
    """{container port: host port}, from the short ("9465:9464") or long form `config` writes."""
    ports = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports[int(port["target"])] = int(port["published"])
        else:
            host, _, container = str(port).rpartition(":")
            ports[int(container)] = int(host)
    return ports


def test_services(compose):
    assert set(compose["services"]) == {"jaeger", *COMPONENTS}
    jaeger = compose["services"]["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert not jaeger["image"].endswith(":latest")
    assert {4317: 4317, 16686: 16686}.items() <= _published(jaeger).items()


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_runs_from_the_repo_image_and_exports_to_jaeger(compose, name):
    service = compose["services"][name]
    assert pathlib.Path(service["build"]["context"]).resolve() == ROOT
    assert service["command"][0] == name
    env = service["environment"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == OTLP
    assert env["OTEL_SERVICE_NAME"] == f"disagg-{name}"
    assert "OTEL_SDK_DISABLED" not in env
    assert service["depends_on"]["jaeger"]["condition"] == "service_started"
    metrics_port = int(_flag(service["command"], "--metrics-port"))
    assert metrics_port in _published(service)
    assert _flag(service["command"], "--host") == "0.0.0.0"


def test_gateway_reaches_healthy_workers(compose):
    services = compose["services"]
    gateway = services["gateway"]
    for worker in ("prefill", "decode"):
        port = _flag(services[worker]["command"], "--port")
        assert _flag(gateway["command"], f"--{worker}") == f"{worker}:{port}"
        assert gateway["depends_on"][worker]["condition"] == "service_healthy"
        assert f"127.0.0.1:{port}" in " ".join(services[worker]["healthcheck"]["test"])
    assert 50051 in _published(gateway) and _flag(gateway["command"], "--port") == "50051"


def test_dockerfile_builds_the_cli_image():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install torch==[\d.]+ --index-url https://download.pytorch.org/whl/cpu", text)
    assert 'ENTRYPOINT ["disagg"]' in text
    for source in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which the repository lacks"
