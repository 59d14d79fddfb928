"""`disagg bench handoff`: what the KV handoff costs a request, per prompt length and wire format.

Timing part (distilgpt2 shapes, dummy weights, fp32 by default): a real prefill worker servicer (PrefillServicer
+ PrefillEngine, the serving code) in one process, a decode receiver running the decode worker's own
`receive_handoff` (KvAssembler, conversion back to the model dtype) in a second process, and this process relaying
the prefill stream to the decode stream message by message as the gateway does, all over real loopback gRPC.
Exposed handoff = from the end of the prefill forward pass (the engine's own timestamp) to the moment the decode side
holds the whole cache (CLOCK_MONOTONIC is shared by the processes of one host). It includes the prefill worker's
serialization (and quantization), both gRPC hops, the relay, checksums, assembly and conversion.

Agreement part (the bundled real model, in-process): greedy continuation from a cache that went through each wire
format, compared token by token with the lossless cache's continuation.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.agreement import measure_wire_agreement
from benchmarks.report import publish
from disagg import config as cfg
from disagg.kv.codec import WIRE_FORMATS as KV_WIRE_FORMATS
from disagg.kv.transports import KV_TRANSPORTS

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

    from disagg.rpc.services import RelayDecodeStub, RelayPrefillStub

PROMPT_LENGTHS = (128, 512, 1000)
# "auto" (the bench model is float32, so lossless float32) and each lossy format
WIRE_FORMATS = ("auto", *(w for w in KV_WIRE_FORMATS if w != "float32"))
# TRANSPORT/WIRE[:layerwise]: every path and wire format, each whole-cache after the forward pass and layer-wise
# (streamed while later layers compute)
VARIANTS = tuple(f"{t}/{w}{mode}" for t in KV_TRANSPORTS for w in WIRE_FORMATS for mode in ("", ":layerwise"))


def parse_variant(variant: str) -> tuple[str, str, bool]:
    """'direct/auto:layerwise' -> ('direct', 'auto', True); a bare wire format means relayed."""
    transport, _, rest = variant.rpartition("/")
    wire, _, mode = rest.partition(":")
    return transport or "relayed", wire, mode == "layerwise"


WIRE_HEADER = "x-bench-kv-wire-dtype"
FORWARD_END_HEADER = "x-bench-forward-end"
COMPLETE_HEADER = "x-bench-kv-complete-at"


def _prefill_process(
    model: str, load_format: str, dtype: str, threads: int, chunk_bytes: int, ready: Queue[str]
) -> None:
    from disagg.config import BatchPolicy
    from disagg.engine.prefill import PrefillEngine
    from disagg.model.loading import load_model
    from disagg.model.runtime import configure_torch
    from disagg.pb.disagg.v1 import worker_pb2
    from disagg.rpc.services import add_prefill_service
    from disagg.server import Server
    from prefill_worker.servicer import PrefillServicer

    configure_torch(threads)
    lm = load_model(model, load_format=load_format, dtype=dtype)
    forward_end: dict[str, float] = {}

    class Engine(PrefillEngine):
        def submit(self, job):
            deliver = job.deliver

            def recording(result):
                if not isinstance(result, BaseException):  # the engine's forward start + its duration
                    forward_end[job.request_id] = result.forward_started + result.forward_seconds
                deliver(result)

            job.deliver = recording
            super().submit(job)

    class Servicer(PrefillServicer):
        async def Prefill(self, request, context):  # noqa: N802 (gRPC method name)
            _, wire, self.layerwise = parse_variant(dict(context.invocation_metadata()).get(WIRE_HEADER, "auto"))
            self.wire_dtype = "" if wire == "auto" else wire  # one call at a time in this benchmark
            async for response in super().Prefill(request, context):
                yield response
            context.set_trailing_metadata(((FORWARD_END_HEADER, repr(forward_end.pop(request.request_id))),))

    async def serve() -> None:
        engine = Engine(lm, BatchPolicy(), kv_cache=True)
        engine.start()
        server = Server("127.0.0.1", 0)
        servicer = Servicer(lm, engine, chunk_bytes)
        server.add_service(
            worker_pb2.DESCRIPTOR.services_by_name["PrefillService"], lambda s: add_prefill_service(servicer, s)
        )
        await server.start()
        ready.put(server.address)
        await asyncio.Event().wait()

    asyncio.run(serve())


def _decode_process(model: str, load_format: str, dtype: str, ready: Queue[str]) -> None:
    from decode_worker.servicer import DecodeServicer
    from disagg import telemetry
    from disagg.handoff.inbox import KvInbox
    from disagg.handoff.receive import receive_handoff
    from disagg.model.loading import load_model
    from disagg.model.runtime import configure_torch
    from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc
    from disagg.rpc.services import add_decode_service
    from disagg.server import Server

    configure_torch(1)
    lm = load_model(model, load_format=load_format, dtype=dtype)

    class Receiver(worker_pb2_grpc.DecodeServiceServicer):
        """The decode worker's handoff side only: receive_handoff (observed as the worker does), and PushKv into a
        KvInbox (direct path)."""

        inbox = KvInbox(lm.fingerprint)
        PushKv = DecodeServicer.PushKv

        async def Decode(self, request_iterator, context):  # noqa: N802 (gRPC method name)
            handoff = await receive_handoff(
                telemetry.observe_kv_transfer(request_iterator), lm, kv_cache=True, inbox=self.inbox
            )
            complete = time.monotonic()
            assert handoff.kv is not None and handoff.kv[0][0].dtype == lm.dtype
            context.set_trailing_metadata(((COMPLETE_HEADER, repr(complete)),))
            yield worker_pb2.DecodeResponse(token_ids=[handoff.first_token.token_id])

    async def serve() -> None:
        server = Server("127.0.0.1", 0)
        server.add_service(
            worker_pb2.DESCRIPTOR.services_by_name["DecodeService"], lambda s: add_decode_service(Receiver(), s)
        )
        await server.start()
        ready.put(server.address)
        await asyncio.Event().wait()

    asyncio.run(serve())


async def _one_handoff(
    prefill_stub: RelayPrefillStub,
    decode_stub: RelayDecodeStub,
    decode_address: str,
    prompt: list[int],
    variant: str,
    request_id: str,
) -> dict:
    """Hand one prompt's cache over as the gateway does (raw relay, or a handle); return its timings."""
    from disagg.kv.framing import is_chunk_message
    from disagg.kv.transports import TRANSPORT_VALUES
    from disagg.pb.disagg.v1 import worker_pb2
    from disagg.rpc.streams import ReadAhead

    transport = parse_variant(variant)[0]
    request = worker_pb2.PrefillRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=worker_pb2.SamplingParams(max_new_tokens=16, ignore_eos=True),
    )
    request.kv_destination.transport = TRANSPORT_VALUES[transport]
    if transport == "direct":
        request.kv_destination.decode_address, request.kv_destination.handle = decode_address, request_id
    prefill_call = prefill_stub.Prefill(request, metadata=((WIRE_HEADER, variant),), timeout=600)
    decode_call = decode_stub.Decode(timeout=600)
    total_bytes, prefill_seconds, chunks = 0, 0.0, 0
    with ReadAhead(prefill_call) as relayed:  # as the gateway relays
        async for raw in relayed:
            if is_chunk_message(raw):  # not parsed, as in the gateway
                chunks += 1
                await decode_call.write(raw)
                continue
            message = worker_pb2.PrefillResponse.FromString(raw)
            kind = message.WhichOneof("event")
            if kind == "start":
                total_bytes = message.start.kv_layout.total_bytes
            elif kind == "first_token":
                prefill_seconds = message.first_token.prefill_seconds
            else:
                chunks += 1
            await decode_call.write(raw)
    await decode_call.done_writing()
    async for _ in decode_call:
        pass
    forward_end = float(dict(await prefill_call.trailing_metadata())[FORWARD_END_HEADER])
    complete = float(dict(await decode_call.trailing_metadata())[COMPLETE_HEADER])
    exposed = complete - forward_end
    return dict(
        prefill_seconds=prefill_seconds,
        exposed_seconds=exposed,
        bytes=total_bytes,
        chunks=chunks,
        gb_per_s=total_bytes / exposed / 1e9,
        exposed_pct_of_prefill=100 * exposed / prefill_seconds,
    )


