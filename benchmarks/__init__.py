"""The measurement harness of the project, beside the serving code and never imported by it.

What `disagg bench` and `python -m benchmarks.<module>` run, split by concern: `workloads` (prompt sets),
`drivers` (gRPC and OpenAI clients that send and time requests), `baselines` (in-process `generate()`), `stats`
(percentiles, goodput), `variants` (the systems one run measures, as typed records) and `ratios` (between them,
by their fields), `runner` (clusters up one at a time, rounds), `report` and `plots` (JSON, Markdown experiment
record, PNG), `serving` (the `disagg bench` command), the focused benchmarks (`handoff`, `dtype_agreement`,
`engine_ceiling`, `decode_step_profile`, `prefix_compute`, `tracing_overhead`, `cuda_check`), the peer comparison
(`peer_vllm`: vLLM's CPU engine against `disagg up`), and `suites` (the exact commands that made each committed
record). Records live in `benchmarks/results/`, indexed by its README.

The serving packages (`disagg`, `gateway`, `prefill_worker`, `decode_worker`) never import this package:
`disagg bench` reaches it through the `disagg.commands` entry point group (pyproject.toml), and
tests/test_layering.py checks the direction.
"""
