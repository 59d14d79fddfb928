"""Shared fixtures: real clusters of worker and gateway processes on loopback, and reference models in-process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from disagg.model.loading import BUNDLED_MODEL, LoadedModel, load_model
from disagg.tools.cluster import Child, Cluster, free_port, spawn, stop, wait_healthy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GPT2_ARGS = ["--model", "distilgpt2", "--load-format", "dummy", "--seed", "0"]
LLAMA_ARGS = ["--model", BUNDLED_MODEL]


# Tiers (docs/development.md): a test that needs worker processes is marked `cluster`, from the fixtures it uses or by
# an explicit mark; the rest (pure functions, in-process engines and servicers) is the fast tier.
CLUSTER_FIXTURES = {"scraped", "traces", "traced", "direct_trace"}  # besides every fixture named *cluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & CLUSTER_FIXTURES or any(name.endswith("cluster") for name in names):
            item.add_marker(pytest.mark.cluster)


@dataclass
class RunningCluster:
    address: str
    cluster: Cluster


def start_cluster(worker_args: list[str], gateway_args: list[str] = (), **kwargs) -> RunningCluster:
    cluster = Cluster(worker_args, list(gateway_args), **kwargs)
    try:
        address = asyncio.run(cluster.start(timeout=300))
    except BaseException:
        cluster.stop()
        raise
    return RunningCluster(address, cluster)


@pytest.fixture(scope="session")
def gpt2_cluster() -> Iterator[RunningCluster]:
    running = start_cluster(GPT2_ARGS)
    yield running
    running.cluster.stop()


@pytest.fixture(scope="session")
def llama_cluster() -> Iterator[RunningCluster]:
    running = start_cluster(LLAMA_ARGS)
    yield running
    running.cluster.stop()


@dataclass
class HttpGateway:
    running: RunningCluster
    child: Child
    base_url: str
    model: str

    @property
    def grpc_address(self) -> str:
        return self.child.address


def start_http_gateway(running: RunningCluster, model: str, *extra: str) -> HttpGateway:
    http_port = free_port()
    cluster = running.cluster
    child = spawn(
        "gateway-http",
        [
            "gateway",
            "--prefill",
            ",".join(c.address for c in cluster.prefill),
            "--decode",
            ",".join(c.address for c in cluster.decode),
            "--http-port",
            str(http_port),
            "--served-model-name",
            model,
            *extra,
        ],
        free_port(),
    )
    try:
        asyncio.run(wait_healthy([child], 120))
    except BaseException:
        stop([child])
        raise
    return HttpGateway(running, child, f"http://127.0.0.1:{http_port}/v1", model)


@pytest.fixture(scope="session")
def llama_http(llama_cluster) -> Iterator[HttpGateway]:
    """An HTTP (OpenAI) gateway over the SmolLM2 cluster."""
    gateway = start_http_gateway(llama_cluster, "smollm2-135m-instruct")
    yield gateway
    stop([gateway.child])


@pytest.fixture(scope="session")
def gpt2_model() -> LoadedModel:
    """The same seeded dummy weights the GPT-2 cluster's workers build."""
    return load_model("distilgpt2", load_format="dummy", seed=0)


@pytest.fixture(scope="session")
def llama_model() -> LoadedModel:
    """The bundled real SmolLM2-135M-Instruct (Llama architecture), fp32."""
    return load_model(BUNDLED_MODEL)
