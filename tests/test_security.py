"""TLS and mutual TLS between every component and on the public port, plus the gateway's bearer token."""

from __future__ import annotations

import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.config import TlsOptions
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.client import channel, complete
from disagg.tools.cluster import free_port
from tests.conftest import GPT2_ARGS, start_cluster

TOKEN = "s3cret-token"


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA, one certificate for the components (server and client use, 127.0.0.1), one for a client."""
    d = tmp_path_factory.mktemp("certs")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=disagg test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    for name, usage in (("component", "serverAuth,clientAuth"), ("client", "clientAuth")):
        (d / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n")
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    return d


@pytest.fixture(scope="module")
def tls_cluster(certs):
    tls_flags = [
        "--tls-cert",
        str(certs / "component.pem"),
        "--tls-key",
        str(certs / "component.key"),
        "--tls-ca",
        str(certs / "ca.pem"),
        "--tls-require-client-cert",
    ]
    client = TlsOptions(
        tls_cert=str(certs / "client.pem"), tls_key=str(certs / "client.key"), tls_ca=str(certs / "ca.pem")
    )
    http_port = free_port()  # the OpenAI-compatible HTTP API: the same TLS and token (tests/test_openai_api.py)
    gateway_flags = [*tls_flags, "--auth-token", TOKEN, "--http-port", str(http_port)]
    running = start_cluster([*GPT2_ARGS, *tls_flags], gateway_flags, tls=client)
    running.http_port = http_port
    yield running, client
    running.cluster.stop()


async def generate(address, tls, token):
    async with channel(address, tls) as ch:
        return await complete(
            gateway_pb2_grpc.GatewayStub(ch),
            gateway_pb2.GenerateRequest(prompt="secure hello", max_new_tokens=3, ignore_eos=True),
            timeout=30,
            auth_token=token,
        )


async def test_mutual_tls_with_token_works(tls_cluster):
    running, client = tls_cluster
    got = await generate(running.address, client, TOKEN)
    assert len(got.token_ids) == 3 and got.finish_reason == "length"


@pytest.mark.parametrize("token", ["", "wrong-token"])
async def test_missing_or_wrong_token_is_unauthenticated(tls_cluster, token):
    running, client = tls_cluster
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(running.address, client, token)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_needs_no_token(tls_cluster):
    running, client = tls_cluster
    async with channel(running.address, client) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_clients_without_a_certificate_or_without_tls_are_refused(tls_cluster, certs):
    running, _ = tls_cluster
    no_client_cert = TlsOptions(tls_ca=str(certs / "ca.pem"))
    for tls in (no_client_cert, None):
        for address in [running.address, running.cluster.prefill[0].address, running.cluster.decode[0].address]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await generate(address, tls, TOKEN)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_http_api_needs_the_client_certificate_and_the_token(tls_cluster, certs):
    import ssl

    import httpx2

    running, _ = tls_cluster
    url = f"https://127.0.0.1:{running.http_port}/v1/completions"
    body = {"model": "distilgpt2", "prompt": "secure hello", "max_tokens": 2}
    with_cert = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with_cert.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    async with httpx2.AsyncClient(verify=with_cert, timeout=30) as http:
        ok = await http.post(url, json=body, headers={"authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        refused = await http.post(url, json=body, headers={"authorization": "Bearer wrong"})
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    without_cert = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    async with httpx2.AsyncClient(verify=without_cert, timeout=30) as http:
        with pytest.raises(httpx2.HTTPError):  # mutual TLS: the handshake (or the first read) fails
            await http.post(url, json=body, headers={"authorization": f"Bearer {TOKEN}"})