def measure_handoff(
    lengths: Sequence[int] = PROMPT_LENGTHS,
    formats: Sequence[str] = VARIANTS,
    repeats: int = 3,
    model: str = "distilgpt2",
    load_format: str = "dummy",
    dtype: str = "float32",
    threads: int = 2,
    chunk_bytes: int = 1 << 20,
) -> list[dict]:
    """Median over `repeats` of each (length, format), formats interleaved within each repeat."""
    ctx = mp.get_context("spawn")
    prefill_ready, decode_ready = ctx.Queue(), ctx.Queue()
    children = [
        ctx.Process(
            target=_prefill_process, daemon=True, args=(model, load_format, dtype, threads, chunk_bytes, prefill_ready)
        ),
        ctx.Process(target=_decode_process, args=(model, load_format, dtype, decode_ready), daemon=True),
    ]
    for child in children:
        child.start()
    try:
        prefill_address, decode_address = prefill_ready.get(timeout=600), decode_ready.get(timeout=600)
        return asyncio.run(_measure(prefill_address, decode_address, lengths, formats, repeats))
    finally:
        for child in children:
            child.terminate()
            child.join(10)


async def _measure(
    prefill_address: str, decode_address: str, lengths: Sequence[int], formats: Sequence[str], repeats: int
) -> list[dict]:
    from disagg.rpc.services import RelayDecodeStub, RelayPrefillStub
    from disagg.tools.client import channel

    generator = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(0, 50000, (n,), generator=generator).tolist() for n in lengths}
    runs: dict[tuple[int, str], list[dict]] = {}
    async with channel(prefill_address) as prefill_ch, channel(decode_address) as decode_ch:
        prefill_stub, decode_stub = RelayPrefillStub(prefill_ch), RelayDecodeStub(decode_ch)
        for n in lengths:  # warm-up of every shape and format
            for wire in formats:
                await _one_handoff(prefill_stub, decode_stub, decode_address, prompts[n], wire, f"warm-{n}-{wire}")
        for rep in range(repeats):
            for n in lengths:
                for wire in formats:
                    runs.setdefault((n, wire), []).append(
                        await _one_handoff(
                            prefill_stub, decode_stub, decode_address, prompts[n], wire, f"r{rep}-{n}-{wire}"
                        )
                    )
    rows = []
    for (n, wire), samples in runs.items():
        row: dict[str, Any] = dict(
            prompt_tokens=n, wire=wire, repeats=len(samples), bytes=samples[0]["bytes"], chunks=samples[0]["chunks"]
        )
        for key in ("prefill_seconds", "exposed_seconds", "gb_per_s", "exposed_pct_of_prefill"):
            row[key] = statistics.median(s[key] for s in samples)
        row["exposed_seconds_all"] = [round(s["exposed_seconds"], 5) for s in samples]
        rows.append(row)
    return rows


