"""docker-compose.yml, checked offline: `docker-compose config` accepts it, and it wires what the tracing needs."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from disagg import config as cfg
from tests.processes import flags_as_started

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPONENTS = ("gateway", "prefill", "decode")
OTLP = "http://jaeger:4317"


def _config(**variables: str) -> dict:
    """`docker-compose config` with only these variables set (besides PATH)."""
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is missing: scripts/install.sh installs it (apt-get install docker-compose)"
    result = subprocess.run(
        [exe, "-f", "docker-compose.yml", "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", **variables},
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _config()


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _published(service: dict) -> dict[int, int]:
    """{container port: host port (0: a free one per replica)}, from the short ("127.0.0.1::9464/tcp",
    "9465:9464") or long form `config` writes."""
    ports = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports[int(port["target"])] = int(port.get("published") or 0)
        else:
            host, _, container = str(port).rpartition(":")
            host_port = host.rpartition(":")[2] if host.count(":") else host
            ports[int(container.split("/")[0])] = int(host_port or 0)
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
    assert service["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim"  # DISAGG_BASE_IMAGE overrides it
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
    assert "127.0.0.1:50051" in " ".join(gateway["healthcheck"]["test"])


@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_workers_scale(compose, name):
    """`--scale` needs no fixed host port (each replica gets a free one) and no container_name; the gateway's
    address is the service name, which Docker's DNS answers with every replica."""
    service = compose["services"][name]
    assert _published(service) == {9464: 0}
    assert "container_name" not in service
    assert _flag(compose["services"]["gateway"]["command"], f"--{name}").split(":")[0] == name


def test_shared_memory_transport_can_be_chosen(compose):
    services = compose["services"]
    assert services["prefill"]["ipc"] == "shareable"
    assert services["decode"]["ipc"] == "service:prefill"
    assert services["prefill"]["shm_size"]  # Docker's default /dev/shm (64 MB) is too small for KV caches


def test_dockerfile_builds_the_cli_image():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install torch==[\d.]+ --index-url https://download.pytorch.org/whl/cpu", text)
    assert 'ENTRYPOINT ["disagg"]' in text
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, flags=re.M)
    assert len(re.findall(r"^FROM \$\{BASE_IMAGE\}", text, flags=re.M)) == 2  # build stage and runtime stage
    for source in re.findall(r"^COPY (?!--from=)(.+) \S+$", text, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which the repository lacks"


def _local_prefill(services: dict, monkeypatch: pytest.MonkeyPatch) -> tuple[int, bool]:
    """(the gateway's --local-prefill-tokens, the decode workers' --local-prefill) as their processes start."""
    gateway, decode = (services[name] for name in ("gateway", "decode"))
    gateway_flags = flags_as_started(gateway["command"], gateway["environment"], monkeypatch)
    decode_flags = flags_as_started(decode["command"], decode["environment"], monkeypatch)
    return cfg.gateway_config(gateway_flags).local_prefill_tokens, cfg.worker_config(decode_flags).local_prefill


def test_every_prompt_is_prefilled_on_a_prefill_worker_by_default(compose, monkeypatch):
    """The design card's path, as `disagg up` takes it: conditional disaggregation is off in both halves."""
    assert _local_prefill(compose["services"], monkeypatch) == (0, False)


def test_conditional_disaggregation_is_one_setting_away(monkeypatch):
    services = _config(DISAGG_LOCAL_PREFILL_TOKENS="256", DISAGG_LOCAL_PREFILL="true")["services"]
    assert _local_prefill(services, monkeypatch) == (256, True)
