"""`disagg up` with its defaults takes the design card's path, gateway -> prefill worker (first token + KV) ->
decode worker, for a short prompt too, and serves the OpenAI API: seen in a real trace, the prefill worker's
metrics and the real `openai` SDK. The only flags given are the model and the ports (a free HTTP port instead of
the default 8000, which a test beside this one may hold; the default itself is checked on the parser)."""

from __future__ import annotations

import asyncio
import pathlib
import sys
from collections.abc import Iterator

import openai
import pytest

from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.cli import build_parser
from disagg.tools.client import channel, complete, scrape_metrics
from disagg.tools.cluster import free_port
from disagg.tools.launch import INTEL_OPENMP
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.processes import RunningUp, children_of, command_of, start_up

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")

SERVICES = {"disagg-gateway", "disagg-prefill", "disagg-decode"}
SHORT_PROMPT = "Hi"  # a few tokens: what conditional disaggregation would have kept on the decode worker


def test_up_defaults_are_the_disaggregated_path_and_the_openai_port():
    args = build_parser().parse_args(["up"])
    assert args.local_prefill_tokens == 0
    assert args.http_port == 8000


class DefaultUp:
    def __init__(self, up: RunningUp, receiver: OtlpReceiver, http_port: int):
        self.up, self.receiver = up, receiver
        self.address = up.wait_for_line("cluster ready", 0).split("gateway on ")[1].split()[0]
        self.base_url = up.wait_for_line("OpenAI-compatible API:", 0).split()[-3]
        assert self.base_url == f"http://127.0.0.1:{http_port}/v1"

    def metrics_address(self, child: str) -> str:
        line = self.up.wait_for_line(f"{child} metrics: http://", 0)
        return line.split("http://")[1].split("/")[0]

    def prefilled(self) -> float:
        """Forward passes the prefill worker ran for requests so far."""
        return scrape_metrics(self.metrics_address("prefill-0"))[("disagg_prefill_forward_seconds_count", frozenset())]


@pytest.fixture(scope="module")
def up_cluster() -> Iterator[DefaultUp]:  # (named *cluster: the tests that use it are marked `cluster`)
    receiver = OtlpReceiver().start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    http_port = free_port()
    up = start_up(
        *("--model", "distilgpt2", "--load-format", "dummy", "--port", str(free_port()), "--http-port", str(http_port)),
        env=env,
    )
    try:
        yield DefaultUp(up, receiver, http_port)
    finally:
        up.process.terminate()
        status = up.finish(120)
        receiver.stop()
    assert status == 0, up.output()[-4000:]


def test_no_process_runs_conditional_disaggregation(up_cluster):
    assert "every prompt prefilled remotely" in up_cluster.up.wait_for_line("cluster ready", 0)
    commands = {command_of(pid)[3]: command_of(pid) for pid in children_of(up_cluster.up.process.pid)}
    gateway, decode = commands["gateway"], commands["decode"]
    assert gateway[gateway.index("--local-prefill-tokens") + 1] == "0"
    assert "--no-local-prefill" in decode and "--local-prefill" not in decode


def _maps(pid: int) -> str:
    return pathlib.Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not INTEL_OPENMP.exists(), reason="intel-openmp is not installed (x86_64 Linux only)")
def test_workers_run_on_intel_openmp_and_the_gateway_does_not_load_it(up_cluster):
    up_cluster.up.wait_for_line("cluster ready", 0)
    pids = {command_of(pid)[3]: pid for pid in children_of(up_cluster.up.process.pid)}
    assert str(INTEL_OPENMP) in _maps(pids["prefill"]) and str(INTEL_OPENMP) in _maps(pids["decode"])
    assert "libiomp5" not in _maps(pids["gateway"])


def _trace(spans: list[ReceivedSpan], request_id: str) -> list[ReceivedSpan]:
    roots = [s for s in spans if s.service == "disagg-gateway" and s.attributes.get("gen_ai.response.id") == request_id]
    return [s for s in spans if roots and s.trace_id == roots[0].trace_id]


def test_a_short_prompt_is_prefilled_remotely_and_its_kv_handed_over(up_cluster):
    before = up_cluster.prefilled()

    async def generate() -> None:
        async with channel(up_cluster.address) as ch:
            request = gateway_pb2.GenerateRequest(
                prompt=SHORT_PROMPT, max_new_tokens=4, ignore_eos=True, request_id="default-path"
            )
            done = await complete(gateway_pb2_grpc.GatewayStub(ch), request, timeout=120)
            assert done.completion_tokens == 4 and done.prompt_tokens < 8

    asyncio.run(generate())
    expected = {"prefill.forward", "kv.transfer", "decode"}
    spans = up_cluster.receiver.wait_for(lambda spans: {s.name for s in _trace(spans, "default-path")} >= expected)
    trace = _trace(spans, "default-path")
    assert {s.service for s in trace} == SERVICES
    names = {s.name for s in trace}
    assert {"disagg.v1.PrefillService/Prefill", "disagg.v1.DecodeService/Decode", *expected} <= names, names
    assert "disagg.v1.AggregatedService/Generate" not in names
    (transfer,) = [s for s in trace if s.name == "kv.transfer"]
    assert transfer.service == "disagg-decode"
    (root,) = [s for s in trace if not s.parent_span_id]
    assert "disagg.local_prefill" not in root.attributes  # never offered to the decode worker
    assert up_cluster.prefilled() == before + 1  # the prefill worker's metrics count it


def test_the_openai_sdk_is_served_by_default_through_the_prefill_worker(up_cluster):
    client = openai.OpenAI(base_url=up_cluster.base_url, api_key="unused", max_retries=0, timeout=120)
    assert [model.id for model in client.models.list()] == ["distilgpt2"]  # named after --model
    before = up_cluster.prefilled()
    completion = client.completions.create(
        model="distilgpt2", prompt=SHORT_PROMPT, max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert completion.usage.completion_tokens == 5 and completion.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            model="distilgpt2", prompt=SHORT_PROMPT, max_tokens=5, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text  # greedy: the same
    assert up_cluster.prefilled() == before + 2