def render_markdown(record: dict) -> str:
    lines = [
        "# KV handoff benchmark\n",
        f"Command: `{record['command']}`  ",
        f"Date: {record['date']}; machine: {record['machine']}; {record.get('load', '')}\n",
        "## Handoff (distilgpt2 shapes, dummy weights, fp32; real loopback gRPC, 3 processes: prefill "
        "servicer, this process as the gateway, decode receiver)\n",
        "Variants are TRANSPORT/WIRE: `relayed` = chunks through the gateway (relayed byte for byte); `direct` "
        "= the prefill worker pushes the chunks to the decode worker, the gateway passes a handle; "
        "`shared-memory` = one /dev/shm segment, the stream names it (co-located workers). "
        "`:layerwise` = each layer's K/V streamed while later layers compute (`--kv-layerwise`); otherwise "
        "the whole cache is sent after the forward pass. Effective GB/s = bytes / exposed time (for "
        "layer-wise, most bytes moved before the forward pass ended, so it exceeds the link's rate).\n",
        "Exposed = end of the prefill forward pass to the decode side holding the whole cache in the model "
        f"dtype. Medians of {record['repeats']} runs, formats interleaved.\n",
        "Layer-wise streaming shares the 2 cores with the forward pass, so compare `prefill + exposed` too.\n",
        "| prompt tokens | wire | prefill forward (ms) | exposed handoff (ms) | % of prefill | prefill + exposed "
        "(ms) | bytes | chunks | effective GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in record["handoff"]:
        lines.append(
            f"| {row['prompt_tokens']} | {row['wire']} | {row['prefill_seconds'] * 1000:.1f} | "
            f"{row['exposed_seconds'] * 1000:.1f} | {row['exposed_pct_of_prefill']:.1f}% | "
            f"{(row['prefill_seconds'] + row['exposed_seconds']) * 1000:.1f} | {row['bytes']:,} "
            f"| {row['chunks']:.0f} | {row['gb_per_s']:.2f} |"
        )
    agreement = record.get("agreement")
    if agreement:
        lines += [
            "",
            f"## Greedy-token agreement with the lossless path ({agreement['model']}, "
            f"{agreement['prompts']} chat prompts x {agreement['new_tokens']} tokens)\n",
            "| wire | tokens matching | agreement | identical sequences | first divergence per prompt |",
            "|---|---|---|---|---|",
        ]
        for wire, entry in agreement["formats"].items():
            lines.append(
                f"| {wire} | {entry['matching']}/{entry['total']} | {100 * entry['agreement']:.1f}% | "
                f"{entry['identical_sequences']}/{agreement['prompts']} | {entry['first_divergence']} |"
            )
    targets = record.get("targets")
    if targets:
        lines += ["", "## Handoff targets (1000-token prompt)\n"]
        lines += [f"- {line}" for line in targets]
    return "\n".join(lines) + "\n"


def targets(record: dict) -> list[str]:
    rows = {(r["prompt_tokens"], r["wire"]): r for r in record["handoff"]}
    longest = max(n for n, _ in rows) if rows else 0
    at_longest = {variant: r for (n, variant), r in rows.items() if n == longest}
    out = []
    if at_longest:
        best = min(at_longest.values(), key=lambda r: r["exposed_pct_of_prefill"])
        out.append(
            f"best path ({best['wire']}): exposed {best['exposed_pct_of_prefill']:.1f}% of prefill "
            f"(target <= 5%): {_verdict(best['exposed_pct_of_prefill'] <= 5)}"
        )
        for variant in ("relayed/auto", "relayed/auto:layerwise"):
            if variant in at_longest:
                pct = at_longest[variant]["exposed_pct_of_prefill"]
                out.append(
                    f"relayed lossless ({variant}): {pct:.1f}% of prefill (target <= 15%): {_verdict(pct <= 15)}"
                )
        lossless = {v: r for v, r in at_longest.items() if parse_variant(v)[1] == "auto"}
        if lossless:
            fastest = min(lossless.values(), key=lambda r: r["exposed_seconds"])
            out.append(
                f"best lossless path ({fastest['wire']}) effective rate {fastest['gb_per_s']:.2f} GB/s "
                f"(target >= 1 GB/s): {_verdict(fastest['gb_per_s'] >= 1)}"
            )
            whole = {v: r for v, r in lossless.items() if not parse_variant(v)[2]}
            if whole:  # after the forward pass, the exposed time is the whole transfer: a true link rate
                link = max(whole.values(), key=lambda r: r["gb_per_s"])
                rate = link["gb_per_s"]
                out.append(
                    f"best whole-cache lossless path ({link['wire']}), where exposed time = the whole "
                    f"transfer: {rate:.2f} GB/s (target >= 1 GB/s): {_verdict(rate >= 1)}"
                )
                for variant, row in sorted(whole.items()):
                    out.append(
                        f"whole-cache lossless {variant}: {row['gb_per_s']:.2f} GB/s, "
                        f"{row['exposed_pct_of_prefill']:.1f}% of prefill"
                    )
    agreement = record.get("agreement")
    if agreement:
        for wire in ("float16", "bfloat16"):
            if wire in agreement["formats"]:
                a = 100 * agreement["formats"][wire]["agreement"]
                out.append(f"{wire} agreement {a:.1f}% (target >= 99%): {_verdict(a >= 99)}")
        if "int8" in agreement["formats"]:
            out.append(f"int8 agreement {100 * agreement['formats']['int8']['agreement']:.1f}% (reported as measured)")
    return out


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def add_handoff_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default=",".join(map(str, PROMPT_LENGTHS)), help="prompt lengths, comma-separated")
    parser.add_argument(
        "--formats",
        default=",".join(VARIANTS),
        help="variants, comma-separated: [TRANSPORT/]WIRE[:layerwise], TRANSPORT one of "
        f"{', '.join(KV_TRANSPORTS)} (default relayed), WIRE one of {', '.join(WIRE_FORMATS)}; "
        ":layerwise streams layer by layer",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="handoffs timed per prompt length and variant (the median is reported)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the prefill process")
    cfg.add_flags(parser, cfg.WorkerConfig, role="bench", only=["kv_chunk_bytes"])
    parser.add_argument("--agreement-tokens", type=int, default=32, help="0 skips the agreement part")
    parser.add_argument("--out", default="", help="write OUT.json and OUT.md (e.g. benchmarks/results/handoff)")


def handoff_main(args: argparse.Namespace) -> None:
    lengths = tuple(int(v) for v in args.lengths.split(","))
    formats = tuple(args.formats.split(","))
    record: dict[str, Any] = dict(
        command="disagg " + " ".join(getattr(args, "argv", [])),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        machine=f"{platform.machine()}, {mp.cpu_count()} cores, torch {torch.__version__}",
        repeats=args.repeats,
        load="load average before the run {:.2f} / {:.2f} / {:.2f} (1/5/15 min)".format(*os.getloadavg()),
    )
    record["handoff"] = measure_handoff(
        lengths, formats, args.repeats, threads=args.threads, chunk_bytes=args.kv_chunk_bytes
    )
    if args.agreement_tokens:
        lossy = tuple(dict.fromkeys(wire for _, wire, _ in map(parse_variant, formats) if wire != "auto"))
        record["agreement"] = measure_wire_agreement(lossy, args.agreement_tokens)
    record["targets"] = targets(record)
    publish(record, render_markdown(record), args.out)
